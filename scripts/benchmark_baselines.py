#!/usr/bin/env python
"""Benchmark the `supervised` and `mean_teacher` bundles on BUSI under one fixed iteration budget.

For each method, in a subprocess of its own (so peak memory is per method), this script trains
the bundle through ``ConfigWorkflow`` (the same code path as ``python -m monai.bundle run``),
selects ``models/model.pt`` on validation Dice, evaluates it on the validation and test splits,
and times the training steps. In the same run it measures the CPU's bf16 and fp32 matmul peak,
counts the FLOPs of one training step, and (for mean teacher) times the parts of a step on their
own: student forward+backward on the joint batch and teacher forward on the unlabelled half,
plus the optimiser step and EMA update. It prints a Markdown table and writes ``results.json``.

    python scripts/benchmark_baselines.py                      # BUSI 10 %, 128 px, 3000 iterations
    python scripts/benchmark_baselines.py --iterations 200 --val-every 100   # a quick look

BUSI must be prepared first (done automatically from ../shared/data when that folder exists):
``python scripts/prepare_data.py busi --src ../shared/data/busi/Dataset_BUSI_with_GT --out data/busi``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

METHODS = ("supervised", "mean_teacher")


def matmul_peak_tflops(dtype_name: str, n: int = 2048, reps: int = 10) -> float:
    """Best-of-3 dense ``n x n`` matmul throughput in TFLOP/s for ``dtype_name`` (bfloat16/float32)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.rand(n, n, dtype=dtype), torch.rand(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return reps * 2 * n**3 / best / 1e12


def _median_time(fn, reps: int = 7) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_parts(wf: Any) -> dict[str, float]:
    """Time the parts of one training step in isolation, with the trainer's AMP / memory settings."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from monai_ssl.engines import autocast_context

    trainer = wf.trainer
    net, device = trainer.network, trainer.state.device
    labeled = next(iter(trainer.data_loader))
    x_l = trainer._to_device(labeled["image"])
    has_teacher = trainer.unlabeled_data_loader is not None
    x_u = trainer._to_device(next(iter(trainer.unlabeled_data_loader))["image"]) if has_teacher else None
    x_joint = torch.cat([x_l, x_u]) if has_teacher else x_l

    def fwd_bwd() -> None:
        with autocast_context(device, trainer.amp):
            loss = net(x_joint).float().mean()
        loss.backward()
        net.zero_grad(set_to_none=True)

    parts = {"student_fwd_bwd": _median_time(fwd_bwd)}
    with FlopCounterMode(display=False) as counter:
        fwd_bwd()
    flops = counter.get_total_flops()
    if has_teacher:
        teacher = wf.parser.get_parsed_content("teacher")

        @torch.no_grad()
        def teacher_fwd() -> None:
            with autocast_context(device, trainer.amp):
                teacher(x_u)

        parts["teacher_fwd"] = _median_time(teacher_fwd)
        with FlopCounterMode(display=False) as counter:
            teacher_fwd()
        flops += counter.get_total_flops()
        ema = next(h for h in wf.parser.get_parsed_content("train#handlers") if type(h).__name__ == "EMATeacher")
        parts["ema_update"] = _median_time(lambda: ema.update(10_000))
    # timed last: these steps move the in-memory weights; evaluation reloads models/model.pt from disk
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    parts["optimizer_step"] = _median_time(trainer.optimizer.step)
    parts["step_flops"] = float(flops)
    return parts


def run_worker(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train, evaluate and time one method in this process; return its results."""
    import numpy as np
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    torch.set_num_threads(args.threads)
    configs = REPO_ROOT / "bundles" / method / "configs"
    out = Path(args.out) / method
    common = {
        "bundle_root": str(out),
        "dataset_dir": str(Path(args.dataset_dir).resolve()),
        "datalist": str(Path(args.datalist).resolve()),
        "spatial_size": args.size,
        "seed": args.seed,
    }
    train_overrides = {
        **common,
        "max_epochs": args.iterations // args.val_every,
        "epoch_length": args.val_every,
        "learning_rate": args.lr,
        "val_interval": 1,
    }
    if method == "mean_teacher":
        train_overrides["consistency_rampup"] = int(0.4 * args.iterations)
    wf = ConfigWorkflow(
        config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"), workflow_type="train", **train_overrides,
    )
    wf.initialize()
    step_times: list[float] = []
    started: list[float] = []
    wf.trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: started.append(time.perf_counter()))
    wf.trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: step_times.append(time.perf_counter() - started[-1]))
    t0 = time.perf_counter()
    wf.run()
    train_wall = time.perf_counter() - t0
    parts = step_parts(wf)
    wf.finalize()
    best = wf.parser.get_parsed_content("validate#handlers")[1]

    results: dict[str, Any] = {
        "method": method,
        "iterations": len(step_times),
        "train_wall_s": train_wall,
        "step_s_median": float(np.median(step_times[10:] or step_times)),
        "step_s_mean": float(np.mean(step_times)),
        "best_val_dice_during_training": best.best,
        "best_epoch": best.best_epoch,
        "parts": parts,
    }
    for split in ("validation", "test"):
        ev = ConfigWorkflow(
            config_file=[str(configs / "train.json"), str(configs / "evaluate.json")],
            meta_file=str(configs / "metadata.json"), logging_file=str(configs / "logging.conf"),
            workflow_type="train", eval_split=split, eval_dir=str(out / f"eval_{split}"), **common,
        )
        ev.initialize()
        ev.run()
        ev.finalize()
        results[split] = json.loads((out / f"eval_{split}" / "metrics_summary.json").read_text())
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results


