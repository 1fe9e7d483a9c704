"""Calibrate APPG on a split's *labelled* images only (no unlabelled or test truth is read).

:func:`calibrate` measures the labelled masks and fits what the appearance proposer and the
``"rerank"`` policy would otherwise take from generic defaults:

* **brightness**: the sign of the median contrast (ring around the mask minus inside, on the
  robustly scaled, lightly smoothed image): positive = the targets are darker than their
  surroundings ("dark"), negative = brighter ("bright"). It becomes the proposer's
  ``default_brightness`` and, when no prompts are given, the brightness of the paper's shape words
  (``"<brightness> oval"``, ...). Given prompts that ask for the other brightness are kept, with a
  warning in the calibration's ``warnings``.
* **size**: ``size_prior`` = (geometric mean of the area fractions, their log-std widened to at
  least 0.5: a dozen masks do not pin it down); ``min_area``/``max_area`` = a third of the
  smallest / 1.5 times the largest fraction (clipped to [0.0005, 0.95]); the threshold
  ``quantiles`` and ``local_quantiles`` add the 10th, 50th and 90th percentile of the fractions.
* **position**: ``position_prior`` = (mean centre height, sqrt(std^2 + 0.1^2)), ``position_weight`` 1.
* **contrast**: ``contrast_scale`` (proposer and rerank) = the median contrast magnitude
  (clipped to [0.03, 0.5]).
* **border**: with ``f`` the fraction of masks touching the image border, ``border_weight`` =
  2 (1 - f), and no margin factor when any mask touches it.
* **rerank weights**: the labelled images are proposed (with the calibrated proposer) and
  segmented once; every weight combination of a small grid (:data:`RERANK_GRID`) re-ranks those
  candidates, and the one whose chosen masks have the highest mean Dice against the labelled masks
  wins (ties, to 0.001: the one closest to the generic defaults). The best achievable Dice (the
  best candidate of each image) is recorded too: when it is low, the proposer, not the ranking, fails.

The result is a JSON-able dict (:func:`save_calibration` / :func:`load_calibration`):
``{"calibration_version", "source", "proposer": {settings}, "rerank": {weights}, "prompts",
"brightness", "measured": {...}, "rerank_fit": {...}, "warnings": [...]}``, taken by
``scripts/run_appg.py --calibration``, ``APPGStage(calibration=...)`` (the bundle's
``appg_calibration``) and :func:`calibrated_proposer`. The same images are then used by the APPG
labelled check, so that Dice is in-sample for the fitted weights (a dozen images, few parameters).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_ssl.foundation.appearance import DEFAULT_PROMPTS, DEFAULT_SHAPES, AppearanceBoxProposer, parse_prompt
from monai_ssl.foundation.interfaces import BoxProposer, PromptableSegmenter
from monai_ssl.pseudo.selection import DEFAULT_RERANK, mask_evidence, rerank_score
from monai_ssl.pseudo.store import config_hash, read_gray8
from monai_ssl.utils import atomic_write

__all__ = [
    "CALIBRATION_VERSION",
    "NoTargetError",
    "RERANK_GRID",
    "calibrate",
    "calibration_record",
    "calibrated_prompts",
    "calibrated_proposer",
    "fit_priors",
    "load_calibration",
    "measure_masks",
    "save_calibration",
]

logger = logging.getLogger(__name__)

CALIBRATION_VERSION = 1
#: Values tried for each rerank weight (``contrast_scale`` is measured, not searched).
RERANK_GRID: dict[str, tuple[float, ...]] = {
    "score": (0.0, 0.5, 1.0),
    "predicted_iou": (0.0, 1.0, 2.0),
    "contrast": (0.0, 1.0),
    "box_agreement": (0.0, 1.0, 2.0),
    "border": (0.0, 2.0, 4.0),
}
#: Proposer settings a calibration may set.
PROPOSER_KEYS = (
    "quantiles", "local_quantiles", "min_area", "max_area", "size_prior", "contrast_scale", "border_weight",
    "margin_scale", "position_prior", "position_weight", "default_brightness",
)


class NoTargetError(ValueError):
    """No labelled mask has a target: there is nothing to fit."""


def _read_label(path: str | Path, case_id: str) -> np.ndarray:
    try:
        return read_gray8(path) > 0
    except (OSError, ValueError) as err:
        raise ValueError(f"APPG calibration: case {case_id}: cannot read label mask {path}: {err}") from err


def _case_id(item: Mapping[str, Any]) -> str:
    from monai_ssl.data.datalist import case_id_from_path

    return str(item.get("case_id") or case_id_from_path(item["image"]))


def measure_masks(labelled: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per labelled entry (``image`` + ``label``): area fraction, centre (fractions of height/width),
    contrast (ring minus inside, > 0 = darker than the surroundings), border contact; empty masks
    are listed with ``empty`` True and no other measures."""
    out = []
    for item in labelled:
        case_id = _case_id(item)
        if not item.get("label"):
            raise ValueError(f"APPG calibration: case {case_id} ({item.get('image')}) has no label; calibrate on labelled entries only")
        mask = _read_label(item["label"], case_id)
        image = read_gray8(item["image"])
        if image.shape != mask.shape:
            raise ValueError(f"APPG calibration: case {case_id}: image {image.shape} and label {mask.shape} differ in size")
        if not mask.any():
            out.append({"case_id": case_id, "empty": True})
            continue
        rows, cols = np.nonzero(mask)
        ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        box = (int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1]))
        evidence = mask_evidence(image, mask, box, brightness="dark")
        out.append(
            {
                "case_id": case_id,
                "empty": False,
                "area_fraction": float(mask.mean()),
                "centre_y": float((rows.mean() + 0.5) / mask.shape[0]),
                "centre_x": float((cols.mean() + 0.5) / mask.shape[1]),
                "contrast": float(evidence["contrast"]),
                "touches_border": bool(evidence["border"] > 0.0),
            }
        )
    return out


