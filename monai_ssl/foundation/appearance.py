"""Training-free, weight-free box proposals from appearance prompts ("dark oval", ...).

A stand-in for the Grounding DINO step of APPG (methods spec §1.2) that needs no model: each
prompt's brightness word ("dark" / "bright"; default "dark") and shape word ("oval", "round",
"lobulated", "irregular"; optional) are read as criteria, and candidate regions are taken from
the image itself:

1. robust intensity scaling (1st-99th percentile to [0, 1]), inverted for "bright", on a copy
   resized so its longest side is at most ``work_size``;
2. multi-scale Gaussian smoothing (``sigmas`` as fractions of the longest side) against speckle;
3. for each scale, the darkest ``quantiles`` of the pixels and the darkest ``local_quantiles``
   of a darker-than-surroundings map (the smoothed copy minus a ``background_sigma`` blur: lesions
   are hypoechoic relative to the tissue around them, whatever the overall gain), each opened,
   hole-filled, and split into 4-connected components whose area lies in ``[min_area, max_area]``
   of the image (identical components from several maps are measured once);
4. each component is scored in [0, 1] as
   ``contrast * (1 - shape_weight + shape_weight * shape) * size * border * position * depth`` where
   ``contrast`` = saturating (ring mean - inside mean) on the lightly smoothed image (ring: a
   band around the region, a quarter of its equivalent radius wide), ``shape`` = agreement with
   the shape word from the IoU of the region with its moment ellipse (ellipse fit), the ellipse's
   axis ratio and the region's solidity (area / convex-hull area), ``size`` = a log-normal prior on
   the area fraction, ``border`` = a penalty for regions touching the image border (acoustic
   shadows, the outside of the ultrasound fan) times ``1 - exp(-distance / margin_scale)`` for the
   box's distance to the nearest border (fraction of the longest side), ``position`` = a prior on
   the region's centre height (lesions lie in the breast tissue under the transducer, the upper
   middle of the image; deep dark areas are chest wall, rib and posterior shadows):
   ``1 - position_weight + position_weight * gauss(centre_y; position_prior)``, and ``depth`` =
   an optional penalty ``exp(-depth_weight * excess)`` for the part of the box below
   ``depth_start`` (off by default);
5. per prompt, near-duplicates (box IoU > ``dedup_iou``) are suppressed; across prompts,
   non-maximum suppression at ``nms_iou`` keeps the best-scored box of each place.

Defaults and calibration (protocol honesty): the constructor's defaults are generic, chosen
without looking at any dataset's masks (each is justified in the class docstring), and carry no
organ-specific prior: no position prior, a broad size prior, brightness from the prompt. The
target-specific settings (size prior and accepted area range, position prior, contrast scale,
border penalty, threshold quantiles, the brightness of prompts that name none) are fitted from a
split's *labelled* masks only by :mod:`monai_ssl.pseudo.calibration`
(``scripts/calibrate_appg.py``). Earlier versions shipped constants (size prior (0.05, 2.0),
position prior (0.3, 0.25), contrast scale 0.4, border weight 4, margin 0.05) chosen by looking at
the truth masks of about 120 unlabelled BUSI training images: label leakage, no longer the default
(``bundles/dual_teacher/docs/appg_legacy_busi_tuned.json`` keeps them for comparison only).

Prompt vocabulary: brightness words ``dark``/``hypoechoic``/``bright``/``hyperechoic``, shape words
``oval``/``elliptical``/``round``/``circular``/``lobulated``/``irregular``, and a few generic nouns that
carry no criterion (``lesion``, ``mass``, ``nodule``, ...). Any other word is an error that says
what was understood, so that no word silently changes or loses meaning; a prompt without a
brightness word takes the proposer's ``default_brightness`` (``"dark"`` unless calibrated), which
:meth:`AppearanceBoxProposer.interpret` reports.

Boxes are ``x0, y0, x1, y1`` pixel indices of the input image, inclusive (the first and last
column/row of the region), the convention of box prompts computed from masks in MedSAM.
Everything is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

__all__ = [
    "AppearanceBoxProposer",
    "AppearanceCriteria",
    "BoxProposal",
    "DEFAULT_PROMPTS",
    "DEFAULT_SHAPES",
    "box_iou",
    "parse_prompt",
    "prompt_brightness",
    "propose",
]

#: The paper's universal appearance prompts (GPT-5 output in APPG).
DEFAULT_PROMPTS: tuple[str, ...] = ("dark oval", "dark round", "dark lobulated")
#: The shape words of the paper's prompts (a calibration pairs them with the measured brightness).
DEFAULT_SHAPES: tuple[str, ...] = ("oval", "round", "lobulated")
BRIGHTNESSES: tuple[str, ...] = ("dark", "bright")

_BRIGHTNESS_WORDS = {"dark": "dark", "hypoechoic": "dark", "bright": "bright", "hyperechoic": "bright"}
_SHAPE_WORDS = {
    "oval": "oval",
    "elliptical": "oval",
    "round": "round",
    "circular": "round",
    "lobulated": "lobulated",
    "irregular": "irregular",
}
#: Words that name the target without a criterion (accepted and ignored).
_NEUTRAL_WORDS = frozenset(
    {"a", "an", "the", "lesion", "lesions", "mass", "masses", "nodule", "nodules", "tumor", "tumour", "cyst", "region",
     "area", "target", "structure", "object", "blob", "spot", "shaped", "with", "and", "in", "of"}
)


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
    """What a prompt asks for: ``brightness`` ("dark" / "bright") and ``shape`` (or ``None`` for any shape).

    ``brightness_given`` is False when the prompt named no brightness and the default was taken.
    """

    brightness: str
    shape: str | None
    brightness_given: bool = True

    def describe(self) -> str:
        """Plain words: ``"dark oval"``, ``"bright (any shape)"``; notes a defaulted brightness."""
        text = f"{self.brightness} {self.shape or '(any shape)'}"
        return text if self.brightness_given else f"{text} (no brightness word: default {self.brightness!r})"


def _words(prompt: str) -> list[str]:
    return "".join(c if c.isalpha() else " " for c in prompt.lower()).split()


def parse_prompt(prompt: str, default_brightness: str = "dark") -> AppearanceCriteria:
    """Read the brightness and shape words of ``prompt``; generic nouns ("lesion", "mass", ...) are ignored.

    A prompt without a brightness word takes ``default_brightness`` (``brightness_given`` False).
    Raises ``ValueError``, saying what was understood, for a word outside the vocabulary (so that
    "bright ring" does not silently become "bright, any shape"), when the prompt names neither a
    brightness nor a shape, or names two different brightnesses or shapes.
    """
    if default_brightness not in BRIGHTNESSES:
        raise ValueError(f"default_brightness must be one of {BRIGHTNESSES}, got {default_brightness!r}")
    words = _words(prompt)
    brightness = {_BRIGHTNESS_WORDS[w] for w in words if w in _BRIGHTNESS_WORDS}
    shape = {_SHAPE_WORDS[w] for w in words if w in _SHAPE_WORDS}
    unknown = [w for w in words if w not in _BRIGHTNESS_WORDS and w not in _SHAPE_WORDS and w not in _NEUTRAL_WORDS]
    vocabulary = (
        f"brightness words {sorted(_BRIGHTNESS_WORDS)}, shape words {sorted(_SHAPE_WORDS)}, "
        f"ignored nouns {sorted(_NEUTRAL_WORDS)}"
    )
    if unknown:
        understood = f"brightness {sorted(brightness) or 'none'}, shape {sorted(shape) or 'none'}"
        raise ValueError(
            f"prompt {prompt!r}: the appearance proposer does not know the word(s) {unknown} (understood: {understood}); "
            f"it knows {vocabulary}. Rephrase with those words, or use --proposer grounding_dino for free text"
        )
    if not brightness and not shape:
        raise ValueError(f"prompt {prompt!r} has no brightness word and no shape word; the vocabulary is {vocabulary}")
    if len(brightness) > 1 or len(shape) > 1:
        raise ValueError(f"prompt {prompt!r} names conflicting criteria: {sorted(brightness | shape)}")
    return AppearanceCriteria(
        brightness=next(iter(brightness)) if brightness else default_brightness,
        shape=next(iter(shape)) if shape else None,
        brightness_given=bool(brightness),
    )


def prompt_brightness(prompt: str, default: str = "dark") -> str:
    """The brightness a prompt asks for ("dark"/"bright"): its first brightness word, else ``default``.

    Lenient (any free-text prompt, e.g. one for Grounding DINO): other words are not checked.
    """
    for word in _words(prompt):
        if word in _BRIGHTNESS_WORDS:
            return _BRIGHTNESS_WORDS[word]
    return default


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
    centre_y: float = 0.5
    centre_x: float = 0.5
    bottom: float = 0.5
    border_distance: float = 0.5


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


def box_iou(a: Sequence[int], b: Sequence[int]) -> float:
    """IoU of two inclusive pixel boxes ``x0, y0, x1, y1``."""
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
        if all(box_iou(p.box, k.box) <= iou for k in kept):
            kept.append(p)
    return kept


class AppearanceBoxProposer:
    """Scored boxes for appearance prompts, computed from the image alone (see the module docstring).

    Every default is generic (no dataset's masks were looked at); the reason for each value is
    given with it. :func:`monai_ssl.pseudo.calibration.calibrate` replaces the target-specific
    ones (marked *calibrated*) by values fitted on a split's labelled masks.

    Args:
        work_size: longest side of the working copy of the image (speed; boxes are mapped back).
            128: the smallest size at which the default smallest region (``min_area``) is still
            about 6 x 6 pixels.
        sigmas: Gaussian smoothing scales as fractions of the working longest side. One octave
            apart (1, 2, 4 %), a standard scale-space sampling against speckle.
        quantiles: fractions of darkest pixels thresholded at each scale (*calibrated*). Default
            spaced roughly geometrically from 2 % to 50 %, so that a target of any size in
            ``[min_area, max_area]`` has a threshold close to its own area fraction.
        min_area, max_area: accepted region area as a fraction of the image (*calibrated*).
            Default 0.2 % (about the smallest region the smoothing resolves) to 80 % (anything
            but a near-whole image).
        size_prior: ``(median area fraction, log-std)`` of the log-normal size prior
            (*calibrated*). Default (0.1, 1.5): broad, its 2-std range (0.5 % to 100 %) covers
            the accepted areas, so it barely prefers a size.
        contrast_scale: ring-minus-inside contrast (in [0, 1] intensity units) giving a contrast
            score of ``1 - 1/e`` (*calibrated*: the labelled masks' median contrast). Default 0.2:
            a fifth of the robust intensity range.
        shape_weight: how much the shape word can lower a score (0 ignores shape). Default 0.5:
            the shape word can at most halve a score, so that brightness and contrast dominate.
        border_weight: strength of the border penalty ``exp(-border_weight * border_fraction)``
            (*calibrated* from how often labelled masks touch the border). Default 2: a region
            whose outline lies entirely on the border keeps e^-2 of its score.
        dedup_iou: box IoU above which a prompt's candidates are duplicates (0.7, the usual
            duplicate level of detectors).
        nms_iou: box IoU above which proposals of different prompts suppress each other (0.5,
            the usual non-maximum suppression level).
        local_quantiles: fractions of the most darker-than-surroundings pixels thresholded at
            each scale (*calibrated* as ``quantiles``; empty: global thresholds only).
        background_sigma: blur of the surroundings, as a fraction of the working longest side
            (0.15: several times the largest smoothing scale, so it measures the surroundings,
            not the region).
        position_prior: ``(mean, std)`` of the Gaussian prior on a region's centre height as a
            fraction of the image height (0 = top), or None for no prior (*calibrated*).
            Default None: a priori a target may lie anywhere.
        position_weight: how much the position prior can lower a score (0 ignores it).
        depth_start: fraction of the height below which a box's extent is penalised.
        depth_weight: strength of that depth penalty (0 = off, the default).
        margin_scale: distance to the border (fraction of the longest side) at which the margin
            factor is ``1 - 1/e`` (0 = off; *calibrated*). Default 0.02: a region must not
            merely touch the border, without preferring the centre.
        default_brightness: brightness of prompts that name none (*calibrated*: the labelled
            masks' measured brightness relative to their ring). Default "dark", the reading of
            the paper's prompts.
    """

    def __init__(
        self,
        work_size: int = 128,
        sigmas: Sequence[float] = (0.01, 0.02, 0.04),
        quantiles: Sequence[float] = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5),
        min_area: float = 0.002,
        max_area: float = 0.8,
        size_prior: tuple[float, float] = (0.1, 1.5),
        contrast_scale: float = 0.2,
        shape_weight: float = 0.5,
        border_weight: float = 2.0,
        dedup_iou: float = 0.7,
        nms_iou: float = 0.5,
        local_quantiles: Sequence[float] = (0.02, 0.05, 0.1, 0.2, 0.35),
        background_sigma: float = 0.15,
        position_prior: tuple[float, float] | None = None,
        position_weight: float = 1.0,
        depth_start: float = 1.0,
        depth_weight: float = 0.0,
        margin_scale: float = 0.02,
        default_brightness: str = "dark",
    ) -> None:
        if default_brightness not in BRIGHTNESSES:
            raise ValueError(f"default_brightness must be one of {BRIGHTNESSES}, got {default_brightness!r}")
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
        if not all(0.0 < q < 1.0 for q in local_quantiles):
            raise ValueError(f"local_quantiles must lie in (0, 1), got {list(local_quantiles)}")
        if not 0.0 <= position_weight <= 1.0:
            raise ValueError(f"position_weight must be in [0, 1], got {position_weight}")
        if background_sigma <= 0.0 or depth_weight < 0.0 or margin_scale < 0.0 or not 0.0 <= depth_start <= 1.0:
            raise ValueError(
                "need background_sigma > 0, depth_weight >= 0, margin_scale >= 0 and 0 <= depth_start <= 1, got "
                f"{background_sigma}, {depth_weight}, {margin_scale}, {depth_start}"
            )
        self.work_size = work_size
        self.sigmas = tuple(float(s) for s in sigmas)
        self.quantiles = tuple(float(q) for q in quantiles)
        self.min_area = min_area
        self.max_area = max_area
        self.contrast_scale = contrast_scale
        self.shape_weight = shape_weight
        self.border_weight = border_weight
        self.dedup_iou = dedup_iou
        self.nms_iou = nms_iou
        self.local_quantiles = tuple(float(q) for q in local_quantiles)
        self.background_sigma = float(background_sigma)
        self.position_prior = None if position_prior is None else (float(position_prior[0]), float(position_prior[1]))
        self.position_weight = float(position_weight)
        self.depth_start = float(depth_start)
        self.depth_weight = float(depth_weight)
        self.margin_scale = float(margin_scale)
        self.size_prior = (float(size_prior[0]), float(size_prior[1]))
        if self.size_prior[0] <= 0.0 or self.size_prior[1] <= 0.0 or contrast_scale <= 0.0:
            raise ValueError(f"need a positive size_prior median and log-std and contrast_scale, got {size_prior}, {contrast_scale}")
        self.default_brightness = default_brightness

    def interpret(self, prompts: Sequence[str]) -> list[str]:
        """How each phrase of ``prompts`` is read (``"'oval' -> dark oval (no brightness word: ...)"``).

        Raises ``ValueError`` (naming what was understood) for a phrase outside the vocabulary.
        """
        phrases = [p.strip() for prompt in prompts for p in prompt.split(".") if p.strip()]
        return [f"{phrase!r} -> {parse_prompt(phrase, self.default_brightness).describe()}" for phrase in phrases]

    def describe(self) -> dict[str, Any]:
        """What identifies these boxes for a config hash: every setting."""
        return {"name": "appearance", **vars(self)}

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
        criteria = {phrase: parse_prompt(phrase, self.default_brightness) for phrase in phrases}
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

    def _candidate_masks(self, dark: np.ndarray) -> list[np.ndarray]:
        """Binary dark maps: global quantile thresholds of each smoothed copy and, with
        ``local_quantiles``, quantile thresholds of its darker-than-surroundings map (smoothed minus
        a ``background_sigma`` blur)."""
        side = max(dark.shape)
        background = ndimage.gaussian_filter(dark, self.background_sigma * side) if self.local_quantiles else None
        masks = []
        for sigma in self.sigmas:
            smooth = ndimage.gaussian_filter(dark, max(0.5, sigma * side))
            masks += [smooth <= level for level in np.quantile(smooth, self.quantiles)]
            if background is not None:
                local = smooth - background
                masks += [local <= level for level in np.quantile(local, self.local_quantiles)]
        return masks

    def _regions(self, dark: np.ndarray) -> list[_Region]:
        """Candidate dark regions of ``dark`` (lesion = low values) over all maps; identical components measured once."""
        n_pixels = dark.size
        reference = ndimage.gaussian_filter(dark, max(0.5, self.sigmas[0] * max(dark.shape)))
        regions = []
        seen: set[tuple[int, ...]] = set()
        for raw in self._candidate_masks(dark):
            mask = ndimage.binary_fill_holes(ndimage.binary_opening(raw))
            labels, count = ndimage.label(mask)
            if count == 0:
                continue
            areas = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
            for idx, slc in enumerate(ndimage.find_objects(labels)):
                fraction = areas[idx] / n_pixels
                if slc is None or not self.min_area <= fraction <= self.max_area:
                    continue
                key = (slc[0].start, slc[0].stop, slc[1].start, slc[1].stop, int(areas[idx]))
                if key in seen:
                    continue
                seen.add(key)
                regions.append(self._measure(labels, idx + 1, slc, reference, fraction))
        return regions

    @staticmethod
    def _measure(labels: np.ndarray, label: int, slc: tuple[slice, slice], reference: np.ndarray, fraction: float) -> _Region:
        """Contrast, ellipse fit, axis ratio, solidity, position and border contact of one component.

        Measured on a window around the component (its box grown by the ring width and half its
        size), which holds the ring and the component's moment ellipse.
        """
        height, width = labels.shape
        r0, r1 = slc[0].start, slc[0].stop - 1
        c0, c1 = slc[1].start, slc[1].stop - 1
        area = float(np.count_nonzero(labels[slc] == label))
        radius = math.sqrt(area / math.pi)
        ring_width = max(2, int(round(0.25 * radius)))
        pad = ring_width + 1 + max(r1 - r0, c1 - c0) // 2
        wr0, wr1 = max(0, r0 - pad), min(height, r1 + 1 + pad)
        wc0, wc1 = max(0, c0 - pad), min(width, c1 + 1 + pad)
        component = labels[wr0:wr1, wc0:wc1] == label
        ref = reference[wr0:wr1, wc0:wc1]
        ring = ndimage.binary_dilation(component, iterations=ring_width) & ~component
        contrast = float(ref[ring].mean() - ref[component].mean()) if ring.any() else 0.0

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
        on_border = int(np.count_nonzero((er + wr0 == 0) | (er + wr0 == height - 1) | (ec + wc0 == 0) | (ec + wc0 == width - 1)))
        return _Region(
            box=(c0, r0, c1, r1),
            contrast=contrast,
            area_fraction=float(fraction),
            ellipse_fit=ellipse_fit,
            axis_ratio=axis_ratio,
            solidity=float(solidity),
            border_fraction=float(on_border / max(1, len(er))),
            centre_y=float((cy + wr0 + 0.5) / height),
            centre_x=float((cx + wc0 + 0.5) / width),
            bottom=float((r1 + 1) / height),
            border_distance=float(min(r0, c0, width - 1 - c1, height - 1 - r1) / max(height, width)),
        )

    def _score(self, region: _Region, shape: str | None) -> float:
        """The region's score in [0, 1] for a shape word (see the module docstring)."""
        contrast = 1.0 - math.exp(-max(region.contrast, 0.0) / self.contrast_scale)
        shape_term = 1.0 - self.shape_weight + self.shape_weight * _shape_score(region, shape)
        median, log_std = self.size_prior
        size = _gauss(math.log(region.area_fraction), math.log(median), log_std)
        border = math.exp(-self.border_weight * region.border_fraction)
        if self.margin_scale > 0.0:
            border *= 1.0 - math.exp(-region.border_distance / self.margin_scale)
        position = 1.0
        if self.position_prior is not None and self.position_weight > 0.0:
            mean, std = self.position_prior
            position = 1.0 - self.position_weight + self.position_weight * _gauss(region.centre_y, mean, std)
        depth = 1.0
        if self.depth_weight > 0.0 and self.depth_start < 1.0:
            depth = math.exp(-self.depth_weight * max(0.0, region.bottom - self.depth_start) / (1.0 - self.depth_start))
        return float(contrast * shape_term * size * border * position * depth)


def propose(image: np.ndarray, prompts: Sequence[str] = DEFAULT_PROMPTS, top_k: int = 5) -> list[BoxProposal]:
    """:meth:`AppearanceBoxProposer.propose` with the default settings."""
    return AppearanceBoxProposer().propose(image, prompts, top_k)
