#!/usr/bin/env bash
# The main job on a fresh machine: set up, run the dual_teacher bundle on the embedded synthetic
# ultrasound data with a short schedule (APPG pseudo-labels with LiteMedSAM, static-teacher
# warm-up, dual-teacher training), evaluate it on the held-out test images (at the settings the
# model was trained with, from its card models/model.json), and say where the model, metrics and
# overlay images went. Re-running skips finished stages and resumes training.
# Extra arguments are passed to the training and evaluation runs, e.g. `bash scripts/demo.sh
# --max_epochs 30`; another bundle: `BUNDLE=mean_teacher bash scripts/demo.sh`.
# The figures are deterministic for a given seed on a given machine: a run from scratch prints the
# same numbers again. Another thread count or CPU sums in another order (bf16 autocast, oneDNN), so
# its figures differ a little; `SEEDS="0 1 2" bash scripts/demo.sh` runs one demo per seed, each in
# its own folder ($BUNDLE/runs/seeds/seed<s>), and prints the mean ± std over the seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${MONAI_SSL_VENV:-.venv}/bin/python"
BUNDLE=bundles/${BUNDLE:-dual_teacher}
SHORT=(--max_epochs 10 --epoch_length 30 --spatial_size 128)
if [[ $BUNDLE == */dual_teacher ]]; then
    # a short schedule wants a larger step than the paper's Adam 1e-4 for 100 epochs
    SHORT+=(--stwp_max_epochs 1 --stwp_epoch_length 150 --learning_rate 0.001 --stwp_learning_rate 0.001)
fi

# one demo: train, evaluate, print the results; its arguments go to both runs
demo() {
    echo "[demo] training $BUNDLE on the synthetic dataset (${SHORT[*]} $*)"
    "$PY" -m monai.bundle run --config_file "$BUNDLE/configs/train.json" "${SHORT[@]}" "$@"
    echo "[demo] evaluating models/model.pt on the test split (at the settings in its card, models/model.json)"
    "$PY" -m monai.bundle run --config_file "['$BUNDLE/configs/train.json','$BUNDLE/configs/evaluate.json']" "$@"
}

ROOTS=()
if [[ -n ${SEEDS:-} ]]; then
    for seed in $SEEDS; do
        root="$BUNDLE/runs/seeds/seed$seed"
        demo --seed "$seed" --bundle_root "$root" "$@"
        ROOTS+=("$root")
    done
else
    demo "$@"
    ROOTS+=("$BUNDLE")
fi

"$PY" - "${ROOTS[@]}" <<'PYEOF'
import json, os, sys
from pathlib import Path

import numpy as np
import torch

rows = []
for root in map(lambda r: Path(r).resolve(), sys.argv[1:]):
    log = [json.loads(line) for line in (root / "runs" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [r["val_mean_dice"] for r in log if "val_mean_dice" in r]
    summary = json.loads((root / "eval" / "metrics_summary.json").read_text())
    test, empty = summary["metrics"], summary["empty_cases"]
    card_file = root / "models" / "model.json"
    card = json.loads(card_file.read_text()) if card_file.is_file() else {"training": {}}
    print(f"\n[demo] results ({root}, seed {card['training'].get('seed')})")
    row = {"best validation Dice": max(val), "test Dice": test["dice"]["mean"]}
    appg = root / "runs" / "appg" / "report" / "appg_report.json"
    if appg.is_file():
        report = json.loads(appg.read_text())
        valid = (report.get("truth") or {}).get("valid") or {}
        quality = f", Dice vs truth {valid['dice']['mean']:.4f}" if "dice" in valid else ""
        print(f"  APPG pseudo-labels: {report['counts']['valid']} of {report['counts']['total']} valid{quality} ({appg.parent})")
        row["APPG valid"] = report["counts"]["valid"]
    print(f"  validation Dice (best over {len(val)} validations): {max(val):.4f}")
    print(f"  test Dice {test['dice']['mean']:.4f} ± {test['dice']['std']:.4f} over {summary['n_cases']} images "
          f"({empty['both_empty']} of {empty['both_empty'] + empty['truth_empty']} lesion-free ones left empty, "
          f"{empty['pred_empty']} lesions missed), IoU {test['iou']['mean']:.4f}, HD95 {test['hd95']['mean']:.1f} px")
    print(f"  model (bare state dict):   {root / 'models' / 'model.pt'}, its settings: {root / 'models' / 'model.json'}")
    print(f"  training log and curves:   {root / 'runs' / 'metrics.jsonl'}, {root / 'runs' / 'training_curves.png'}")
    print(f"  per-case metrics, summary: {root / 'eval' / 'metrics_per_case.csv'}, {root / 'eval' / 'metrics_summary.json'}")
    print(f"  overlay images:            {root / 'eval' / 'overlays'}")
    rows.append(row)
print(f"  (CPU threads: {torch.get_num_threads()}, CPU cores: {os.cpu_count()}; figures are exact for a seed at this setting)")
if len(rows) > 1:
    print(f"\n[demo] over {len(rows)} seeds (mean ± population std)")
    for key in rows[0]:
        values = np.array([r[key] for r in rows], dtype=float)
        print(f"  {key}: {values.mean():.4f} ± {values.std():.4f}  ({', '.join(f'{v:.4f}' for v in values)})")
PYEOF
