"""Sliding-window inference of the dual-network 3D method, and the authors' per-window loop.

The authors' ``test_util.test_single_case`` zero-pads a volume smaller than the window
(``pad // 2`` before, the rest after), visits windows at ``min(i * stride, size - window)`` along
each axis (``ceil((size - window) / stride) + 1`` windows), averages the two subnets' softmax per
window, averages overlapping windows uniformly and crops the padding off. MONAI's
``SlidingWindowInferer`` with ``mode="constant"``, zero padding and a scan interval equal to the
stride visits the same windows and blends them the same way, so with :class:`DualNetwork3D`
(whose ``forward`` is that softmax average) as the predictor it computes the same map, batching
``sw_batch_size`` windows per forward pass. :func:`naive_sliding_window` is the plain loop, kept to
check equality and to measure the speed-up.

Window and stride are given in the order of the volume's spatial axes as the authors' h5 files
store them (x, y, z).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from monai.inferers import SlidingWindowInferer
from torch.nn import functional as F

__all__ = [
    "SlidingWindowPreset",
    "SLIDING_WINDOW_PRESETS",
    "stride_to_overlap",
    "make_sliding_window_inferer",
    "dual_sliding_window_inference",
    "naive_sliding_window",
]

Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SlidingWindowPreset:
    """A window size and a stride (voxels per spatial axis)."""

    roi_size: tuple[int, ...]
    stride: tuple[int, ...]


#: The paper's test-time windows and strides (Sec. 4.1) and the authors' test scripts.
SLIDING_WINDOW_PRESETS: dict[str, SlidingWindowPreset] = {
    "LA": SlidingWindowPreset(roi_size=(112, 112, 80), stride=(18, 18, 4)),
    "Pancreas": SlidingWindowPreset(roi_size=(96, 96, 96), stride=(16, 16, 16)),
    "BraTS": SlidingWindowPreset(roi_size=(96, 96, 96), stride=(64, 64, 64)),
}


def _resolve(preset: str | SlidingWindowPreset) -> SlidingWindowPreset:
    if isinstance(preset, SlidingWindowPreset):
        spec = preset
    elif preset in SLIDING_WINDOW_PRESETS:
        spec = SLIDING_WINDOW_PRESETS[preset]
    else:
        raise ValueError(f"unknown sliding-window preset {preset!r}; choose one of {sorted(SLIDING_WINDOW_PRESETS)}")
    if len(spec.roi_size) != len(spec.stride):
        raise ValueError(f"roi_size {spec.roi_size} and stride {spec.stride} have different lengths")
    for r, s in zip(spec.roi_size, spec.stride):
        if not 0 < s <= r:
            raise ValueError(f"each stride must be in [1, window]; got stride {spec.stride} for window {spec.roi_size}")
    return spec


def stride_to_overlap(roi_size: Sequence[int], stride: Sequence[int]) -> tuple[float, ...]:
    """Per-axis MONAI ``overlap`` giving scan interval ``int(roi * (1 - overlap)) == stride`` exactly.

    Uses ``1 - (stride + 0.5) / roi`` so that floating-point rounding cannot drop the interval
    to ``stride - 1``; 0 when the stride equals the window.
    """
    spec = _resolve(SlidingWindowPreset(tuple(roi_size), tuple(stride)))
    overlap = tuple(0.0 if s == r else 1.0 - (s + 0.5) / r for r, s in zip(spec.roi_size, spec.stride))
    for r, s, o in zip(spec.roi_size, spec.stride, overlap):
        if int(r * (1 - o)) != s:  # guards the identity above
            raise ValueError(f"cannot express stride {s} for window {r} as a MONAI overlap")
    return overlap


def make_sliding_window_inferer(
    preset: str | SlidingWindowPreset = "LA",
    sw_batch_size: int = 4,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> SlidingWindowInferer:
    """A ``SlidingWindowInferer`` visiting the authors' windows, uniform blending, zero padding.

    Args:
        preset: ``"LA"``, ``"Pancreas"``, ``"BraTS"`` or a :class:`SlidingWindowPreset`.
        sw_batch_size: windows per forward pass.
        sw_device: device the windows are run on (default: the input's).
        device: device of the stitched output (default: the input's).
        progress: show a progress bar.
    """
    spec = _resolve(preset)
    return SlidingWindowInferer(
        roi_size=spec.roi_size,
        sw_batch_size=sw_batch_size,
        overlap=stride_to_overlap(spec.roi_size, spec.stride),
        mode="constant",
        padding_mode="constant",
        cval=0.0,
        sw_device=sw_device,
        device=device,
        progress=progress,
    )


def dual_sliding_window_inference(
    network: Predictor,
    image: torch.Tensor,
    preset: str | SlidingWindowPreset = "LA",
    sw_batch_size: int = 4,
) -> torch.Tensor:
    """Average-softmax probability map ``(B, num_classes, *spatial)`` of a volume batch.

    ``network`` must return probabilities for a window, e.g. a
    :class:`~monai_ssl.networks.dual_3d.DualNetwork3D` (mean of both subnets' softmax); put it in
    ``eval()`` mode first. Volumes smaller than the window are zero-padded and cropped back.
    The segmentation is ``argmax`` over the class axis.
    """
    spec = _resolve(preset)
    if image.dim() != 2 + len(spec.roi_size):
        raise ValueError(f"image must be (B, C, *spatial) with {len(spec.roi_size)} spatial axes, got {tuple(image.shape)}")
    with torch.no_grad():
        return make_sliding_window_inferer(spec, sw_batch_size)(image, network)


def naive_sliding_window(
    predictor: Predictor,
    image: torch.Tensor,
    roi_size: Sequence[int],
    stride: Sequence[int],
    score_device: torch.device | str | None = None,
) -> torch.Tensor:
    """The authors' per-window loop (``test_single_case``): one forward pass per window.

    Args:
        predictor: returns probabilities ``(B, K, *roi_size)`` for a window (e.g. ``DualNetwork3D``).
        image: ``(B, C, *spatial)``; all volumes of the batch share each window.
        roi_size: window size per spatial axis.
        stride: step per spatial axis.
        score_device: where the score and count maps are accumulated (default: the image's
            device); ``"cpu"`` adds the authors' per-window copy to host memory.

    Returns:
        the probability map ``(B, K, *spatial)`` on ``score_device``.
    """
    spec = _resolve(SlidingWindowPreset(tuple(roi_size), tuple(stride)))
    spatial = tuple(image.shape[2:])
    if len(spatial) != len(spec.roi_size):
        raise ValueError(f"image must be (B, C, *spatial) with {len(spec.roi_size)} spatial axes, got {tuple(image.shape)}")
    score_device = torch.device(score_device) if score_device is not None else image.device
    pads = [max(r - n, 0) for r, n in zip(spec.roi_size, spatial)]
    before = [p // 2 for p in pads]
    pad_arg: list[int] = []
    for p, b in reversed(list(zip(pads, before))):  # F.pad lists the last axis first
        pad_arg += [b, p - b]
    padded = F.pad(image, pad_arg, mode="constant", value=0.0) if any(pads) else image
    size = padded.shape[2:]
    starts = [
        [min(s * i, n - r) for i in range(math.ceil((n - r) / s) + 1)]
        for n, r, s in zip(size, spec.roi_size, spec.stride)
    ]
    score: torch.Tensor | None = None
    count = torch.zeros(size, device=score_device)
    with torch.no_grad():
        for corner in itertools.product(*starts):
            window = tuple(slice(c, c + r) for c, r in zip(corner, spec.roi_size))
            prob = predictor(padded[(slice(None), slice(None), *window)]).to(score_device)
            if score is None:
                score = torch.zeros((padded.shape[0], prob.shape[1], *size), dtype=prob.dtype, device=score_device)
            score[(slice(None), slice(None), *window)] += prob
            count[window] += 1
    assert score is not None  # at least one window always exists
    score = score / count
    crop = tuple(slice(b, b + n) for b, n in zip(before, spatial))
    return score[(slice(None), slice(None), *crop)]
