#!/usr/bin/env python
"""CPU-scale benchmark of the `dual_network_3d` bundle against a supervised V-Net on the real LA volumes.

Both methods get the same labelled cases (a ``datalists/la_*pct.json`` split), the same random
crop size, the same iteration budget, SGD (lr 0.01, momentum 0.9, weight decay 1e-4) with the
paper's step schedule scaled to the budget (x0.1 after ``2500/6000`` of the iterations) and
bf16 autocast. The dual network is trained through the bundle's ``train.json``
(``ConfigWorkflow``, the code path of ``python -m monai.bundle run``) with 2 labelled + 2
unlabelled crops per step and its PGL ramp scaled to the budget; the V-Net baseline is
subnet B alone, trained on the 2 labelled crops of each step with the same CE + Dice loss.
The final weights of each are evaluated on the test split with the authors' sliding window
(here a smaller window and stride; the dual network averages both subnets' softmax), and
per-case Dice / Jaccard / HD95 / ASD (voxels) are reported as mean ± population std, with the
median seconds per training iteration and the peak resident memory of each method's process.

Each method runs in a subprocess of its own (so peak RSS is per method). Outputs go to
``--out`` (default ``runs/benchmark_dual_network_3d/``): ``results.json``, ``results.md`` and
per-case CSVs. Example (the run reported in ``bundles/dual_network_3d/docs/README.md``)::

    OMP_NUM_THREADS=1 nohup taskset -c 0 python scripts/benchmark_dual_network_3d.py --iterations 200 \
        > runs/benchmark_dual_network_3d.log 2>&1

LA must be prepared first (done automatically from ../shared/data/la_heart when present):
``python scripts/prepare_data.py la_nifti --src ../shared/data/la_heart --out data/la``.
"""

from __future__ import annotations

import argparse
import csv
import io
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

METHODS = ("dual_network_3d", "supervised_vnet", "dual_network_3d_code", "dual_network_3d_rampup", "dual_network_3d_ue_sharp2way")
#: The bundle's settings per dual-network variant: the paper's losses (default), the authors' code, or the
#: paper's losses with the unsupervised terms ramped up over the whole budget (``unsup_rampup``; the
#: authors ramp their consistency weight over all 6000 iterations: 40 "epochs" of 150), or the paper's
#: losses with the UE of earlier versions' paper mode (both directions, sharpened teacher in the KL).
DUAL_VARIANTS: dict[str, dict[str, Any]] = {
    "dual_network_3d": {},
    "dual_network_3d_code": {"code_faithful": True},
    "dual_network_3d_rampup": {"unsup_rampup": "iterations"},
    "dual_network_3d_ue_sharp2way": {"kl_bidirectional": True, "kl_sharpened": True},
}
METRICS = ("dice", "iou", "hd95", "asd")
CONFIGS = REPO_ROOT / "bundles" / "dual_network_3d" / "configs"


def _progress(total: int, desc: str):
    """A tqdm bar on stderr (plain-text fallback)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="it", mininterval=10.0, file=sys.stderr)


def _attach_timer(trainer: Any, desc: str) -> list[float]:
    """Record each iteration's wall time on ``trainer`` and drive a progress bar; returns the list."""
    from ignite.engine import Events

    times: list[float] = []
    started = [0.0]
    bar = _progress(trainer.state.max_epochs * trainer.state.epoch_length, desc)

    def _start(_e: Any) -> None:
        started[0] = time.perf_counter()

    def _done(e: Any) -> None:
        times.append(time.perf_counter() - started[0])
        bar.update(1)
        bar.set_postfix(loss=f"{float(e.state.output['loss']):.3f}", s_it=f"{times[-1]:.2f}")

    trainer.add_event_handler(Events.ITERATION_STARTED, _start)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, _done)
    trainer.add_event_handler(Events.COMPLETED, lambda _e: bar.close())
    return times


def _lr_step(args: argparse.Namespace) -> int:
    return max(1, round(args.iterations * 2500 / 6000))


def train_dual(args: argparse.Namespace, out: Path, method: str = "dual_network_3d") -> tuple[Any, list[float]]:
    """Train the bundle's dual network (``method`` picks :data:`DUAL_VARIANTS`); return (the DualNetwork3D, seconds per iteration)."""
    from monai.bundle import ConfigWorkflow

    variant = {k: (args.iterations if v == "iterations" else v) for k, v in DUAL_VARIANTS[method].items()}
    wf = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"), meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"), workflow_type="train",
        bundle_root=str(out), dataset_dir=str(Path(args.dataset_dir).resolve()), datalist=str(Path(args.datalist).resolve()),
        crop_size=list(args.crop), max_iterations=args.iterations, epoch_length=args.iterations,
        val_interval=10**6,  # no validation: the final weights are evaluated
        lr_step_size=_lr_step(args), pgl_step_size=max(1, args.iterations // 40), amp=args.amp, seed=args.seed,
        device=f"$torch.device('{args.device}')", **variant,
    )
    wf.initialize()
    times = _attach_timer(wf.trainer, f"{method} train")
    wf.run()
    return wf.parser.get_parsed_content("network"), times