def fit_priors(measured: Sequence[Mapping[str, Any]], base: AppearanceBoxProposer | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Proposer settings fitted from :func:`measure_masks` output, and the summary statistics used.

    ``base`` gives the generic quantiles the fitted ones are merged with (default: the defaults).
    Raises ``ValueError`` when no mask has a target.
    """
    base = base or AppearanceBoxProposer()
    targets = [m for m in measured if not m["empty"]]
    if not targets:
        raise NoTargetError(f"APPG calibration: none of the {len(measured)} labelled masks has a target; nothing to fit")
    areas = np.array([m["area_fraction"] for m in targets])
    logs = np.log(areas)
    centres = np.array([m["centre_y"] for m in targets])
    contrasts = np.array([m["contrast"] for m in targets])
    median_contrast = float(np.median(contrasts))
    brightness = "dark" if median_contrast >= 0.0 else "bright"
    signed = contrasts if brightness == "dark" else -contrasts
    touching = float(np.mean([m["touches_border"] for m in targets]))
    percentiles = [float(np.clip(v, 0.005, 0.9)) for v in np.percentile(areas, [10, 50, 90])]

    def merged(generic: Sequence[float]) -> tuple[float, ...]:
        return tuple(sorted({round(float(q), 4) for q in (*generic, *percentiles)}))

    position_std = math.sqrt(float(np.std(centres)) ** 2 + 0.1**2)
    settings: dict[str, Any] = {
        "quantiles": merged(base.quantiles),
        "local_quantiles": merged(base.local_quantiles),
        "min_area": float(np.clip(areas.min() / 3.0, 0.0005, 0.9)),
        "max_area": float(np.clip(areas.max() * 1.5, 0.01, 0.95)),
        "size_prior": (float(math.exp(logs.mean())), max(0.5, float(logs.std()))),
        "contrast_scale": float(np.clip(np.median(np.abs(signed)), 0.03, 0.5)),
        "border_weight": 2.0 * (1.0 - touching),
        "margin_scale": 0.0 if touching > 0.0 else base.margin_scale,
        "position_prior": (float(centres.mean()), position_std),
        "position_weight": 1.0,
        "default_brightness": brightness,
    }
    if settings["min_area"] >= settings["max_area"]:
        settings["min_area"] = settings["max_area"] / 10.0
    stats = {
        "n_labelled": len(measured),
        "n_with_target": len(targets),
        "n_empty": len(measured) - len(targets),
        "area_fraction": {"min": float(areas.min()), "median": float(np.median(areas)), "max": float(areas.max())},
        "centre_y": {"mean": float(centres.mean()), "std": float(np.std(centres))},
        "contrast": {"median": median_contrast, "darker_than_ring": int(np.sum(contrasts > 0)), "brighter": int(np.sum(contrasts < 0))},
        "touching_border": touching,
    }
    return settings, stats


def calibrated_proposer(proposer: BoxProposer, calibration: Mapping[str, Any] | None) -> BoxProposer:
    """A copy of an :class:`AppearanceBoxProposer` with the calibration's proposer settings (other
    proposers, and ``calibration`` None, are returned unchanged)."""
    if calibration is None or not isinstance(proposer, AppearanceBoxProposer):
        return proposer
    settings = {k: v for k, v in vars(proposer).items()}
    for key, value in calibration.get("proposer", {}).items():
        if key not in PROPOSER_KEYS:
            raise ValueError(f"APPG calibration sets unknown proposer setting {key!r}; known: {list(PROPOSER_KEYS)}")
        settings[key] = tuple(value) if isinstance(value, list) else value
    return AppearanceBoxProposer(**settings)


def calibrated_prompts(prompts: Sequence[str] | None, calibration: Mapping[str, Any] | None) -> list[str]:
    """``prompts`` when given, else the calibration's prompts, else the paper's :data:`DEFAULT_PROMPTS`."""
    if prompts:
        return list(prompts)
    if calibration is not None and calibration.get("prompts"):
        return list(calibration["prompts"])
    return list(DEFAULT_PROMPTS)


def _candidate_table(
    labelled: Sequence[Mapping[str, Any]],
    proposer: BoxProposer,
    segmenter: PromptableSegmenter,
    prompts: Sequence[str],
    top_k: int,
    default_brightness: str,
) -> list[list[dict[str, Any]]]:
    """Per labelled image with a target: each candidate's box score, predicted IoU, evidence and Dice against the mask."""
    from monai_ssl.foundation.appearance import prompt_brightness

    table = []
    for item in labelled:
        case_id = _case_id(item)
        truth = _read_label(item["label"], case_id)
        image = read_gray8(item["image"])
        found = list(proposer.propose(image, prompts, top_k))[:top_k]
        rows: list[dict[str, Any]] = []
        if found:
            seg = segmenter.segment_batch([image], [np.array([p.box for p in found], dtype=np.float32)])[0]
            for p, mask, iou in zip(found, seg.masks, seg.iou):
                mask = np.asarray(mask, dtype=bool)
                evidence = mask_evidence(image, mask, p.box, brightness=prompt_brightness(p.prompt, default_brightness))
                total = mask.sum() + truth.sum()
                dice = 1.0 if total == 0 else float(2.0 * np.logical_and(mask, truth).sum() / total)
                rows.append({"score": float(p.score), "predicted_iou": float(iou), "evidence": evidence, "dice": dice})
        table.append(rows)
    return table


