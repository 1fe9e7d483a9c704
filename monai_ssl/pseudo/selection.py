"""APPG per image: propose boxes, segment them, measure each mask's evidence and choose the pseudo-label.

For every image: a :class:`~monai_ssl.foundation.interfaces.BoxProposer` gives up to ``top_k``
scored candidate boxes for the appearance prompts (Eq.4), a
:class:`~monai_ssl.foundation.interfaces.PromptableSegmenter` segments every candidate and
predicts its IoU (Eq.5), and ``candidate_policy`` makes the pseudo-label:

* ``"best_iou"``: the candidate mask with the highest predicted IoU (ties: the better-scored box);
* ``"top_box"``: the mask of the proposer's best box (the spec's default reading);
* ``"union"``: the union of all candidate masks (its ``predicted_iou`` is their mean);
* ``"rerank"`` (default): the candidate with the highest combined evidence (:func:`rerank_score`):
  the proposer's box score, LiteMedSAM's predicted IoU, and image evidence of the mask itself
  (:func:`mask_evidence`: darker, or for a "bright" prompt brighter, than a ring around it, its
  bounding box agrees with the prompt box, away from the image border). No truth is used at run
  time; the weights are :data:`DEFAULT_RERANK` (generic) unless a calibration
  (:mod:`monai_ssl.pseudo.calibration`, fitted on the split's labelled images only) gives others.

Eq.6 validity: ``valid = foreground_fraction > min_foreground`` (δ, default 0.01); an image
without any box is invalid (reason ``"no_box"``), one whose mask covers δ of the image or less is
invalid (reason ``"below_delta"``). Every image gets a mask file, empty when invalid.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from monai_ssl.foundation.appearance import BoxProposal, box_iou, prompt_brightness
from monai_ssl.foundation.interfaces import BoxProposer, PromptableSegmenter
from monai_ssl.foundation.litemedsam import BoxSegmentation
from monai_ssl.pseudo.store import MASK_DIR, read_gray8, write_mask

__all__ = [
    "CANDIDATE_POLICIES",
    "DEFAULT_RERANK",
    "INVALID_REASONS",
    "OPTIONAL_RERANK",
    "ChunkJob",
    "choose_candidate",
    "count_records",
    "mask_evidence",
    "process_chunk",
    "rerank_score",
]

CANDIDATE_POLICIES: tuple[str, ...] = ("best_iou", "top_box", "union", "rerank")
#: Generic weights of the ``"rerank"`` policy (see :func:`rerank_score`), chosen without looking at
#: any masks: every piece of evidence counts once (weight 1 on its log: a plain product of the
#: evidence), the contrast scale and border penalty as the proposer's generic defaults.
#: :func:`monai_ssl.pseudo.calibration.calibrate` fits them on the split's labelled images. (Earlier
#: versions used score 0.5, predicted_iou 2, contrast_scale 0.3, box_agreement 2, border 4, chosen
#: on the truth of about 120 unlabelled BUSI images: label leakage.)
DEFAULT_RERANK: dict[str, float] = {
    "score": 1.0,  # weight of log(proposer box score)
    "predicted_iou": 1.0,  # weight of log(LiteMedSAM predicted IoU)
    "contrast": 1.0,  # weight of log(1 - exp(-contrast / contrast_scale))
    "contrast_scale": 0.2,  # mask contrast (ring vs inside, signed by the prompt's brightness) giving 1 - 1/e
    "box_agreement": 1.0,  # weight of log(IoU of the mask's bounding box with the prompt box)
    "border": 2.0,  # penalty per unit of the mask outline's fraction on the image border
}
#: Optional ``"rerank"`` weights, off unless given (and only then part of the config hash):
#: ``valid_bonus`` is added to the rank of candidates whose mask covers more than δ (Eq.6), trading
#: pseudo-label Dice for more valid images (development subset: bonus 0.5 gave 84 % valid at Dice
#: 0.70 against 78 % at 0.74 without it).
OPTIONAL_RERANK: dict[str, float] = {"valid_bonus": 0.0}
INVALID_REASONS: tuple[str, ...] = ("no_box", "below_delta")


def mask_evidence(
    image: np.ndarray, mask: np.ndarray, box: Sequence[int], work_size: int = 128, brightness: str = "dark"
) -> dict[str, float]:
    """Image evidence for one candidate mask (no truth): is it a blob of the asked ``brightness``
    ("dark": darker than its surroundings, "bright": brighter) that agrees with its box?

    Computed on a copy whose longest side is at most ``work_size`` (speed). Returns
    ``contrast`` (mean of the robustly [0, 1]-scaled, lightly smoothed image in a ring around the
    mask minus its mean inside the mask, negated for "bright"; ring width a quarter of the mask's
    equivalent radius),
    ``box_agreement`` (IoU of the mask's bounding box with the prompt box), ``border`` (fraction
    of the mask's outline on the image border) and ``area_fraction``. An empty mask gives zeros
    (border 1).
    """
    if brightness not in ("dark", "bright"):
        raise ValueError(f"brightness must be 'dark' or 'bright', got {brightness!r}")
    gray = np.asarray(image, dtype=np.float64)
    if gray.ndim == 3:
        gray = gray.mean(axis=-1)
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return {"contrast": 0.0, "box_agreement": 0.0, "border": 1.0, "area_fraction": 0.0}
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    mask_box = (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))
    agreement = box_iou(mask_box, tuple(int(v) for v in box))
    step = max(1, int(np.ceil(max(gray.shape) / work_size)))
    small, small_mask = gray[::step, ::step], mask[::step, ::step]
    lo, hi = np.percentile(small, [1.0, 99.0])
    small = ndimage.gaussian_filter(np.clip((small - lo) / max(hi - lo, 1e-12), 0.0, 1.0), 1.0)
    contrast, border = 0.0, 1.0
    if small_mask.any():
        radius = np.sqrt(small_mask.sum() / np.pi)
        ring = ndimage.binary_dilation(small_mask, iterations=max(2, int(round(0.25 * radius)))) & ~small_mask
        contrast = float(small[ring].mean() - small[small_mask].mean()) if ring.any() else 0.0
        if brightness == "bright":
            contrast = -contrast
        edge = small_mask & ~ndimage.binary_erosion(small_mask)
        on_border = edge[0, :].sum() + edge[-1, :].sum() + edge[1:-1, 0].sum() + edge[1:-1, -1].sum()
        border = float(on_border / max(1, edge.sum()))
    return {"contrast": contrast, "box_agreement": float(agreement), "border": border, "area_fraction": float(mask.mean())}


def rerank_score(
    box_score: float, predicted_iou: float, evidence: Mapping[str, float], weights: Mapping[str, float] | None = None
) -> float:
    """Log-evidence of one candidate for the ``"rerank"`` policy (higher is better).

    ``w_score * log(box_score) + w_iou * log(predicted_iou) + w_contrast * log(1 - exp(-contrast /
    contrast_scale)) + w_agreement * log(box_agreement) - w_border * border``, with the weights of
    ``weights`` (keys of :data:`DEFAULT_RERANK`; missing keys take the defaults) and ``evidence``
    from :func:`mask_evidence` (its contrast already signed by the prompt's brightness). A mask
    without the asked contrast or an empty one scores very low but finitely, so ties still resolve.
    """
    w = {**DEFAULT_RERANK, **(weights or {})}
    floor = 1e-6
    contrast = 1.0 - np.exp(-max(float(evidence["contrast"]), floor) / w["contrast_scale"])
    return float(
        w["score"] * np.log(max(box_score, floor))
        + w["predicted_iou"] * np.log(max(predicted_iou, floor))
        + w["contrast"] * np.log(max(contrast, floor))
        + w["box_agreement"] * np.log(max(float(evidence["box_agreement"]), floor))
        - w["border"] * float(evidence["border"])
    )


def choose_candidate(
    seg: BoxSegmentation,
    policy: str,
    ranks: Sequence[float] | None = None,
) -> tuple[np.ndarray, list[int], float]:
    """The pseudo-label mask, the chosen candidate indices and the predicted IoU under ``policy``.

    ``ranks`` (one :func:`rerank_score` per candidate) is needed by ``"rerank"``; ties go to the
    earlier (better-scored) box.
    """
    iou = np.asarray(seg.iou, dtype=np.float64)
    if policy == "union":
        return np.any(seg.masks, axis=0), list(range(len(iou))), float(iou.mean())
    if policy == "rerank":
        if ranks is None or len(ranks) != len(iou):
            raise ValueError("the rerank policy needs one rank per candidate")
        index = int(np.argmax(np.asarray(ranks, dtype=np.float64)))
    else:
        index = int(np.argmax(iou)) if policy == "best_iou" else 0
    return np.asarray(seg.masks[index], dtype=bool), [index], float(iou[index])


def count_records(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Total, valid and invalid-by-reason counts."""
    valid = sum(1 for r in records if r["valid"])
    invalid = {reason: sum(1 for r in records if r["reason"] == reason) for reason in INVALID_REASONS}
    return {"total": len(records), "valid": valid, "invalid": invalid}


def process_chunk(
    chunk: Sequence[tuple[str, str]],
    out_dir: Path,
    proposer: BoxProposer,
    segmenter: PromptableSegmenter,
    prompts: Sequence[str],
    top_k: int,
    policy: str,
    min_foreground: float,
    rerank: Mapping[str, float] | None = None,
    brightness: Mapping[str, str] | None = None,
) -> list[dict]:
    """Propose, segment (one ``segment_batch`` call for the chunk), choose, write masks; records in chunk order.

    ``brightness`` maps a candidate's prompt to the brightness its mask evidence is measured for
    (default: :func:`~monai_ssl.foundation.appearance.prompt_brightness` with "dark").
    """
    images, proposals, seconds = [], [], []
    for case_id, image_path in chunk:
        start = time.perf_counter()
        try:
            image = read_gray8(image_path)
        except (OSError, ValueError) as err:
            raise RuntimeError(f"APPG case {case_id}: cannot read image {image_path}: {err}") from err
        found: list[BoxProposal] = list(proposer.propose(image, prompts, top_k))[:top_k]
        images.append(image)
        proposals.append(found)
        seconds.append(time.perf_counter() - start)

    with_boxes = [i for i, found in enumerate(proposals) if found]
    segmentations: dict[int, BoxSegmentation] = {}
    if with_boxes:
        start = time.perf_counter()
        results = segmenter.segment_batch(
            [images[i] for i in with_boxes], [np.array([p.box for p in proposals[i]], dtype=np.float32) for i in with_boxes]
        )
        share = (time.perf_counter() - start) / len(with_boxes)
        if len(results) != len(with_boxes):
            raise RuntimeError(f"segmenter {type(segmenter).__name__} returned {len(results)} results for {len(with_boxes)} images")
        for i, seg in zip(with_boxes, results):
            expected = (len(proposals[i]), *images[i].shape)
            if np.shape(seg.masks) != expected or np.shape(seg.iou) != (len(proposals[i]),):
                raise RuntimeError(
                    f"APPG case {chunk[i][0]}: segmenter {type(segmenter).__name__} returned masks {np.shape(seg.masks)} "
                    f"and IoU {np.shape(seg.iou)}, expected {expected} and ({len(proposals[i])},)"
                )
            segmentations[i] = seg
            seconds[i] += share

    records = []
    for i, (case_id, image_path) in enumerate(chunk):
        start = time.perf_counter()
        candidates = [
            {"box": list(p.box), "score": float(p.score), "prompt": p.prompt, "predicted_iou": None, "foreground_fraction": None}
            for p in proposals[i]
        ]
        if i in segmentations:
            seg = segmentations[i]
            ranks = []
            for candidate, mask, iou in zip(candidates, seg.masks, seg.iou):
                candidate["predicted_iou"] = float(iou)
                candidate["foreground_fraction"] = float(np.mean(mask))
                if policy == "rerank":
                    wanted = (brightness or {}).get(candidate["prompt"]) or prompt_brightness(candidate["prompt"])
                    evidence = mask_evidence(images[i], mask, candidate["box"], brightness=wanted)
                    candidate["evidence"] = {k: evidence[k] for k in ("contrast", "box_agreement", "border")}
                    candidate["rank"] = rerank_score(candidate["score"], float(iou), evidence, rerank)
                    if candidate["foreground_fraction"] > min_foreground:
                        candidate["rank"] += float((rerank or {}).get("valid_bonus", 0.0))
                    ranks.append(candidate["rank"])
            mask, chosen, predicted_iou = choose_candidate(seg, policy, ranks if policy == "rerank" else None)
        else:
            mask, chosen, predicted_iou = np.zeros(images[i].shape, dtype=bool), [], None
        fraction = float(np.mean(mask))
        valid = bool(candidates) and fraction > min_foreground
        reason = "ok" if valid else ("no_box" if not candidates else "below_delta")
        mask_rel = f"{MASK_DIR}/{case_id}.png"
        write_mask(out_dir / mask_rel, mask)
        records.append(
            {
                "case_id": case_id,
                "image": image_path,
                "mask": mask_rel,
                "height": int(images[i].shape[0]),
                "width": int(images[i].shape[1]),
                "candidates": candidates,
                "chosen": chosen,
                "predicted_iou": predicted_iou,
                "foreground_fraction": fraction,
                "valid": valid,
                "reason": reason,
                "seconds": seconds[i] + time.perf_counter() - start,
            }
        )
    return records


@dataclass(frozen=True)
class ChunkJob:
    """The per-run settings of :func:`process_chunk` (everything but the chunk and the models); pickles."""

    out_dir: Path
    prompts: list[str]
    top_k: int
    policy: str
    min_foreground: float
    rerank: Mapping[str, float] | None
    brightness: Mapping[str, str] | None = None

    def run(self, chunk: Sequence[tuple[str, str]], proposer: BoxProposer, segmenter: PromptableSegmenter) -> list[dict]:
        """:func:`process_chunk` of ``chunk`` with these settings."""
        return process_chunk(
            chunk, self.out_dir, proposer, segmenter, self.prompts, self.top_k, self.policy, self.min_foreground, self.rerank,
            self.brightness,
        )
