#!/usr/bin/env bash
# The main job on a fresh machine: set up, run the dual_teacher bundle on the embedded synthetic
# ultrasound data with a short schedule (APPG pseudo-labels with LiteMedSAM, static-teacher
# warm-up, dual-teacher training), evaluate it on the held-out test images, and say where the
# model, metrics and overlay images went. Re-running skips finished stages and resumes training.
# Extra arguments are passed to the training run, e.g. `bash scripts/demo.sh --max_epochs 30`;
# another bundle: `BUNDLE=mean_teacher bash scripts/demo.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
BUNDLE=bundles/${BUNDLE:-dual_teacher}
SHORT=(--max_epochs 10 --epoch_length 30 --spatial_size 128)
if [[ $BUNDLE == */dual_teacher ]]; then
    # a short schedule wants a larger step than the paper's Adam 1e-4 for 100 epochs
    SHORT+=(--stwp_max_epochs 1 --stwp_epoch_length 150 --learning_rate 0.001 --stwp_learning_rate 0.001)
fi

echo "[demo] training $BUNDLE on the synthetic dataset (${SHORT[*]} $*)"
"$PY" -m monai.bundle run --config_file "$BUNDLE/configs/train.json" "${SHORT[@]}" "$@"
echo "[demo] evaluating models/model.pt on the test split (at the settings in its card, models/model.json)"
"$PY" -m monai.bundle run --config_file "['$BUNDLE/configs/train.json','$BUNDLE/configs/evaluate.json']" "$@"
"$PY" - "$BUNDLE" <<'PYEOF'
import json, sys
from pathlib import Path
bundle = Path(sys.argv[1]).resolve()
log = [json.loads(line) for line in (bundle / "runs" / "metrics.jsonl").read_text().splitlines() if line.strip()]
val = [r["val_mean_dice"] for r in log if "val_mean_dice" in r]
summary = json.loads((bundle / "eval" / "metrics_summary.json").read_text())
test, empty = summary["metrics"], summary["empty_cases"]
print("\n[demo] results")
appg = bundle / "runs" / "appg" / "report" / "appg_report.json"
if appg.is_file():
    report = json.loads(appg.read_text())
    valid = (report.get("truth") or {}).get("valid") or {}
    quality = f", Dice vs truth {valid['dice']['mean']:.4f}" if "dice" in valid else ""
    print(f"  APPG pseudo-labels: {report['counts']['valid']} of {report['counts']['total']} valid{quality} ({appg.parent})")
print(f"  validation Dice (best over {len(val)} validations): {max(val):.4f}")
print(f"  test Dice {test['dice']['mean']:.4f} ± {test['dice']['std']:.4f} over {summary['n_cases']} images "
      f"({empty['both_empty']} of {empty['both_empty'] + empty['truth_empty']} lesion-free ones left empty, "
      f"{empty['pred_empty']} lesions missed), IoU {test['iou']['mean']:.4f}, HD95 {test['hd95']['mean']:.1f} px")
print(f"  model (bare state dict):   {bundle / 'models' / 'model.pt'}, its settings: {bundle / 'models' / 'model.json'}")
print(f"  training log and curves:   {bundle / 'runs' / 'metrics.jsonl'}, {bundle / 'runs' / 'training_curves.png'}")
print(f"  per-case metrics, summary: {bundle / 'eval' / 'metrics_per_case.csv'}, {bundle / 'eval' / 'metrics_summary.json'}")
print(f"  overlay images:            {bundle / 'eval' / 'overlays'}")
PYEOF