def _fit_rerank(table: Sequence[Sequence[Mapping[str, Any]]], contrast_scale: float) -> tuple[dict[str, float], dict[str, Any]]:
    """Grid search of the rerank weights on the candidate table (see the module docstring)."""
    generic = {k: DEFAULT_RERANK[k] for k in RERANK_GRID}

    def mean_dice(weights: Mapping[str, float]) -> float:
        total = 0.0
        for rows in table:
            if rows:
                ranks = [rerank_score(r["score"], r["predicted_iou"], r["evidence"], weights) for r in rows]
                total += rows[int(np.argmax(ranks))]["dice"]
        return total / max(1, len(table))

    best: tuple[float, float] | None = None
    chosen: dict[str, float] = {}
    keys = list(RERANK_GRID)
    for values in itertools.product(*(RERANK_GRID[k] for k in keys)):
        weights = {**dict(zip(keys, values)), "contrast_scale": contrast_scale}
        distance = sum(abs(weights[k] - generic[k]) for k in keys)
        key = (round(mean_dice(weights), 3), -distance)
        if best is None or key > best:
            best, chosen = key, weights
    generic_weights = {**generic, "contrast_scale": contrast_scale}
    fit = {
        "images": len(table),
        "images_with_candidates": sum(1 for rows in table if rows),
        "dice_fitted": mean_dice(chosen),
        "dice_generic_weights": mean_dice(generic_weights),
        "dice_best_candidate": sum(max((r["dice"] for r in rows), default=0.0) for rows in table) / max(1, len(table)),
        "grid": {k: list(v) for k, v in RERANK_GRID.items()},
        "rule": "highest mean Dice of the chosen candidates over the labelled images with a target (ties to 0.001: closest to the generic weights)",
    }
    return {k: float(v) for k, v in chosen.items()}, fit


