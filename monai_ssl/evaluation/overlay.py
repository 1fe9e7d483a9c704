"""Contour overlays of truth (green) and prediction (red) on a grayscale slice, as PNG."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from .metrics import _binary_mask, _to_numpy
from monai_ssl.utils import atomic_write

__all__ = ["save_overlay", "select_slice"]

TRUTH_RGB = (0, 255, 0)
PRED_RGB = (255, 0, 0)
BOTH_RGB = (255, 255, 0)
HEADER_PX = 16
MIN_SIDE_PX = 256


def select_slice(truth: np.ndarray, pred: np.ndarray) -> int:
    """Index along the last axis of a 3D case to display.

    The slice with the largest truth area; if the truth is empty, the largest
    prediction area; if both are empty, the middle slice.
    """
    for mask in (truth, pred):
        areas = mask.sum(axis=(0, 1))
        if areas.max() > 0:
            return int(areas.argmax())
    return truth.shape[-1] // 2


def _contour(mask: np.ndarray, width: int) -> np.ndarray:
    """Inner boundary of ``mask``, ``width`` pixels thick (outside the image counts as background)."""
    if not mask.any():
        return mask
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def save_overlay(
    image: Any, truth: Any, pred: Any, path: str | os.PathLike, title: str | None = None, xy_order: bool = True
) -> None:
    """Save a PNG of a 2D image (or one slice of a 3D one) with truth/prediction contours.

    The image (``(C, *spatial)`` uses channel 0, or ``(*spatial)``) is min-max scaled
    to grayscale. With ``xy_order`` (MONAI's convention: arrays indexed ``[x, y]``, as its
    PIL/NIfTI/ITK readers load them) the slice is transposed for display; otherwise array rows
    are image rows. For 3D data the slice along the last axis
    is chosen by :func:`select_slice`. Small images are upscaled (nearest neighbour) by
    the integer factor ``max(1, 256 // max(H, W))`` and a 16-pixel legend strip
    ("truth" green, "pred" red, overlap yellow, then ``title``) is added on top, so the
    PNG is ``(W * k)`` wide and ``(H * k + 16)`` high. Empty masks draw no contour.
    The file is written atomically.
    """
    t = _binary_mask(truth, "truth")
    p = _binary_mask(pred, "pred")
    img = _to_numpy(image).astype(np.float64)
    if img.ndim == t.ndim + 1:
        img = img[0]
    if img.shape != t.shape or p.shape != t.shape:
        raise ValueError(f"shape mismatch: image {img.shape}, truth {t.shape}, pred {p.shape}")
    if t.ndim == 3:
        idx = select_slice(t, p)
        img, t, p = img[..., idx], t[..., idx], p[..., idx]
    if xy_order:
        img, t, p = img.T, t.T, p.T

    img = np.nan_to_num(img)
    lo, hi = float(img.min()), float(img.max())
    gray = ((img - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(img)).astype(np.uint8)
    k = max(1, MIN_SIDE_PX // max(t.shape))
    if k > 1:
        gray, t, p = (np.kron(a, np.ones((k, k), dtype=a.dtype)) for a in (gray, t, p))

    width = 1 if k == 1 else 2
    ct, cp = _contour(t, width), _contour(p, width)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    rgb[ct] = TRUTH_RGB
    rgb[cp] = PRED_RGB
    rgb[ct & cp] = BOTH_RGB

    canvas = Image.new("RGB", (rgb.shape[1], rgb.shape[0] + HEADER_PX))
    canvas.paste(Image.fromarray(rgb), (0, HEADER_PX))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    x = 2
    for text, color in (("truth", TRUTH_RGB), ("pred", PRED_RGB), (title or "", (255, 255, 255))):
        draw.text((x, 2), text, fill=color, font=font)
        x += int(draw.textlength(text, font=font)) + 8

    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write(path, buf.getvalue())
