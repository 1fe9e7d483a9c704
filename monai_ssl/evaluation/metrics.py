"""Per-case binary segmentation metrics and their summary.

Metrics for one binary case (2D or 3D):

* ``dice``, ``iou`` and ``accuracy`` (pixel/voxel accuracy).
* ``hd95``: 95th percentile of the *symmetric* surface distances, i.e. the
  distances from every prediction surface voxel to the truth surface and from
  every truth surface voxel to the prediction surface, pooled (the same
  definition as ``medpy.metric.binary.hd95``).
* ``asd``: average *symmetric* surface distance, the mean of the same pooled
  distances (this is medpy's ``assd``; note that medpy's ``asd`` is
  one-directional, ours is symmetric).
* ``hd95_mm`` / ``asd_mm``: the same in physical units, present only when a
  voxel spacing is given.

Surfaces are the voxels of a mask removed by one binary erosion with a
face-connected structuring element (voxels outside the image count as
background, so an object touching the border has a surface there), and
distances are exact Euclidean distance transforms
(:func:`scipy.ndimage.distance_transform_edt`) between voxel centres.

The empty-case policy is given by :data:`EMPTY_CASE_POLICY` and every result
carries an ``empty_case`` key naming which branch applied. :class:`PolicyMeanDice` is the
ignite metric with the same policy, for the bundles' validation (model selection) and anything
else that reports a mean Dice from an evaluator, so that one figure means one thing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.handlers import IgniteMetricHandler
from monai.metrics import DiceMetric
from scipy import ndimage

__all__ = ["EMPTY_CASE_POLICY", "EMPTY_CASES", "PolicyMeanDice", "case_metrics", "summarize"]

EMPTY_CASES: tuple[str, ...] = ("none", "both_empty", "pred_empty", "truth_empty")
"""Values of the ``empty_case`` key, in reporting order."""

EMPTY_CASE_POLICY: str = (
    "Empty-mask policy: both prediction and truth empty -> dice=1, iou=1, hd95=0, asd=0 "
    "(empty_case='both_empty'). Exactly one empty (a missed object, empty_case='pred_empty', "
    "or a false alarm, empty_case='truth_empty') -> dice=0, iou=0 and hd95=asd=the image "
    "diagonal sqrt(sum(shape_i^2)) in voxels (sqrt(sum((shape_i*spacing_i)^2)) for the _mm "
    "variants): a penalty, never skipped, never 0. accuracy is always the plain voxel accuracy. "
    "hd95 is the 95th percentile and asd the mean of the pooled symmetric surface distances "
    "(asd is medpy's assd, not medpy's one-directional asd); std is the population std (ddof=0)."
)
"""Human-readable empty-case policy, also written into every summary JSON."""


def _to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` (numpy array, torch tensor or MetaTensor) as a numpy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _binary_mask(x: Any, name: str) -> np.ndarray:
    """Validate a 0/1 (or bool) mask without channel dim and return it as bool."""
    arr = _to_numpy(x)
    shape = arr.shape
    if arr.ndim in (3, 4) and shape[0] == 1:
        arr = arr[0]
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be a 2D or 3D mask (optionally with a leading singleton channel), got shape {shape}"
        )
    if arr.dtype != bool:
        if np.any((arr != 0) & (arr != 1)):
            raise ValueError(f"{name} must be binary (0/1 or bool); binarise probabilities first")
        arr = arr != 0
    return arr


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` removed by one face-connected erosion (outside counts as background)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _symmetric_surface_distances(
    pred: np.ndarray, truth: np.ndarray, sampling: Sequence[float] | None
) -> np.ndarray:
    """Pooled pred->truth and truth->pred surface distances of two non-empty masks.

    Both masks are cropped to the bounding box of their union (zero-padded by one voxel,
    which reproduces the out-of-image-is-background erosion); the nearest surface voxel
    always lies inside that box, so the distances are exact.
    """
    coords = np.argwhere(pred | truth)
    lo, hi = coords.min(axis=0), coords.max(axis=0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    pred_s = _surface(np.pad(pred[box], 1))
    truth_s = _surface(np.pad(truth[box], 1))
    to_truth = ndimage.distance_transform_edt(~truth_s, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~pred_s, sampling=sampling)
    return np.concatenate([to_truth[pred_s], to_pred[truth_s]])


def case_metrics(pred: Any, truth: Any, spacing: Sequence[float] | None = None) -> dict[str, Any]:
    """Dice, IoU, accuracy, HD95 and ASD (symmetric, medpy ``assd``) for one binary case.

    Args:
        pred: binary prediction, 2D or 3D numpy array or torch tensor; a leading
            singleton channel is squeezed.
        truth: binary ground truth of the same shape.
        spacing: voxel spacing per spatial axis; when given, ``hd95_mm`` and ``asd_mm``
            are added.

    Returns:
        ``dice``, ``iou``, ``accuracy``, ``hd95``, ``asd`` (voxels), optionally
        ``hd95_mm``, ``asd_mm``, and ``empty_case`` (see :data:`EMPTY_CASE_POLICY`).
    """
    p = _binary_mask(pred, "pred")
    t = _binary_mask(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred shape {p.shape} != truth shape {t.shape}")
    if spacing is not None:
        spacing = [float(s) for s in spacing]
        if len(spacing) != p.ndim or not all(s > 0 and math.isfinite(s) for s in spacing):
            raise ValueError(f"spacing must be {p.ndim} positive finite numbers, got {spacing}")

    inter = int(np.count_nonzero(p & t))
    n_p, n_t = int(np.count_nonzero(p)), int(np.count_nonzero(t))
    union = n_p + n_t - inter
    out: dict[str, Any] = {
        "dice": 2.0 * inter / (n_p + n_t) if n_p + n_t else 1.0,
        "iou": inter / union if union else 1.0,
        "accuracy": float(np.count_nonzero(p == t)) / p.size,
    }

    if n_p and n_t:
        empty_case = "none"
        d = _symmetric_surface_distances(p, t, None)
        out["hd95"], out["asd"] = float(np.percentile(d, 95)), float(d.mean())
        if spacing is not None:
            d = _symmetric_surface_distances(p, t, spacing)
            out["hd95_mm"], out["asd_mm"] = float(np.percentile(d, 95)), float(d.mean())
    else:
        empty_case = "both_empty" if not (n_p or n_t) else ("pred_empty" if n_t else "truth_empty")
        diag = 0.0 if empty_case == "both_empty" else math.sqrt(sum(s * s for s in p.shape))
        out["hd95"] = out["asd"] = diag
        if spacing is not None:
            diag_mm = 0.0 if not diag else math.sqrt(sum((s * sp) ** 2 for s, sp in zip(p.shape, spacing)))
            out["hd95_mm"] = out["asd_mm"] = diag_mm
    out["empty_case"] = empty_case
    return out


def _is_number(v: Any) -> bool:
    """True for int/float (python or numpy) values, excluding bools."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean, population std (ddof=0), median and n of every numeric metric, plus empty-case counts.

    Args:
        records: per-case dicts (``case_metrics`` output, usually with a ``case_id``).

    Returns:
        ``{"n_cases": int, "metrics": {name: {"mean", "std", "median", "n"}},
        "empty_cases": {"none": int, "both_empty": int, "pred_empty": int, "truth_empty": int}}``.

    Raises:
        ValueError: if ``records`` is empty or a metric is NaN/infinite (the case is named).
    """
    if not records:
        raise ValueError("summarize() needs at least one record")
    values: dict[str, list[float]] = {}
    counts = dict.fromkeys(EMPTY_CASES, 0)
    for i, rec in enumerate(records):
        case = rec.get("case_id", f"#{i}")
        for key, v in rec.items():
            if not _is_number(v):
                continue
            if not math.isfinite(v):
                raise ValueError(f"metric {key!r} is {v} for case {case!r}")
            values.setdefault(key, []).append(float(v))
        if "empty_case" in rec:
            if rec["empty_case"] not in counts:
                raise ValueError(f"unknown empty_case {rec['empty_case']!r} for case {case!r}")
            counts[rec["empty_case"]] += 1
    metrics = {
        key: {"mean": float(np.mean(v)), "std": float(np.std(v)), "median": float(np.median(v)), "n": len(v)}
        for key, v in values.items()
    }
    return {"n_cases": len(records), "metrics": metrics, "empty_cases": counts}


class PolicyMeanDice(IgniteMetricHandler):
    """Mean Dice over cases for an evaluator, under :data:`EMPTY_CASE_POLICY`.

    MONAI's ``MeanDice`` handler leaves out every case whose truth is empty (its ``DiceMetric``
    has ``ignore_empty=True``), so a false alarm on a lesion-free image never lowers it. This
    metric counts such a case as Dice 0 and an empty prediction of an empty truth as Dice 1, as
    :func:`case_metrics` does: on binarised ``(pred, label)`` batches (one foreground channel, or
    the argmax of two classes) its value equals the mean ``dice`` of the per-case report.

    Args:
        output_transform: maps the evaluator's output to ``(y_pred, y)``, e.g.
            ``monai.handlers.from_engine(["pred", "label"])``.
        save_details: keep the per-case values in ``engine.state.metric_details``.
    """

    def __init__(self, output_transform: Any = lambda x: x, save_details: bool = True) -> None:
        super().__init__(
            metric_fn=DiceMetric(include_background=True, reduction="mean", ignore_empty=False),
            output_transform=output_transform,
            save_details=save_details,
        )
