#!/usr/bin/env python
"""Training-step time and peak memory of the 2D U-Net per encoder, as a ratio to the first encoder in the same run.

One step = forward + backward (BCE + Dice) + Adam on a batch of ``--batch`` grey images, under
the bundles' CPU setting (bf16 autocast, channels-last) unless ``--fp32``. Each encoder runs in a
subprocess of its own, so the peak RSS figure is that encoder's; encoders alternate over
``--rounds`` rounds so a drift of the machine's speed hits them alike.

    python scripts/benchmark_encoder_step.py                       # 128 px, batch 8, 2 threads
    python scripts/benchmark_encoder_step.py --size 224 --encoders resnet34 efficientnet-lite0
    python scripts/benchmark_encoder_step.py --size 256 --encoders resnet34 litemedsam
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

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

ENCODERS = ("resnet34", "efficientnet-lite0", "litemedsam")


def worker(encoder: str, args: argparse.Namespace) -> dict:
    """Time ``args.steps`` training steps (after 2 warm-up steps) of one encoder's U-Net."""
    import torch
    from monai.losses import DiceCELoss

    from monai_ssl.networks import EncoderUNet

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = None if encoder == "resnet34" else "pretrained"
    net = EncoderUNet(encoder, weights).train()
    amp = not args.fp32
    if amp:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(sigmoid=True)
    x = torch.rand(args.batch, 1, args.size, args.size)
    y = (torch.rand(args.batch, 1, args.size, args.size) > 0.7).float()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "encoder": encoder,
        "parameters": sum(p.numel() for p in net.parameters()),
        "step_s": times,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    """Run every encoder in its own process, alternating, and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=["resnet34", "efficientnet-lite0"], choices=ENCODERS)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--fp32", action="store_true", help="float32 instead of bf16 autocast")
    parser.add_argument("--worker", choices=ENCODERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0
    if "litemedsam" in args.encoders and args.size != 256:
        parser.error("the litemedsam encoder takes 256 x 256 inputs: use --size 256")
    results: dict[str, dict] = {}
    for _ in range(args.rounds):
        for enc in args.encoders:
            cmd = [sys.executable, __file__, "--worker", enc, "--size", str(args.size), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--threads", str(args.threads)] + (["--fp32"] if args.fp32 else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"encoder {enc} failed:\n{done.stderr[-2000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            prev = results.setdefault(enc, {**row, "step_s": []})
            prev["step_s"] += row["step_s"]
            prev["peak_rss_mib"] = max(prev["peak_rss_mib"], row["peak_rss_mib"])
    base = statistics.median(results[args.encoders[0]]["step_s"])
    precision = "fp32" if args.fp32 else "bf16 autocast"
    print(f"{args.size} px, batch {args.batch}, {args.threads} threads, {precision}, "
          f"{args.rounds} x {args.steps} timed steps per encoder")
    print(f"| encoder | parameters | median s/step | ratio to {args.encoders[0]} | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for enc, row in results.items():
        med = statistics.median(row["step_s"])
        print(f"| {enc} | {row['parameters'] / 1e6:.2f} M | {med:.3f} | {med / base:.2f} | {row['peak_rss_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
