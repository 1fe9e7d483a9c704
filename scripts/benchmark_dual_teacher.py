#!/usr/bin/env python
"""Dual-teacher vs the baselines and the paper's component ablation (Table 2) on BUSI, at CPU scale.

For each datalist (default: BUSI 2.5 % and 10 % labels), under one iteration budget, image size,
learning rate and seed, this trains and evaluates (test split, model selected on validation):

* ``supervised`` and ``mean_teacher`` (their bundles); ``mean_teacher_split``: the mean teacher
  with one student forward per half (``joint_batch=false``) instead of the joint batch;
* ``static_teacher``: the APPG-trained static teacher alone (0 labels; the STWP artifact);
* ``appg``: the student initialised from the static teacher and trained with it as the only
  teacher (``use_dynamic_teacher=false, use_uewf=false, use_aurcl=false``);
* ``+dual_teacher``: static + EMA teacher, averaged (``use_uewf=false, use_aurcl=false``);
* ``+aurcl``: the above with AURCL (``use_uewf=false``);
* ``+uewf``: the full method (the bundle's defaults).

Every run goes through ``ConfigWorkflow`` (the code path of ``python -m monai.bundle run``). The
APPG pseudo-labels (one store for all datalists) and each datalist's static teacher are shared
by the dual-teacher rows: the stages' manifests make later rows skip them. Each method runs in
its own process (clean RSS peak). Prints and writes ``results.md`` / ``results.json``.

Example (about 1.5 h per datalist on one core at the defaults)::

    taskset -c 1 python scripts/benchmark_dual_teacher.py --threads 1 --datalists datalists/busi_2.5pct.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmark_baselines import ensure_busi  # noqa: E402  (this folder is on sys.path)
from monai_ssl.utils import atomic_write  # noqa: E402

#: row name -> (bundle, overrides of the bundle's train.json)
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "supervised": ("supervised", {}),
    "mean_teacher": ("mean_teacher", {}),
    "mean_teacher_split": ("mean_teacher", {"joint_batch": False}),
    "static_teacher": ("dual_teacher", {}),
    "appg": ("dual_teacher", {"use_dynamic_teacher": False, "use_uewf": False, "use_aurcl": False}),
    "+dual_teacher": ("dual_teacher", {"use_uewf": False, "use_aurcl": False}),
    "+aurcl": ("dual_teacher", {"use_uewf": False}),
    "+uewf": ("dual_teacher", {}),
}


def _workflow(bundle: str, configs: list[str], **overrides: Any):
    from monai.bundle import ConfigWorkflow

    folder = REPO_ROOT / "bundles" / bundle / "configs"
    return ConfigWorkflow(
        config_file=[str(folder / c) for c in configs], meta_file=str(folder / "metadata.json"),
        logging_file=str(folder / "logging.conf"), workflow_type="train", **overrides,
    )


def run_worker(row: str, datalist: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train (or, for ``static_teacher``, make the STWP artifact), then evaluate one row."""
    import numpy as np
    import torch
    from ignite.engine import Events

    torch.set_num_threads(args.threads)
    bundle, extra = ROWS[row]
    tag = datalist.stem
    out = Path(args.out) / tag / row.lstrip("+")
    shared = Path(args.out) / "shared"
    common = {
        "bundle_root": str(out),
        "dataset_dir": str(Path(args.dataset_dir).resolve()),
        "datalist": str(datalist.resolve()),
        "spatial_size": args.size,
        "seed": args.seed,
    }
    train = {
        **common,
        "max_epochs": args.iterations // args.val_every,
        "epoch_length": args.val_every,
        "learning_rate": args.lr,
        "val_interval": 1,
        "progress": False,
    }
    if bundle == "mean_teacher":
        train["consistency_rampup"] = int(0.4 * args.iterations)
    if bundle == "dual_teacher":
        train.update(
            appg_dir=str(Path(args.appg_dir) if args.appg_dir else shared / "appg"),
            appg_precision=args.appg_precision,
            static_teacher_path=str(shared / f"static_teacher_{tag}.pt"),
            stwp_dir=str(shared / "stwp"),
            stwp_max_epochs=1,
            stwp_epoch_length=args.stwp_iterations,
            stwp_learning_rate=args.lr,
        )
    train.update(extra)
    train.update(args.set)
    results: dict[str, Any] = {"row": row, "bundle": bundle, "overrides": {**extra, **args.set}, "datalist": str(datalist.resolve())}
    results["settings"] = {k: getattr(args, k) for k in ("dataset_dir", "size", "iterations", "val_every", "stwp_iterations", "lr", "seed", "threads")}
    results["settings"]["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    wf = _workflow(bundle, ["train.json"], **train)
    wf.initialize()
    step_times: list[float] = []
    started: list[float] = []
    t0 = time.perf_counter()
    if row == "static_teacher":
        wf.parser.get_parsed_content("stwp").run()  # APPG + warm-up (or their finished artifacts)
        (out / "models").mkdir(parents=True, exist_ok=True)
        shutil.copy(shared / f"static_teacher_{tag}.pt", out / "models" / "model.pt")
        stwp = json.loads((shared / f"static_teacher_{tag}.json").read_text())
        results.update(stwp_iterations=stwp.get("iterations"), stwp_seconds=stwp.get("seconds_this_run"))
        from monai_ssl.pseudo.appg import store_lock

        appg_dir = Path(train["appg_dir"])
        with store_lock(appg_dir):  # the store's report for this datalist, not a concurrent run's
            wf.parser.get_parsed_content("appg").run()  # returns at once when the manifest is this list's
            appg = json.loads((appg_dir / "report" / "appg_report.json").read_text())
        results["appg"] = {k: appg.get(k) for k in ("counts", "truth", "images_per_second")}
    else:
        wf.trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: started.append(time.perf_counter()))
        wf.trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: step_times.append(time.perf_counter() - started[-1]))
        wf.run()
        best = wf.parser.get_parsed_content("validate#handlers")[1]
        results.update(
            iterations=len(step_times),
            step_s_median=float(np.median(step_times[10:] or step_times)),
            best_val_dice_during_training=best.best,
            best_epoch=best.best_epoch,
        )
        wf.finalize()  # training curves
    results["wall_s"] = time.perf_counter() - t0
    eval_bundle = "supervised" if row == "static_teacher" else bundle
    ev = _workflow(eval_bundle, ["train.json", "evaluate.json"], **common, eval_split="test", eval_dir=str(out / "eval_test"))
    ev.initialize()
    ev.run()
    ev.finalize()
    results["test"] = json.loads((out / "eval_test" / "metrics_summary.json").read_text())
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results


