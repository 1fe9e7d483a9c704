#!/usr/bin/env python
"""Sliding-window inference of the dual-network 3D model: the project's MONAI inferer against the
authors' plain per-window loop, on one real LA volume, in one run; plus peak training memory of
one step at the paper's crop and batch.

Prints: both outputs' max absolute difference, each method's wall time and their ratio, and
(in a subprocess, so the figure is the step's own) the peak memory of one training step of
``DualNetwork3DObjective`` with 2 labelled + 2 unlabelled crops of 112x112x80 (resident memory
on CPU; allocated GPU memory and the median time of a few steps on CUDA).
The network has random (seeded) weights: speed and equality do not depend on training.
On CUDA the loop keeps the authors' per-window copy of the probabilities to host memory; each
timing follows one untimed warm-up pass, with the GPU synchronised before the clock is read;
``--amp`` adds a float16-autocast row for the MONAI inferer (compared with the float32 loop).

    python scripts/benchmark_dual_network_3d_inference.py                 # first LA volume, CPU
    python scripts/benchmark_dual_network_3d_inference.py --device cuda --amp
    python scripts/benchmark_dual_network_3d_inference.py --volume path/to/la_X.nii.gz --skip-train-memory
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def load_volume(path: Path):
    """``(1, 1, X, Y, Z)`` float32 tensor, z-scored (as the LA community data)."""
    import nibabel as nib
    import torch

    data = torch.as_tensor(nib.load(str(path)).get_fdata(dtype="float32"))
    data = (data - data.mean()) / data.std().clamp_min(1e-6)
    return data[None, None]


def default_volume() -> Path:
    """The first LA image in ../shared/data (or a prepared data/la)."""
    for folder in (REPO_ROOT.parent / "shared" / "data" / "la_heart" / "imagesTr", REPO_ROOT / "data" / "la" / "imagesTr"):
        files = sorted(folder.glob("*.nii.gz")) if folder.is_dir() else []
        if files:
            return files[0]
    sys.exit("no LA volume found: pass --volume (a NIfTI file)")


def train_step_memory(crop: tuple[int, int, int], batch: int, amp: bool, device: str = "cpu", steps: int = 1) -> None:
    """``steps`` training steps of the dual-network objective; prints the time and peak memory."""
    import statistics
    from types import SimpleNamespace

    import torch

    from monai_ssl.engines import autocast_context
    from monai_ssl.methods import DualNetwork3DObjective
    from monai_ssl.networks import DualNetwork3D

    dev = torch.device(device)
    torch.manual_seed(0)
    net = DualNetwork3D().to(dev).train()
    objective = DualNetwork3DObjective()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and dev.type == "cuda")
    x_l = torch.randn(batch, 1, *crop, device=dev)
    y_l = (torch.rand(batch, 1, *crop, device=dev) > 0.9).float()
    x_u = torch.randn(batch, 1, *crop, device=dev)
    engine = SimpleNamespace(network=net, state=SimpleNamespace(iteration=1, epoch=1))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for step in range(steps):
        engine.state.iteration = step + 1
        _sync(dev)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(dev, amp):
            out = objective(engine, {"image": x_l, "label": y_l}, {"image": x_u})
            loss = sum(v.float() for k, v in out.items() if k.startswith("loss_"))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times[1:] or times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    where = f"peak RSS {peak:.0f} MiB (model and imports before the step: {before:.0f} MiB)"
    if dev.type == "cuda":
        where = f"peak GPU memory allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB on {torch.cuda.get_device_name()}"
    print(f"training step, crop {crop}, batch {batch}+{batch}, amp={amp}, {device}: {seconds:.2f} s "
          f"(median of {max(len(times) - 1, 1)} step(s)), {where}")


def _sync(device) -> None:
    """Wait for the GPU's queued work so that a wall clock measures it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    """``(result, seconds)`` of ``fn()``; on CUDA after one untimed warm-up call, synchronised."""
    if device.type == "cuda":
        fn()
        _sync(device)
    t0 = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - t0


def _compare(reference, other, label: str) -> None:
    """Print the max absolute difference of two probability maps and how many argmax labels agree."""
    diff = (reference - other).abs().max().item()
    same = (reference.argmax(1) == other.argmax(1)).float().mean().item()
    print(f"{label}: max |difference| of the probability maps {diff:.2e}; identical argmax labels on {same:.4%} of voxels")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volume", type=Path, default=None)
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--skip-train-memory", action="store_true")
    parser.add_argument("--amp", action="store_true",
                        help="autocast (bf16 on CPU, fp16 on CUDA) for the training step, and an extra inferer row")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--train-steps", type=int, default=None, help="training steps to time (default 1 on CPU, 6 on CUDA)")
    parser.add_argument("--train-memory-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = args.train_steps or (6 if args.device == "cuda" else 1)
    if args.train_memory_worker:
        train_step_memory((112, 112, 80), 2, args.amp, args.device, steps)
        return 0

    import torch

    from monai_ssl.inference import SLIDING_WINDOW_PRESETS, dual_sliding_window_inference, naive_sliding_window
    from monai_ssl.networks import DualNetwork3D

    from monai_ssl.engines import autocast_context

    device = torch.device(args.device)
    volume = args.volume or default_volume()
    image = load_volume(volume).to(device)
    preset = SLIDING_WINDOW_PRESETS["LA"]
    torch.manual_seed(0)
    net = DualNetwork3D().to(device).eval()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"volume {volume.name} {tuple(image.shape[2:])}, LA preset window {preset.roi_size} stride {preset.stride}, {where}")
    with torch.no_grad():
        naive, t_naive = _timed(lambda: naive_sliding_window(net, image, preset.roi_size, preset.stride, score_device="cpu"), device)
        ours, t_ours = _timed(lambda: dual_sliding_window_inference(net, image, "LA", sw_batch_size=args.sw_batch_size), device)
    ours = ours.cpu()
    print(f"naive per-window loop (float32): {t_naive:.2f} s; MONAI SlidingWindowInferer (sw_batch_size "
          f"{args.sw_batch_size}, float32): {t_ours:.2f} s; speed-up {t_naive / t_ours:.2f}x")
    _compare(naive, ours, "float32 inferer vs loop")
    if args.amp:
        def _mixed():
            with autocast_context(device, True):
                return dual_sliding_window_inference(net, image, "LA", sw_batch_size=args.sw_batch_size).float()

        with torch.no_grad():
            mixed, t_mixed = _timed(_mixed, device)
        print(f"MONAI SlidingWindowInferer with autocast ({'fp16' if device.type == 'cuda' else 'bf16'}): "
              f"{t_mixed:.2f} s; speed-up over the float32 loop {t_naive / t_mixed:.2f}x")
        _compare(naive, mixed.cpu(), "autocast inferer vs float32 loop")
    if not args.skip_train_memory:
        cmd = [sys.executable, __file__, "--train-memory-worker", "--device", args.device, "--train-steps", str(steps)]
        subprocess.run(cmd + (["--amp"] if args.amp else []), check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
