"""The two roles of APPG (methods spec §1.2) as protocols, a bf16 wrapper, and a torchvision guard.

* :class:`BoxProposer`: ``propose(image, prompts, top_k) -> list[BoxProposal]``, best first, boxes
  as inclusive pixel indices ``x0, y0, x1, y1`` of the input image. Satisfied as they are by
  :class:`~monai_ssl.foundation.appearance.AppearanceBoxProposer` (no weights) and
  :class:`~monai_ssl.foundation.grounding_dino.GroundingDinoProposer`.
* :class:`PromptableSegmenter`: ``segment_batch(images, boxes) -> list[BoxSegmentation]``, one
  mask and one predicted IoU per box, the image encoder run once per image and batched over
  images. Satisfied as they are by
  :class:`~monai_ssl.foundation.litemedsam.LiteMedSAMPredictor` and
  :class:`~monai_ssl.foundation.sam.SamSegmenter`; :class:`AutocastSegmenter` runs any of them
  under bf16 autocast.

Images are numpy arrays ``(H, W)`` (8-bit grayscale) or ``(H, W, 3)`` in natural row order (row =
y, column = x), as PIL loads a PNG.

:func:`hidden_broken_torchvision` exists because a PyPI torchvision built for another torch fails
at import ("operator torchvision::nms does not exist"), which makes every ``transformers`` vision
import fail even though transformers runs without torchvision.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .appearance import BoxProposal
from .litemedsam import BoxSegmentation

__all__ = [
    "AutocastSegmenter",
    "BoxProposer",
    "PromptableSegmenter",
    "bf16_supported",
    "hidden_broken_torchvision",
    "torchvision_import_error",
]

logger = logging.getLogger(__name__)
_ABSENT = object()


@runtime_checkable
class BoxProposer(Protocol):
    """Scored candidate boxes for text prompts on one image, best first."""

    def propose(self, image: np.ndarray, prompts: Sequence[str], top_k: int) -> list[BoxProposal]:
        """Up to ``top_k`` proposals for a ``(H, W)`` or ``(H, W, 3)`` image; ``[]`` when nothing is found."""
        ...


@runtime_checkable
class PromptableSegmenter(Protocol):
    """Box-prompted segmentation: one mask and one predicted IoU per box."""

    def segment_batch(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray | Sequence[Sequence[float]]]
    ) -> list[BoxSegmentation]:
        """Masks ``(K_i, H_i, W_i)`` and IoU ``(K_i,)`` for each image and its ``(K_i, 4)`` inclusive boxes."""
        ...


class AutocastSegmenter:
    """Run a :class:`PromptableSegmenter` under ``torch.autocast(device_type, bfloat16)``.

    On CPUs with native bf16 (AVX512-BF16, AMX) this speeds up the image encoder and lowers its
    memory; masks differ from fp32 at boundary pixels (LiteMedSAM on 5 synthetic images: the same
    chosen candidates, per-image Dice against truth within 0.04, predicted IoU within 0.01).
    """

    def __init__(self, segmenter: PromptableSegmenter, device_type: str = "cpu") -> None:
        self.segmenter = segmenter
        self.device_type = device_type

    def segment_batch(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray | Sequence[Sequence[float]]]
    ) -> list[BoxSegmentation]:
        """The wrapped segmenter's ``segment_batch`` under bf16 autocast; IoU returned as float32."""
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            results = self.segmenter.segment_batch(images, boxes)
        return [BoxSegmentation(masks=r.masks, iou=np.asarray(r.iou, dtype=np.float32)) for r in results]


def bf16_supported(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU advertises native bf16 arithmetic (``avx512_bf16`` or ``amx_bf16`` flags, Linux)."""
    try:
        flags = Path(cpuinfo).read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@lru_cache(maxsize=1)
def torchvision_import_error() -> Exception | None:
    """The exception ``import torchvision`` raises in this process (cached), or ``None`` when it imports."""
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # RuntimeError (torch/torchvision mismatch), ImportError (absent), ...
        return err
    return None


@lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time only."""
    logger.warning(message)


@contextlib.contextmanager
def hidden_broken_torchvision() -> Iterator[None]:
    """While active, make an unimportable torchvision look absent to ``transformers``.

    A no-op when torchvision imports. Otherwise ``sys.modules["torchvision"]`` is set to ``None``
    (``import torchvision`` then raises ImportError and ``importlib.util.find_spec`` returns None)
    and transformers' cached ``is_torchvision_available`` checks are re-evaluated, so transformers
    picks its PIL image processors; on exit the entry is removed again. transformers keeps the
    cached "not available" answer, so its classes imported or loaded inside the block keep working.
    """
    err = torchvision_import_error()
    if err is None:
        yield
        return
    _warn_once(f"import torchvision failed ({type(err).__name__}: {err}); transformers runs without it (PIL image processors)")
    saved = sys.modules.get("torchvision", _ABSENT)
    sys.modules["torchvision"] = None  # type: ignore[assignment]
    try:
        from transformers.utils import import_utils

        for name in ("is_torchvision_available", "is_torchvision_v2_available"):
            check = getattr(import_utils, name, None)
            if hasattr(check, "cache_clear"):
                check.cache_clear()
        yield
    finally:
        if saved is _ABSENT:
            sys.modules.pop("torchvision", None)
        else:
            sys.modules["torchvision"] = saved  # type: ignore[assignment]
