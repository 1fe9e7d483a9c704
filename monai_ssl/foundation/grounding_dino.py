"""Grounding DINO box proposals (APPG step 2, methods spec §1.2, Eq.4) through ``transformers``.

The model and its processor are loaded from a local folder (``save_pretrained`` layout, e.g. a
snapshot of ``IDEA-Research/grounding-dino-tiny``) with ``local_files_only=True``: nothing is
downloaded. Prompts are phrases joined Grounding-DINO style, lower case, each ending with '.'
(``"dark oval. dark round. dark lobulated."``). A box is kept when its best token probability
exceeds ``box_threshold``; its label is the phrase made of the tokens above ``text_threshold``
(transformers' ``post_process_grounded_object_detection``). Boxes are then suppressed at box IoU
``nms_iou`` (Grounding DINO's queries often return near-duplicates) and the best ``top_k`` are
returned as inclusive pixel boxes of the input image.

Loading: ``AutoModelForZeroShotObjectDetection`` and ``AutoTokenizer`` with the folder's files,
and always the PIL Grounding DINO image processor (``GroundingDinoImageProcessorPil``, built from
the folder's processor config: same resize, rescale, normalisation and padding as the torchvision
one), so results do not depend on whether torchvision works. When torchvision cannot be imported
(a build for another torch), transformers is imported and loaded without it (see
:func:`~monai_ssl.foundation.interfaces.hidden_broken_torchvision`); ``AutoProcessor`` is not used
because it resolves the torchvision image processor when transformers was imported before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .appearance import DEFAULT_PROMPTS, BoxProposal, _nms
from .interfaces import hidden_broken_torchvision

__all__ = ["GroundingDinoProposer", "grounding_dino_text"]

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def grounding_dino_text(prompts: Sequence[str]) -> str:
    """One Grounding DINO caption from prompts: phrases lower-cased, each ending with '.'.

    A prompt may itself hold several '.'-separated phrases. Raises ``ValueError`` when no phrase is left.
    """
    phrases = [p.strip().lower() for prompt in prompts for p in prompt.split(".") if p.strip()]
    if not phrases:
        raise ValueError(f"no prompt phrase in {list(prompts)!r}")
    return " ".join(f"{p}." for p in phrases)


def _check_model_dir(model_dir: Path) -> None:
    """Raise ``FileNotFoundError`` naming ``model_dir`` and what it lacks."""
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"Grounding DINO folder {model_dir} does not exist; give a local save_pretrained folder "
            "(e.g. a snapshot of IDEA-Research/grounding-dino-tiny): nothing is downloaded"
        )
    missing = []
    if not (model_dir / "config.json").is_file():
        missing.append("config.json")
    if not any((model_dir / f).is_file() for f in _WEIGHT_FILES):
        missing.append(f"weights (one of {list(_WEIGHT_FILES)})")
    if not any((model_dir / f).is_file() for f in _PROCESSOR_FILES):
        missing.append(f"processor config (one of {list(_PROCESSOR_FILES)})")
    if missing:
        raise FileNotFoundError(f"Grounding DINO folder {model_dir} lacks {', '.join(missing)}")


class GroundingDinoProposer:
    """Scored boxes from a local Grounding DINO (``AutoModelForZeroShotObjectDetection``).

    Args:
        model_dir: folder holding ``config.json``, the weights and the processor files.
        box_threshold: minimum box score (max over tokens of the sigmoid logits); 0.35 is
            Grounding DINO's default.
        text_threshold: minimum token probability for a token to enter the box's label.
        top_k: number of boxes :meth:`propose` returns when not told otherwise.
        nms_iou: box IoU above which a lower-scored box is dropped; ``None`` keeps all.
        device: where the model runs.
    """

    def __init__(
        self,
        model_dir: str | Path,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        top_k: int = 5,
        nms_iou: float | None = 0.7,
        device: str | torch.device = "cpu",
    ) -> None:
        if not 0.0 <= box_threshold < 1.0 or not 0.0 <= text_threshold < 1.0:
            raise ValueError(f"thresholds must lie in [0, 1), got box {box_threshold}, text {text_threshold}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.model_dir = Path(model_dir).expanduser()
        _check_model_dir(self.model_dir)
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.top_k = top_k
        self.nms_iou = nms_iou
        self.device = torch.device(device)
        with hidden_broken_torchvision():
            from transformers import AutoModelForZeroShotObjectDetection, AutoTokenizer
            from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
                GroundingDinoImageProcessorPil,
            )
            from transformers.models.grounding_dino.processing_grounding_dino import GroundingDinoProcessor

            try:
                self.processor = GroundingDinoProcessor(
                    image_processor=GroundingDinoImageProcessorPil.from_pretrained(self.model_dir, local_files_only=True),
                    tokenizer=AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True),
                )
                self.model = AutoModelForZeroShotObjectDetection.from_pretrained(self.model_dir, local_files_only=True)
            except (OSError, ValueError, KeyError) as err:
                raise RuntimeError(f"could not load Grounding DINO from {self.model_dir}: {err}") from err
        self.model.to(self.device).eval()

    @torch.no_grad()
    def describe(self) -> dict[str, Any]:
        """What identifies these boxes for a config hash: model folder and thresholds."""
        return {
            "name": "grounding_dino",
            "model_dir": str(self.model_dir.resolve()),
            "box_threshold": self.box_threshold,
            "text_threshold": self.text_threshold,
            "nms_iou": self.nms_iou,
        }

    def propose(
        self, image: np.ndarray, prompts: Sequence[str] = DEFAULT_PROMPTS, top_k: int | None = None
    ) -> list[BoxProposal]:
        """Up to ``top_k`` (default: the constructor's) proposals for a (H, W) or (H, W, 3) image, best first.

        ``score`` is the box score, ``prompt`` the phrase Grounding DINO matched (may be empty when
        no token passes ``text_threshold``).
        """
        top_k = self.top_k if top_k is None else top_k
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"expected a (H, W) or (H, W, 3) image, got shape {np.asarray(image).shape}")
        height, width = arr.shape[:2]
        pil = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        inputs = self.processor(images=pil, text=grounding_dino_text(prompts), return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        result = self.processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=self.box_threshold,
            text_threshold=self.text_threshold,
            target_sizes=[(height, width)],
        )[0]
        proposals = []
        for score, box, label in zip(result["scores"].tolist(), result["boxes"].tolist(), result["text_labels"]):
            x0 = min(width - 1, max(0, math.floor(box[0])))
            y0 = min(height - 1, max(0, math.floor(box[1])))
            x1 = min(width - 1, max(x0, math.ceil(box[2]) - 1))  # continuous right edge -> last pixel index
            y1 = min(height - 1, max(y0, math.ceil(box[3]) - 1))
            proposals.append(BoxProposal(x0, y0, x1, y1, score=float(score), prompt=str(label)))
        if self.nms_iou is not None:
            return _nms(proposals, self.nms_iou)[:top_k]
        return sorted(proposals, key=lambda p: (-p.score, p.box, p.prompt))[:top_k]
