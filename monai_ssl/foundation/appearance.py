"""Training-free, weight-free box proposals from appearance prompts ("dark oval", ...).

A stand-in for the Grounding DINO step of APPG (methods spec §1.2) that needs no model: each
prompt's brightness word ("dark" / "bright"; default "dark") and shape word ("oval", "round",
"lobulated", "irregular"; optional) are read as criteria, and candidate regions are taken from
the image itself:

1. robust intensity scaling (1st-99th percentile to [0, 1]), inverted for "bright", on a copy
   resized so its longest side is at most ``work_size``;
2. multi-scale Gaussian smoothing (``sigmas`` as fractions of the longest side) against speckle;
3. for each scale, the darkest ``quantiles`` of the pixels, opened, hole-filled, and split into
   4-connected components whose area lies in ``[min_area, max_area]`` of the image;
4. each component is scored in [0, 1] as
   ``contrast * (1 - shape_weight + shape_weight * shape) * size * border`` where
   ``contrast`` = saturating (ring mean - inside mean) on the lightly smoothed image (ring: a
   band around the region, a quarter of its equivalent radius wide), ``shape`` = agreement with
   the shape word from the IoU of the region with its moment ellipse (ellipse fit), the ellipse's
   axis ratio and the region's solidity (area / convex-hull area), ``size`` = a log-normal prior on
   the area fraction, ``border`` = a penalty for regions touching the image border (acoustic
   shadows, the outside of the ultrasound fan);
5. per prompt, near-duplicates (box IoU > ``dedup_iou``) are suppressed; across prompts,
   non-maximum suppression at ``nms_iou`` keeps the best-scored box of each place.

Boxes are ``x0, y0, x1, y1`` pixel indices of the input image, inclusive (the first and last
column/row of the region), the convention of box prompts computed from masks in MedSAM.
Everything is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

__all__ = ["AppearanceBoxProposer", "AppearanceCriteria", "BoxProposal", "DEFAULT_PROMPTS", "parse_prompt", "propose"]

#: The paper's universal appearance prompts (GPT-5 output in APPG).
DEFAULT_PROMPTS: tuple[str, ...] = ("dark oval", "dark round", "dark lobulated")

_BRIGHTNESS_WORDS = {"dark": "dark", "hypoechoic": "dark", "bright": "bright", "hyperechoic": "bright"}
_SHAPE_WORDS = {
    "oval": "oval",
    "elliptical": "oval",
    "round": "round",
    "circular": "round",
    "lobulated": "lobulated",
    "irregular": "irregular",
}


@dataclass(frozen=True)
class BoxProposal:
    """A scored candidate box: inclusive pixel indices ``x0, y0, x1, y1``, a score in [0, 1], the prompt it matched."""

    x0: int
    y0: int
    x1: int
    y1: int
    score: float
    prompt: str

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)``."""
        return (self.x0, self.y0, self.x1, self.y1)


@dataclass(frozen=True)
class AppearanceCriteria:
    """What a prompt asks for: ``brightness`` ("dark" / "bright") and ``shape`` (or ``None`` for any shape)."""

    brightness: str
    shape: str | None


def parse_prompt(prompt: str) -> AppearanceCriteria:
    """Read the brightness and shape words of ``prompt`` (other words are ignored).

    Raises ``ValueError`` when the prompt names neither, or names two different brightnesses or shapes.
    """
    words = "".join(c if c.isalpha() else " " for c in prompt.lower()).split()
    brightness = {_BRIGHTNESS_WORDS[w] for w in words if w in _BRIGHTNESS_WORDS}
    shape = {_SHAPE_WORDS[w] for w in words if w in _SHAPE_WORDS}
    if not brightness and not shape:
        raise ValueError(
            f"prompt {prompt!r} has no brightness word ({sorted(_BRIGHTNESS_WORDS)}) "
            f"and no shape word ({sorted(_SHAPE_WORDS)})"
        )
    if len(brightness) > 1 or len(shape) > 1:
        raise ValueError(f"prompt {prompt!r} names conflicting criteria: {sorted(brightness | shape)}")
    return AppearanceCriteria(brightness=brightness.pop() if brightness else "dark", shape=shape.pop() if shape else None)


