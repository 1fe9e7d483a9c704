#!/usr/bin/env python
"""Sliding-window inference of the dual-network 3D model: the project's MONAI inferer against the
authors' plain per-window loop, on one real LA volume, in one run; plus peak training memory of
one step at the paper's crop and batch.

Prints: both outputs' max absolute difference, each method's wall time and their ratio, and
(in a subprocess, so the figure is the step's own) the peak resident memory of one training step
of ``DualNetwork3DObjective`` with 2 labelled + 2 unlabelled crops of 112x112x80.
The network has random (seeded) weights: speed and equality do not depend on training.

    python scripts/benchmark_dual_network_3d_inference.py                 # first LA volume
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


def train_step_memory(crop: tuple[int, int, int], batch: int, amp: bool) -> None:
    """One training step of the dual-network objective; prints the process's peak RSS."""
    import torch
    from types import SimpleNamespace

    from monai_ssl.engines import autocast_context
    from monai_ssl.methods import DualNetwork3DObjective
    from monai_ssl.networks import DualNetwork3D

    torch.manual_seed(0)
    net = DualNetwork3D().train()
    objective = DualNetwork3DObjective()
    x_l = torch.randn(batch, 1, *crop)
    y_l = (torch.rand(batch, 1, *crop) > 0.9).float()
    x_u = torch.randn(batch, 1, *crop)
    engine = SimpleNamespace(network=net, state=SimpleNamespace(iteration=1, epoch=1))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    with autocast_context(torch.device("cpu"), amp):
        out = objective(engine, {"image": x_l, "label": y_l}, {"image": x_u})
        loss = sum(v.float() for k, v in out.items() if k.startswith("loss_"))
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"training step, crop {crop}, batch {batch}+{batch}, amp={amp}: {seconds:.1f} s, "
          f"peak RSS {peak:.0f} MiB (model and imports before the step: {before:.0f} MiB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volume", type=Path, default=None)
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--skip-train-memory", action="store_true")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for the training-memory step")
    parser.add_argument("--train-memory-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train_memory_worker:
        train_step_memory((112, 112, 80), 2, args.amp)
        return 0

    import torch

    from monai_ssl.inference import SLIDING_WINDOW_PRESETS, dual_sliding_window_inference, naive_sliding_window
    from monai_ssl.networks import DualNetwork3D

    volume = args.volume or default_volume()
    image = load_volume(volume)
    preset = SLIDING_WINDOW_PRESETS["LA"]
    torch.manual_seed(0)
    net = DualNetwork3D().eval()
    print(f"volume {volume.name} {tuple(image.shape[2:])}, LA preset window {preset.roi_size} stride {preset.stride}, "
          f"{torch.get_num_threads()} threads")
    with torch.no_grad():
        t0 = time.perf_counter()
        naive = naive_sliding_window(net, image, preset.roi_size, preset.stride, score_device="cpu")
        t_naive = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = dual_sliding_window_inference(net, image, "LA", sw_batch_size=args.sw_batch_size)
        t_ours = time.perf_counter() - t0
    diff = (naive - ours).abs().max().item()
    same_labels = (naive.argmax(1) == ours.argmax(1)).float().mean().item()
    print(f"naive per-window loop: {t_naive:.1f} s; MONAI SlidingWindowInferer (sw_batch_size {args.sw_batch_size}): "
          f"{t_ours:.1f} s; speed-up {t_naive / t_ours:.2f}x")
    print(f"max |difference| of the probability maps {diff:.2e}; identical argmax labels on {same_labels:.4%} of voxels")
    if not args.skip_train_memory:
        cmd = [sys.executable, __file__, "--train-memory-worker"] + (["--amp"] if args.amp else [])
        subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