def ensure_busi(args: argparse.Namespace) -> None:
    """Prepare BUSI into ``--dataset-dir`` from ../shared/data when it is not there yet."""
    if (Path(args.dataset_dir) / "images").is_dir():
        return
    src = REPO_ROOT.parent / "shared" / "data" / "busi" / "Dataset_BUSI_with_GT"
    if not src.is_dir():
        sys.exit(f"{args.dataset_dir} is not prepared and {src} does not exist: prepare BUSI with scripts/prepare_data.py")
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "prepare_data.py"), "busi", "--src", str(src),
                    "--out", args.dataset_dir], check=True)


def fmt(summary: dict[str, Any], metric: str) -> str:
    m = summary["metrics"][metric]
    return f"{m['mean']:.4f} ± {m['std']:.4f}"


def report(results: list[dict[str, Any]], peaks: dict[str, float], args: argparse.Namespace) -> str:
    """The Markdown table of the benchmark."""
    lines = [
        f"BUSI {Path(args.datalist).name}, {args.size}x{args.size}, {args.iterations} iterations, "
        f"{args.threads} threads; matmul peak measured in this run: bf16 {peaks['bf16_tflops']:.3f} TFLOP/s, "
        f"fp32 {peaks['fp32_tflops']:.3f} TFLOP/s",
        "",
        "| method | val Dice | val IoU | val HD95 (px) | test Dice | test IoU | test HD95 (px) | s/iter | GFLOP/s (share of bf16 peak) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        gflops = r["parts"]["step_flops"] / r["step_s_median"] / 1e9
        share = gflops / (peaks["bf16_tflops"] * 1e3)
        lines.append(
            f"| {r['method']} | {fmt(r['validation'], 'dice')} | {fmt(r['validation'], 'iou')} | {fmt(r['validation'], 'hd95')} "
            f"| {fmt(r['test'], 'dice')} | {fmt(r['test'], 'iou')} | {fmt(r['test'], 'hd95')} | {r['step_s_median']:.3f} "
            f"| {gflops:.1f} ({share:.0%}) | {r['peak_rss_mib']:.0f} |"
        )
    for r in results:
        p = r["parts"]
        core = p["student_fwd_bwd"] + p.get("teacher_fwd", 0.0)
        full = core + p["optimizer_step"] + p.get("ema_update", 0.0)
        lines.append(
            f"\n{r['method']}: step {r['step_s_median']:.3f} s (median); parts: student fwd+bwd {p['student_fwd_bwd']:.3f} s"
            + (f", teacher fwd {p['teacher_fwd']:.3f} s, EMA update {p['ema_update']:.3f} s" if "teacher_fwd" in p else "")
            + f", optimiser step {p['optimizer_step']:.3f} s. Step / (fwd+bwd + teacher fwd) = {r['step_s_median'] / core:.3f}; "
            f"step / (all parts incl. optimiser and EMA) = {r['step_s_median'] / full:.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalist", default=str(REPO_ROOT / "datalists" / "busi_10pct.json"))
    parser.add_argument("--dataset-dir", default=str(REPO_ROOT / "data" / "busi"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--val-every", type=int, default=250, help="iterations between validations (= epoch_length)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "benchmark_baselines"))
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iterations % args.val_every:
        parser.error("--iterations must be a multiple of --val-every")
    out = Path(args.out)
    if args.worker:
        result = run_worker(args.worker, args)
        (out / args.worker / "result.json").write_text(json.dumps(result, indent=2))
        return 0
    ensure_busi(args)
    import torch

    torch.set_num_threads(args.threads)
    peaks = {"bf16_tflops": matmul_peak_tflops("bfloat16"), "fp32_tflops": matmul_peak_tflops("float32")}
    results = []
    for method in args.methods:
        (out / method).mkdir(parents=True, exist_ok=True)
        for stale in ("runs/resume.pt", "models/model.pt"):  # a benchmark always trains from scratch
            (out / method / stale).unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--worker", method, *(argv if argv is not None else sys.argv[1:])]
        subprocess.run(cmd, check=True)
        results.append(json.loads((out / method / "result.json").read_text()))
    text = report(results, peaks, args)
    cmdline = "python scripts/benchmark_baselines.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "results.json").write_text(json.dumps({"command": cmdline, "peaks": peaks, "results": results}, indent=2))
    (out / "results.md").write_text(f"`{cmdline}`\n\n{text}\n")
    print(f"\n`{cmdline}`\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