@dataclass(frozen=True)
class _Region:
    """A candidate region measured on the working image (box inclusive, in working pixels)."""

    box: tuple[int, int, int, int]
    contrast: float
    area_fraction: float
    ellipse_fit: float
    axis_ratio: float
    solidity: float
    border_fraction: float


def _gauss(value: float, mean: float, std: float) -> float:
    return math.exp(-0.5 * ((value - mean) / std) ** 2)


def _shape_score(region: _Region, shape: str | None) -> float:
    """Agreement in [0, 1] of a region with a shape word."""
    if shape is None:
        return 1.0
    if shape == "round":
        return region.ellipse_fit * _gauss(region.axis_ratio, 1.0, 0.2)
    if shape == "oval":
        return region.ellipse_fit * _gauss(region.axis_ratio, 0.6, 0.2)
    if shape == "lobulated":  # oval overall, undulating contour: good but imperfect ellipse fit, solidity a little below 1
        return _gauss(region.ellipse_fit, 0.8, 0.12) * _gauss(region.solidity, 0.86, 0.07)
    return _gauss(region.solidity, 0.7, 0.12)  # irregular


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two inclusive pixel boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _nms(proposals: list[BoxProposal], iou: float) -> list[BoxProposal]:
    """Greedy non-maximum suppression; ties broken by box coordinates so the order is deterministic."""
    kept: list[BoxProposal] = []
    for p in sorted(proposals, key=lambda q: (-q.score, q.box, q.prompt)):
        if all(_box_iou(p.box, k.box) <= iou for k in kept):
            kept.append(p)
    return kept