def _fmt(summary: dict[str, Any], metric: str) -> str:
    m = summary["metrics"][metric]
    return f"{m['mean']:.4f} ± {m['std']:.4f}"


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """One Markdown table per datalist (the header shows the settings the rows ran with)."""
    ran_with = [r["settings"] for r in results if "settings" in r]
    if ran_with:  # rows written by older versions of this script carry no settings
        args = argparse.Namespace(**{**vars(args), **ran_with[0]})
    lines = [
        f"{Path(args.dataset_dir).name}, {args.size}x{args.size}, {args.iterations} iterations (validation every {args.val_every}), "
        f"static-teacher warm-up {args.stwp_iterations} iterations, Adam lr {args.lr}, seed {args.seed}, "
        f"{args.threads} thread(s), {getattr(args, 'device', 'cpu')}; test split, model chosen on validation Dice",
    ]
    for datalist in sorted({r["datalist"] for r in results}):
        rows = [r for r in results if r["datalist"] == datalist]
        if not rows:
            continue
        lines += [
            "", f"**{Path(datalist).name}**", "",
            "| method | test Dice | test IoU | test accuracy | best val Dice | s/iter | peak RSS (MiB) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            step = f"{r['step_s_median']:.3f}" if "step_s_median" in r else "-"
            val = f"{r['best_val_dice_during_training']:.4f}" if "best_val_dice_during_training" in r else "-"
            lines.append(
                f"| {r['row']} | {_fmt(r['test'], 'dice')} | {_fmt(r['test'], 'iou')} | {_fmt(r['test'], 'accuracy')} "
                f"| {val} | {step} | {r['peak_rss_mib']:.0f} |"
            )
        appg = next((r["appg"] for r in rows if "appg" in r), None)
        if appg and appg.get("truth"):
            valid = appg["truth"].get("valid") or {}
            dice = valid.get("dice", {})
            lines.append(
                f"\nAPPG pseudo-labels: {appg['counts']['valid']} of {appg['counts']['total']} valid; Dice against truth "
                f"over valid images {dice.get('mean', float('nan')):.4f} ± {dice.get('std', float('nan')):.4f}"
            )
    return "\n".join(lines)


def write_tables(out: Path, args: argparse.Namespace) -> str:
    """Collect every ``<datalist>/<row>/result.json`` under ``out`` (also those of other, possibly
    concurrent, invocations) into ``results.json`` and ``results.md``; return the tables."""
    results = [json.loads(p.read_text()) for p in out.glob("*/*/result.json")]
    for r in results:  # relative and absolute spellings of one datalist are one table
        r["datalist"] = str((REPO_ROOT / r["datalist"]).resolve())
    results.sort(key=lambda r: (str(r["datalist"]), list(ROWS).index(r["row"])))
    text = report(results, args)
    atomic_write(out / "results.json", json.dumps({"results": results}, indent=2))
    commands = sorted({f"`{r.get('command', '?')}`" for r in results})
    atomic_write(out / "results.md", f"{text}\n\nCommands: " + "; ".join(commands) + "\n")
    return text


def seeds_summary(outs: list[Path]) -> str:
    """Mean ± std over runs (e.g. seeds, one ``--out`` folder each) of each row's test Dice and
    IoU, per datalist, with the per-run Dice in brackets."""
    import numpy as np

    results = [json.loads(p.read_text()) for out in outs for p in sorted(Path(out).glob("*/*/result.json"))]
    if not results:
        raise SystemExit(f"no */*/result.json under {', '.join(map(str, outs))}")
    ignored = ("seed", "threads", "device")
    settings = {json.dumps({k: v for k, v in r.get("settings", {}).items() if k not in ignored}, sort_keys=True) for r in results}
    lines = [f"settings (seeds aside): {s}" for s in sorted(settings)]
    if len(settings) > 1:
        lines.insert(0, "WARNING: the runs differ in more than the seed; the rows below mix these settings:")
    for datalist in sorted({Path(r["datalist"]).name for r in results}):
        rows = [r for r in results if Path(r["datalist"]).name == datalist]
        lines += ["", f"**{datalist}**", "", "| method | runs | test Dice (mean ± std over runs) | per run | test IoU |", "|---|---|---|---|---|"]
        groups = {(r["row"], json.dumps(r.get("overrides", {}), sort_keys=True)) for r in rows}  # --set runs apart
        for row, overrides in sorted(groups, key=lambda g: (list(ROWS).index(g[0]), g[1])):
            picked = sorted(
                (r for r in rows if (r["row"], json.dumps(r.get("overrides", {}), sort_keys=True)) == (row, overrides)),
                key=lambda r: r.get("settings", {}).get("seed", 0),
            )
            label = row if json.loads(overrides) == ROWS[row][1] else f"{row} {overrides}"
            dice = np.array([r["test"]["metrics"]["dice"]["mean"] for r in picked])
            iou = np.array([r["test"]["metrics"]["iou"]["mean"] for r in picked])
            per_run = ", ".join(f"{d:.3f}" for d in dice)
            lines.append(f"| {label} | {len(picked)} | {dice.mean():.3f} ± {dice.std():.3f} | {per_run} | {iou.mean():.3f} ± {iou.std():.3f} |")
    return "\n".join(lines).strip()


def main(argv: list[str] | None = None) -> int:
    """Run every (datalist, row) in a fresh process, then write the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalists", nargs="+", type=Path,
                        default=[REPO_ROOT / "datalists" / "busi_2.5pct.json", REPO_ROOT / "datalists" / "busi_10pct.json"])
    parser.add_argument("--dataset-dir", default=str(REPO_ROOT / "data" / "busi"))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--val-every", type=int, default=50, help="iterations between validations (= epoch_length)")
    parser.add_argument("--stwp-iterations", type=int, default=400, help="static-teacher warm-up iterations")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of every row and of the warm-up")
    parser.add_argument("--appg-precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "benchmark_dual_teacher"))
    parser.add_argument("--appg-dir", help="APPG pseudo-label store (default: <out>/shared/appg); runs with other "
                        "seeds can share one, it is locked while in use")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=JSON",
                        help="extra train.json overrides for every row, e.g. consistency_weight=0 joint_batch=false")
    parser.add_argument("--seeds-summary", nargs="+", type=Path, metavar="OUT",
                        help="print mean ± std over these --out folders (one per seed) of each row, then exit")
    parser.add_argument("--tables-only", action="store_true", help="rebuild results.md/json from the rows on disk and exit")
    parser.add_argument("--worker", nargs=2, metavar=("ROW", "DATALIST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.set = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    except ValueError as err:
        parser.error(f"--set takes KEY=JSON items (e.g. consistency_weight=0): {err}")
    if args.iterations % args.val_every:
        parser.error("--iterations must be a multiple of --val-every")
    out = Path(args.out)
    if args.worker:
        row, datalist = args.worker
        result = run_worker(row, Path(datalist), args)
        target = out / Path(datalist).stem / row.lstrip("+") / "result.json"
        target.write_text(json.dumps(result, indent=2))
        return 0
    if args.seeds_summary:
        print(seeds_summary(args.seeds_summary))
        return 0
    if args.tables_only:
        print(write_tables(out, args))
        return 0
    ensure_busi(args)  # prepares data/busi from ../shared/data when missing
    passthrough = argv if argv is not None else sys.argv[1:]
    cmdline = "python scripts/benchmark_dual_teacher.py " + " ".join(passthrough)
    for datalist in args.datalists:
        for row in args.rows:
            folder = out / datalist.stem / row.lstrip("+")
            for stale in ("runs/resume.pt", "models/model.pt", "result.json"):  # each row trains from scratch
                (folder / stale).unlink(missing_ok=True)
            folder.mkdir(parents=True, exist_ok=True)
            print(f"== {datalist.name}: {row}", flush=True)
            subprocess.run([sys.executable, __file__, "--worker", row, str(datalist), *passthrough], check=True)
            result = json.loads((folder / "result.json").read_text())
            atomic_write(folder / "result.json", json.dumps({**result, "command": cmdline}, indent=2))
            text = write_tables(out, args)  # after every row: partial results survive an interruption
    print(f"\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