def train_vnet(args: argparse.Namespace, out: Path) -> tuple[Any, list[float]]:
    """Train a supervised V-Net (subnet B) on the labelled crops only; return (net, per-iteration seconds)."""
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.handlers import LrScheduleHandler
    from monai.utils import set_determinism

    from monai_ssl.bundle import segmentation_transforms_3d
    from monai_ssl.data import load_datalist
    from monai_ssl.engines import SemiSupervisedTrainer
    from monai_ssl.losses.dual_3d import supervised_loss
    from monai_ssl.methods import SupervisedObjective
    from monai_ssl.networks import VNet3D

    set_determinism(seed=args.seed)
    data = load_datalist(args.datalist, args.dataset_dir, "labeled")
    ds = CacheDataset(data, segmentation_transforms_3d(crop_size=args.crop), cache_rate=1.0, progress=False)
    loader = DataLoader(ds, batch_size=2, shuffle=True, drop_last=len(ds) > 2, num_workers=0)
    net = VNet3D().to(args.device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=_lr_step(args), gamma=0.1)
    trainer = SemiSupervisedTrainer(
        device=torch.device(args.device), max_epochs=1, epoch_length=args.iterations, train_data_loader=loader, network=net,
        optimizer=opt, objective=SupervisedObjective(supervised_loss), unlabeled_data_loader=None, amp=args.amp,
        decollate=False, train_handlers=[LrScheduleHandler(sched, epoch_level=False, print_lr=False)],
    )
    times = _attach_timer(trainer, "supervised_vnet train")
    trainer.run()
    return net, times


def evaluate(net: Any, method: str, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """Sliding-window test-split metrics of ``net`` (final weights), one record per case."""
    import torch
    from torch.nn import functional as F
    from tqdm import tqdm

    from monai_ssl.bundle import sliding_window_inferer_3d, validation_transforms_3d
    from monai_ssl.data import load_datalist
    from monai_ssl.evaluation import case_metrics
    from monai_ssl.networks import DualNetwork3D

    net = net.eval()
    amp_dtype = torch.bfloat16 if args.device == "cpu" else torch.float16
    predictor = (lambda x: net(x).float()) if isinstance(net, DualNetwork3D) else (lambda x: F.softmax(net(x).float(), dim=1))
    inferer = sliding_window_inferer_3d(roi_size=args.roi, stride=args.stride, sw_batch_size=args.sw_batch_size)
    transform = validation_transforms_3d()
    records = []
    cases = load_datalist(args.datalist, args.dataset_dir, "test")[: args.max_test_cases]
    for item in tqdm(cases, desc=f"{method} test", unit="case", file=sys.stderr):
        case = transform(item)
        image = case["image"].as_tensor()[None].to(args.device)
        with torch.no_grad(), torch.autocast(args.device, dtype=amp_dtype, enabled=args.amp):
            prob = inferer(image, predictor)
        pred = prob.argmax(dim=1)[0].cpu().numpy()
        truth = case["label"].as_tensor()[0].numpy() > 0.5
        spacing = [float(s) for s in case["image"].meta["pixdim"][1:4]]
        case_id = Path(str(item["image"])).name.removesuffix(".nii.gz")
        records.append({"case_id": case_id, **case_metrics(pred, truth, spacing)})
    return records


def run_worker(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train and evaluate one method in this process; return its results."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out) / method
    if out.exists():  # a fresh run: the bundle would otherwise resume (or skip) from an earlier run's checkpoint
        shutil.rmtree(out)
    t0 = time.perf_counter()
    net, times = train_dual(args, out, method) if method in DUAL_VARIANTS else train_vnet(args, out)
    train_wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    records = evaluate(net, method, args, out)
    eval_wall = time.perf_counter() - t1
    summary = {
        m: {"mean": float(np.mean([r[m] for r in records])), "std": float(np.std([r[m] for r in records]))}
        for m in (*METRICS, "hd95_mm", "asd_mm")
    }
    return {
        "method": method,
        "iterations": len(times),
        "s_per_iter_median": float(np.median(times[5:] or times)),
        "train_wall_s": train_wall,
        "eval_wall_s": eval_wall,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "n_test_cases": len(records),
        "empty_predictions": sum(r["empty_case"] == "pred_empty" for r in records),
        "summary": summary,
        "cases": records,
    }


def ensure_la(args: argparse.Namespace) -> None:
    """Prepare data/la from ../shared/data/la_heart when the datalist's files are missing."""
    datalist = json.loads(Path(args.datalist).read_text())
    first = Path(args.dataset_dir) / datalist["test"][0]["image"]
    if first.is_file():
        return
    src = REPO_ROOT.parent / "shared" / "data" / "la_heart"
    if not src.is_dir():
        raise SystemExit(f"{first} is missing and {src} does not exist: prepare LA first (see --help)")
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "prepare_data.py"), "la_nifti", "--src", str(src), "--out", args.dataset_dir]
    subprocess.run(cmd, check=True)