class AppearanceBoxProposer:
    """Scored boxes for appearance prompts, computed from the image alone (see the module docstring).

    Args:
        work_size: longest side of the working copy of the image (speed; boxes are mapped back).
        sigmas: Gaussian smoothing scales as fractions of the working longest side.
        quantiles: fractions of darkest pixels thresholded at each scale.
        min_area, max_area: accepted region area as a fraction of the image.
        size_prior: ``(median area fraction, log-std)`` of the log-normal size prior.
        contrast_scale: ring-minus-inside contrast (in [0, 1] intensity units) giving a contrast
            score of ``1 - 1/e``.
        shape_weight: how much the shape word can lower a score (0 ignores shape).
        border_weight: strength of the border penalty ``exp(-border_weight * border_fraction)``.
        dedup_iou: box IoU above which a prompt's candidates are duplicates.
        nms_iou: box IoU above which proposals of different prompts suppress each other.
    """

    def __init__(
        self,
        work_size: int = 128,
        sigmas: Sequence[float] = (0.01, 0.02, 0.04),
        quantiles: Sequence[float] = (0.02, 0.05, 0.1, 0.2, 0.3),
        min_area: float = 0.002,
        max_area: float = 0.5,
        size_prior: tuple[float, float] = (0.05, 1.2),
        contrast_scale: float = 0.15,
        shape_weight: float = 0.75,
        border_weight: float = 4.0,
        dedup_iou: float = 0.7,
        nms_iou: float = 0.5,
    ) -> None:
        if work_size < 16:
            raise ValueError(f"work_size must be at least 16, got {work_size}")
        if not sigmas or not quantiles:
            raise ValueError("sigmas and quantiles must not be empty")
        if not all(0.0 < q < 1.0 for q in quantiles):
            raise ValueError(f"quantiles must lie in (0, 1), got {list(quantiles)}")
        if not 0.0 <= min_area < max_area <= 1.0:
            raise ValueError(f"need 0 <= min_area < max_area <= 1, got {min_area}, {max_area}")
        if not 0.0 <= shape_weight <= 1.0:
            raise ValueError(f"shape_weight must be in [0, 1], got {shape_weight}")
        self.work_size = work_size
        self.sigmas = tuple(float(s) for s in sigmas)
        self.quantiles = tuple(float(q) for q in quantiles)
        self.min_area = min_area
        self.max_area = max_area
        self.size_prior = size_prior
        self.contrast_scale = contrast_scale
        self.shape_weight = shape_weight
        self.border_weight = border_weight
        self.dedup_iou = dedup_iou
        self.nms_iou = nms_iou

    def propose(self, image: np.ndarray, prompts: Sequence[str] = DEFAULT_PROMPTS, top_k: int = 5) -> list[BoxProposal]:
        """Up to ``top_k`` proposals for a (H, W) or (H, W, C) image, best first.

        A prompt may hold several phrases separated by '.' (Grounding DINO style). Returns an
        empty list for a constant image or when no region qualifies.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        phrases = [p.strip() for prompt in prompts for p in prompt.split(".") if p.strip()]
        if not phrases:
            raise ValueError("no prompt given")
        criteria = {phrase: parse_prompt(phrase) for phrase in phrases}
        gray = self._grayscale(image)
        height, width = gray.shape
        work, factor = self._working_copy(gray)
        if work is None:
            return []
        regions = {b: self._regions(work if b == "dark" else 1.0 - work) for b in {c.brightness for c in criteria.values()}}
        proposals: list[BoxProposal] = []
        for phrase, crit in criteria.items():
            scored = []
            for region in regions[crit.brightness]:
                box = self._to_image_box(region.box, factor, height, width)
                scored.append(BoxProposal(*box, score=self._score(region, crit.shape), prompt=phrase))
            proposals += _nms([p for p in scored if p.score > 0.0], self.dedup_iou)
        return _nms(proposals, self.nms_iou)[:top_k]

    @staticmethod
    def _grayscale(image: np.ndarray) -> np.ndarray:
        """Finite float64 (H, W) copy; colour channels averaged."""
        arr = np.asarray(image, dtype=np.float64)
        if arr.ndim == 3:
            arr = arr.mean(axis=-1)
        if arr.ndim != 2 or min(arr.shape) < 2:
            raise ValueError(f"expected a (H, W) or (H, W, C) image, got shape {np.asarray(image).shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("image contains NaN or infinite values")
        return arr

    def _working_copy(self, gray: np.ndarray) -> tuple[np.ndarray | None, tuple[float, float]]:
        """Robustly scaled [0, 1] copy with longest side <= work_size, and the (row, col) scale back."""
        lo, hi = np.percentile(gray, [1.0, 99.0])
        if hi - lo <= 1e-12:
            lo, hi = gray.min(), gray.max()
            if hi - lo <= 1e-12:
                return None, (1.0, 1.0)
        scaled = np.clip((gray - lo) / (hi - lo), 0.0, 1.0)
        zoom = min(1.0, self.work_size / max(gray.shape))
        if zoom < 1.0:
            scaled = ndimage.zoom(scaled, zoom, order=1, prefilter=False)
        return scaled, (gray.shape[0] / scaled.shape[0], gray.shape[1] / scaled.shape[1])

    @staticmethod
    def _to_image_box(
        box: tuple[int, int, int, int], factor: tuple[float, float], height: int, width: int
    ) -> tuple[int, int, int, int]:
        """Map an inclusive working-image box to inclusive input-image pixel indices."""
        fy, fx = factor
        x0, y0, x1, y1 = box
        return (
            int(math.floor(x0 * fx)),
            int(math.floor(y0 * fy)),
            min(width - 1, int(math.ceil((x1 + 1) * fx)) - 1),
            min(height - 1, int(math.ceil((y1 + 1) * fy)) - 1),
        )

    def _regions(self, dark: np.ndarray) -> list[_Region]:
        """Candidate dark regions of ``dark`` (lesion = low values) over all scales and thresholds."""
        side = max(dark.shape)
        n_pixels = dark.size
        reference = ndimage.gaussian_filter(dark, max(0.5, self.sigmas[0] * side))
        regions = []
        for sigma in self.sigmas:
            smooth = ndimage.gaussian_filter(dark, max(0.5, sigma * side))
            for level in np.quantile(smooth, self.quantiles):
                mask = ndimage.binary_fill_holes(ndimage.binary_opening(smooth <= level))
                labels, count = ndimage.label(mask)
                if count == 0:
                    continue
                areas = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
                for idx, slc in enumerate(ndimage.find_objects(labels)):
                    fraction = areas[idx] / n_pixels
                    if slc is None or not self.min_area <= fraction <= self.max_area:
                        continue
                    regions.append(self._measure(labels == idx + 1, slc, reference, fraction))
        return regions

    @staticmethod
    def _measure(component: np.ndarray, slc: tuple[slice, slice], reference: np.ndarray, fraction: float) -> _Region:
        """Contrast, ellipse fit, axis ratio, solidity and border contact of one component."""
        area = float(component.sum())
        radius = math.sqrt(area / math.pi)
        ring_width = max(2, int(round(0.25 * radius)))
        ring = ndimage.binary_dilation(component, iterations=ring_width) & ~component
        contrast = float(reference[ring].mean() - reference[component].mean()) if ring.any() else 0.0

        rows, cols = np.nonzero(component)
        cy, cx = rows.mean(), cols.mean()
        cov = np.cov(np.stack([rows - cy, cols - cx])) + np.eye(2) / 12.0  # + pixel extent
        evals = np.linalg.eigvalsh(cov)
        axis_ratio = float(math.sqrt(max(evals[0], 1e-12) / max(evals[1], 1e-12)))
        yy, xx = np.mgrid[: component.shape[0], : component.shape[1]]
        d = np.stack([yy - cy, xx - cx], axis=-1)
        ellipse = np.einsum("...i,ij,...j->...", d, np.linalg.inv(cov), d) <= 4.0  # same second moments
        ellipse_fit = float((ellipse & component).sum() / (ellipse | component).sum())

        edge = component & ~ndimage.binary_erosion(component)
        er, ec = np.nonzero(edge)
        corners = np.concatenate([np.stack([er + dy, ec + dx], axis=1) for dy in (-0.5, 0.5) for dx in (-0.5, 0.5)])
        try:
            solidity = min(1.0, area / ConvexHull(corners).volume)
        except QhullError:  # degenerate (a line of pixels)
            solidity = 1.0
        on_border = edge[0, :].sum() + edge[-1, :].sum() + edge[1:-1, 0].sum() + edge[1:-1, -1].sum()
        r0, r1 = slc[0].start, slc[0].stop - 1
        c0, c1 = slc[1].start, slc[1].stop - 1
        return _Region(
            box=(c0, r0, c1, r1),
            contrast=contrast,
            area_fraction=float(fraction),
            ellipse_fit=ellipse_fit,
            axis_ratio=axis_ratio,
            solidity=float(solidity),
            border_fraction=float(on_border / max(1, edge.sum())),
        )

    def _score(self, region: _Region, shape: str | None) -> float:
        """The region's score in [0, 1] for a shape word (see the module docstring)."""
        contrast = 1.0 - math.exp(-max(region.contrast, 0.0) / self.contrast_scale)
        shape_term = 1.0 - self.shape_weight + self.shape_weight * _shape_score(region, shape)
        median, log_std = self.size_prior
        size = _gauss(math.log(region.area_fraction), math.log(median), log_std)
        border = math.exp(-self.border_weight * region.border_fraction)
        return float(contrast * shape_term * size * border)


def propose(image: np.ndarray, prompts: Sequence[str] = DEFAULT_PROMPTS, top_k: int = 5) -> list[BoxProposal]:
    """:meth:`AppearanceBoxProposer.propose` with the default settings."""
    return AppearanceBoxProposer().propose(image, prompts, top_k)