def calibrate(
    labelled: Sequence[Mapping[str, Any]],
    proposer: BoxProposer,
    segmenter: PromptableSegmenter | None,
    prompts: Sequence[str] | None = None,
    top_k: int = 3,
    source: str = "",
) -> dict[str, Any]:
    """Fit the proposer priors and (with a ``segmenter``) the rerank weights on ``labelled`` entries
    (``image`` + ``label`` paths: only these masks are read). See the module docstring.

    ``proposer`` is the base (its generic quantiles are extended; only an
    :class:`AppearanceBoxProposer` is re-parametrised). ``prompts`` None: the paper's shape words
    with the measured brightness. ``segmenter`` None: the rerank weights stay generic (with the
    measured contrast scale).
    """
    if not labelled:
        raise ValueError("APPG calibration needs at least one labelled image (the datalist's labelled list is empty)")
    measured = measure_masks(labelled)
    base = proposer if isinstance(proposer, AppearanceBoxProposer) else AppearanceBoxProposer()
    settings, stats = fit_priors(measured, base)
    brightness = settings["default_brightness"]
    warnings: list[str] = []
    if prompts:
        asked = {parse_prompt(p.strip(), brightness).brightness for prompt in prompts for p in prompt.split(".") if p.strip()}
        if asked != {brightness}:
            warnings.append(
                f"the labelled masks are {brightness}er than their surroundings (median ring-minus-inside contrast "
                f"{stats['contrast']['median']:+.3f}) but the prompts {list(prompts)} ask for {sorted(asked)} targets"
            )
        used_prompts = list(prompts)
    else:
        used_prompts = [f"{brightness} {shape}" for shape in DEFAULT_SHAPES]
    if stats["n_empty"]:
        warnings.append(f"{stats['n_empty']} of the {stats['n_labelled']} labelled masks are empty (no target); they are not fitted")
    calibration: dict[str, Any] = {
        "calibration_version": CALIBRATION_VERSION,
        "source": source or f"{len(labelled)} labelled images",
        "labelled_cases": [m["case_id"] for m in measured],
        "brightness": brightness,
        "prompts": used_prompts,
        "proposer": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
        "rerank": {**DEFAULT_RERANK, "contrast_scale": settings["contrast_scale"]},
        "measured": stats,
        "rerank_fit": None,
        "warnings": warnings,
    }
    if segmenter is not None:
        fitted = calibrated_proposer(base, calibration)
        with_target = [item for item, m in zip(labelled, measured) if not m["empty"]]
        table = _candidate_table(with_target, fitted, segmenter, used_prompts, top_k, brightness)
        weights, fit = _fit_rerank(table, settings["contrast_scale"])
        calibration["rerank"] = {**DEFAULT_RERANK, **weights}
        calibration["rerank_fit"] = fit
        if fit["dice_best_candidate"] < 0.5:
            warnings.append(
                f"even the best candidate of each labelled image reaches only mean Dice {fit['dice_best_candidate']:.3f}: "
                "the proposer does not find these targets (check the prompts)"
            )
    for warning in warnings:
        logger.warning("APPG calibration: %s", warning)
    return calibration


def save_calibration(path: str | Path, calibration: Mapping[str, Any]) -> None:
    """Write a calibration as JSON atomically."""
    atomic_write(path, json.dumps(calibration, indent=1) + "\n")


def load_calibration(path: str | Path) -> dict[str, Any]:
    """Read and check a calibration JSON (:func:`calibrate`'s output); errors name the file."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"APPG calibration {path}: cannot read it as JSON ({err})") from err
    if not isinstance(content, dict) or content.get("calibration_version") != CALIBRATION_VERSION:
        raise ValueError(f"APPG calibration {path}: not a calibration file of version {CALIBRATION_VERSION} (scripts/calibrate_appg.py writes them)")
    unknown = sorted(set(content.get("proposer", {})) - set(PROPOSER_KEYS))
    if unknown:
        raise ValueError(f"APPG calibration {path}: unknown proposer settings {unknown}; known: {list(PROPOSER_KEYS)}")
    unknown = sorted(set(content.get("rerank", {})) - set(DEFAULT_RERANK))
    if unknown:
        raise ValueError(f"APPG calibration {path}: unknown rerank weights {unknown}; known: {sorted(DEFAULT_RERANK)}")
    return content


def calibration_record(calibration: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What an APPG config hash records of a calibration: the hash of the parts that change the
    pseudo-labels (proposer settings, rerank weights, prompts) and where it came from; None for none.
    The same in ``scripts/run_appg.py`` and the bundle, so each reuses the other's results."""
    if calibration is None:
        return None
    effective = {k: calibration.get(k) for k in ("proposer", "rerank", "prompts")}
    return {"hash": config_hash(effective), "brightness": calibration.get("brightness")}