def _fmt(summary: dict[str, Any], metric: str, scale: float = 1.0) -> str:
    s = summary[metric]
    return f"{scale * s['mean']:.2f} ± {scale * s['std']:.2f}"


def _gpu_text(result: dict[str, Any]) -> str:
    peak = result.get("peak_gpu_mib")
    return "-" if peak is None else f"{peak:.0f}"


def _device_text(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Where the rows ran and in which precision."""
    if args.device == "cuda":
        names = sorted({str(r.get("device", "cuda")) for r in results})
        return f"{', '.join(names)}, fp16 autocast {'on' if args.amp else 'off'}"
    return f"CPU, bf16 autocast {'on' if args.amp else 'off'}, {args.threads} thread(s)"


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The Markdown table of all methods."""
    lines = [
        f"LA, {Path(args.datalist).name}, {args.iterations} iterations, crop {'x'.join(map(str, args.crop))}, "
        f"{_device_text(results, args)}; test split, final weights, "
        f"sliding window {'x'.join(map(str, args.roi))} stride {'x'.join(map(str, args.stride))}",
        "",
        "| method | Dice % | Jaccard % | HD95 (vox) | ASD (vox) | HD95 (mm) | ASD (mm) | s/iter | peak RSS (MiB) "
        "| peak GPU (MiB) | empty preds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["summary"]
        lines.append(
            f"| {r['method']} | {_fmt(s, 'dice', 100)} | {_fmt(s, 'iou', 100)} | {_fmt(s, 'hd95')} | {_fmt(s, 'asd')} "
            f"| {_fmt(s, 'hd95_mm')} | {_fmt(s, 'asd_mm')} | {r['s_per_iter_median']:.2f} | {r['peak_rss_mib']:.0f} "
            f"| {_gpu_text(r)} "
            f"| {r['empty_predictions']}/{r['n_test_cases']} |"
        )
    return "\n".join(lines)


def _write_cases(path: Path, records: list[dict[str, Any]]) -> None:
    from monai_ssl.utils import atomic_write

    buf = io.StringIO()
    keys = list(records[0])
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(records)
    atomic_write(path, buf.getvalue())


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=200, help="training iterations per method")
    p.add_argument("--crop", type=int, nargs=3, default=[64, 64, 48], help="random crop (divisible by 16)")
    p.add_argument("--roi", type=int, nargs=3, default=[64, 64, 48], help="sliding window at test time")
    p.add_argument("--stride", type=int, nargs=3, default=[48, 48, 40], help="sliding-window stride")
    p.add_argument("--sw-batch-size", type=int, default=2)
    p.add_argument("--datalist", default=str(REPO_ROOT / "datalists" / "la_10pct.json"))
    p.add_argument("--dataset-dir", default=str(REPO_ROOT / "data" / "la"))
    p.add_argument("--out", default=str(REPO_ROOT / "runs" / "benchmark_dual_network_3d"))
    p.add_argument("--max-test-cases", type=int, default=None, help="evaluate only the first N test cases (quick checks)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-amp", dest="amp", action="store_false",
                   help="train and infer in float32 (default: bf16 autocast on CPU, fp16 autocast + loss scaling on CUDA)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--methods", nargs="+", default=list(METHODS[:2]), choices=METHODS,
                   help="dual_network_3d (paper losses), supervised_vnet, dual_network_3d_code (code_faithful), "
                   "dual_network_3d_rampup (paper losses, unsupervised terms ramped up over the budget), "
                   "dual_network_3d_ue_sharp2way (paper losses, UE two-way with the sharpened teacher in the KL)")
    p.add_argument("--reuse", action="store_true", help="reuse a method's <out>/<method>.json from an earlier run")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run every method in its own subprocess, then print and write the table."""
    args = build_parser().parse_args(argv)
    if args.worker:
        result = run_worker(args.worker, args)
        from monai_ssl.utils import atomic_write

        atomic_write(args.worker_out, json.dumps(result, indent=2))
        return 0
    ensure_la(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--methods")]
    passthrough = [a for a in passthrough if a not in METHODS and a != "--reuse"]
    for method in args.methods:
        worker_out = out / f"{method}.json"
        cmd = [sys.executable, __file__, *passthrough, "--worker", method, "--worker-out", str(worker_out)]
        if args.reuse and worker_out.is_file():
            print(f"== {method}: reusing {worker_out}", flush=True)
        else:
            print(f"== {method}: {' '.join(cmd)}", flush=True)
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            subprocess.run(cmd, check=True, env=env)
        result = json.loads(worker_out.read_text())
        _write_cases(out / f"{method}_cases.csv", result["cases"])
        results.append(result)
        print(f"== {method}: {result['s_per_iter_median']:.2f} s/iter, test Dice "
              f"{100 * result['summary']['dice']['mean']:.2f}", flush=True)
    from monai_ssl.utils import atomic_write

    table = report(results, args)
    atomic_write(out / "results.md", table + "\n")
    atomic_write(out / "results.json", json.dumps({"args": vars(args), "results": results}, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
