"""Box-prompted Segment Anything (``segment_anything``) from a local checkpoint (APPG step 3, Eq.5).

:func:`load_sam` builds the architecture with ``segment_anything.sam_model_registry[model_type]``
(``vit_b`` / ``vit_l`` / ``vit_h``; or with a ``builder`` callable for other sizes) and strictly
loads the checkpoint's state dict; a checkpoint of another size is reported with the size it looks
like. :class:`SamSegmenter` satisfies
:class:`~monai_ssl.foundation.interfaces.PromptableSegmenter`: images are resized exactly as
``SamPredictor.set_image`` does (longest side to the encoder size with PIL bilinear, the
``ResizeLongestSide`` + ``to_pil_image``/``resize`` path), normalised and padded by
``Sam.preprocess``, and encoded in batches; every image's boxes are then decoded together by
``SamPredictor.predict_torch`` on the stored embedding, so the encoder runs once per image.

``segment_anything`` imports torchvision at package import (``batched_nms``/``box_area`` for the
automatic mask generator, ``resize``/``to_pil_image`` for ``SamPredictor.set_image``). When
torchvision cannot be imported (a build for another torch), :func:`import_segment_anything`
imports the package with stand-in torchvision modules installed in ``sys.modules`` only for the
duration of that import; the stand-in functions raise with the original import error when
called. Nothing on this module's path calls them.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from monai_ssl.utils import modules_replaced, safe_torch_load

from .interfaces import torchvision_import_error
from .litemedsam import BoxSegmentation, BoxSegmenterBase, as_rgb_array

__all__ = ["SAM_EMBED_DIMS", "SamSegmenter", "import_segment_anything", "load_sam"]

logger = logging.getLogger(__name__)

#: Image-encoder width of each registry size, to name the size a checkpoint was trained as.
SAM_EMBED_DIMS: dict[str, int] = {"vit_b": 768, "vit_l": 1024, "vit_h": 1280}
_STAND_IN_NAMES = {
    "torchvision.ops.boxes": ("batched_nms", "box_area"),
    "torchvision.transforms.functional": ("resize", "to_pil_image"),
}


def _unavailable(name: str, err: Exception) -> Callable[..., Any]:
    """A function that raises, naming the torchvision function and why torchvision is unusable."""

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"torchvision.{name} is unavailable: import torchvision failed ({type(err).__name__}: {err}); "
            "monai_ssl's SamSegmenter does not need it (SamPredictor.set_image and SamAutomaticMaskGenerator do)"
        )

    fail.__name__ = name.rsplit(".", 1)[-1]
    return fail


def _stand_in_modules(err: Exception) -> dict[str, types.ModuleType]:
    """Stand-in ``torchvision`` modules holding the four names segment_anything imports."""
    names = ("torchvision", "torchvision.ops", "torchvision.transforms", *_STAND_IN_NAMES)
    modules = {name: types.ModuleType(name) for name in names}
    for module_name, functions in _STAND_IN_NAMES.items():
        for fn in functions:
            setattr(modules[module_name], fn, _unavailable(f"{module_name.split('.', 1)[1]}.{fn}", err))
    modules["torchvision"].ops = modules["torchvision.ops"]  # type: ignore[attr-defined]
    modules["torchvision"].transforms = modules["torchvision.transforms"]  # type: ignore[attr-defined]
    modules["torchvision.ops"].boxes = modules["torchvision.ops.boxes"]  # type: ignore[attr-defined]
    modules["torchvision.transforms"].functional = modules["torchvision.transforms.functional"]  # type: ignore[attr-defined]
    return modules


def import_segment_anything() -> types.ModuleType:
    """Import ``segment_anything``, with the scoped torchvision stand-ins when torchvision cannot be imported."""
    if "segment_anything" in sys.modules:
        return sys.modules["segment_anything"]
    err = torchvision_import_error()
    if err is None:
        import segment_anything

        return segment_anything
    logger.warning(
        "import torchvision failed (%s: %s); importing segment_anything with stand-ins for the torchvision "
        "functions it imports (unused by SamSegmenter)",
        type(err).__name__,
        err,
    )
    with modules_replaced(_stand_in_modules(err)):
        import segment_anything
    return segment_anything


def _checkpoint_size(state: dict[str, torch.Tensor]) -> str:
    """The registry size whose encoder width matches the checkpoint, or a description of the width."""
    weight = state.get("image_encoder.patch_embed.proj.weight")
    if weight is None:
        return "no SAM image encoder (image_encoder.patch_embed.proj.weight is absent)"
    width = int(weight.shape[0])
    names = [name for name, dim in SAM_EMBED_DIMS.items() if dim == width]
    return names[0] if names else f"an encoder of width {width}"


def load_sam(
    checkpoint: str | Path,
    model_type: str = "vit_b",
    device: str | torch.device = "cpu",
    builder: Callable[[], nn.Module] | None = None,
) -> nn.Module:
    """Build a SAM and strictly load ``checkpoint``; returns it in eval mode on ``device``.

    Args:
        checkpoint: a state dict file (bare, or under ``"model"`` / ``"state_dict"``).
        model_type: ``segment_anything.sam_model_registry`` key (``vit_b``, ``vit_l``, ``vit_h``).
        device: where the model goes.
        builder: builds the (randomly initialised) architecture instead of the registry, for SAM
            variants the registry does not know; ``model_type`` is then only used in messages.
    """
    checkpoint = Path(checkpoint).expanduser()
    if not checkpoint.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {checkpoint}")
    if builder is None:
        registry = import_segment_anything().sam_model_registry
        if model_type not in registry:
            raise ValueError(f"unknown SAM model_type {model_type!r}; choose one of {sorted(registry)}")
        net = registry[model_type](checkpoint=None)
    else:
        import_segment_anything()
        net = builder()
    state = safe_torch_load(checkpoint, "SAM checkpoint")
    if isinstance(state, dict):
        state = state.get("model", state.get("state_dict", state))
    if not isinstance(state, dict):
        raise ValueError(f"SAM checkpoint {checkpoint} holds a {type(state).__name__}, not a state dict")
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or reshaped:
        example = (reshaped or missing or unexpected)[0]
        raise ValueError(
            f"SAM checkpoint {checkpoint} does not fit model_type {model_type!r} (the checkpoint looks like "
            f"{_checkpoint_size(state)}): {len(missing)} missing, {len(unexpected)} unexpected and {len(reshaped)} "
            f"differently shaped tensors, e.g. {example!r}"
        )
    net.load_state_dict(state, strict=True)
    return net.to(device).eval()


class SamSegmenter(BoxSegmenterBase):
    """Box-prompted SAM: encoder batched over images, once per image; all boxes of an image decoded together.

    Args:
        checkpoint: SAM checkpoint path (ignored when ``model`` is given).
        model_type: registry size of the checkpoint.
        device: where inference runs.
        encoder_batch_size: images per image-encoder forward.
        multimask_output: decode SAM's three masks per box and keep the one with the highest
            predicted IoU, instead of the single-mask output (methods spec §1.2 step 3 allows both).
        model: an already loaded ``segment_anything`` ``Sam`` (e.g. from :func:`load_sam` with a builder).
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        model_type: str = "vit_b",
        device: str | torch.device = "cpu",
        encoder_batch_size: int = 4,
        multimask_output: bool = False,
        model: nn.Module | None = None,
    ) -> None:
        if encoder_batch_size < 1:
            raise ValueError(f"encoder_batch_size must be >= 1, got {encoder_batch_size}")
        if model is None and checkpoint is None:
            raise ValueError("give a SAM checkpoint path or a loaded model")
        self.device = torch.device(device)
        self.checkpoint = Path(checkpoint).expanduser().resolve() if checkpoint is not None else None
        self.model_type = model_type
        self.model = (model if model is not None else load_sam(checkpoint, model_type, self.device)).to(self.device).eval()
        self.encoder_batch_size = encoder_batch_size
        self.multimask_output = multimask_output
        sam = import_segment_anything()
        self.predictor = sam.SamPredictor(self.model)
        self.target_length = int(self.model.image_encoder.img_size)

    def describe(self) -> dict[str, Any]:
        """What identifies these masks for a config hash: model type, checkpoint path and size, decoding."""
        checkpoint = self.checkpoint
        return {
            "name": "sam",
            "model_type": self.model_type,
            "checkpoint": str(checkpoint) if checkpoint else "in-memory model",
            "bytes": checkpoint.stat().st_size if checkpoint and checkpoint.exists() else None,
            "multimask_output": self.multimask_output,
        }

    def _resize(self, image: np.ndarray) -> np.ndarray:
        """(h, w, 3) uint8 image with the longest side at the encoder size (SamPredictor.set_image's resize)."""
        arr = as_rgb_array(image)
        new_h, new_w = self.predictor.transform.get_preprocess_shape(arr.shape[0], arr.shape[1], self.target_length)
        pil = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        return np.array(pil.resize((new_w, new_h), Image.BILINEAR))

    @torch.no_grad()
    def segment_batch(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray | Sequence[Sequence[float]]]
    ) -> list[BoxSegmentation]:
        """Segment several images (any sizes), each with its own (K_i, 4) boxes; encoder batched over images."""
        self._check_pairs(images, boxes)
        results: list[BoxSegmentation] = []
        for start in range(0, len(images), self.encoder_batch_size):
            chunk = images[start : start + self.encoder_batch_size]
            resized = [self._resize(img) for img in chunk]
            batch = torch.cat(
                [
                    self.model.preprocess(torch.as_tensor(r, device=self.device).permute(2, 0, 1)[None].float())
                    for r in resized
                ]
            )
            features = self.model.image_encoder(batch)
            for i, (image, box_set) in enumerate(zip(chunk, boxes[start : start + self.encoder_batch_size])):
                size = tuple(np.asarray(image).shape[:2])
                results.append(self._decode(features[i : i + 1], resized[i].shape[:2], size, box_set))
        return results

    def _decode(
        self,
        features: torch.Tensor,
        input_size: tuple[int, int],
        size: tuple[int, int],
        box_set: np.ndarray | Sequence[Sequence[float]],
    ) -> BoxSegmentation:
        """Masks and IoU for one image's boxes on its embedding, through ``SamPredictor.predict_torch``."""
        box_arr = np.asarray(box_set, dtype=np.float32).reshape(-1, 4)
        if len(box_arr) == 0:
            return BoxSegmentation(np.zeros((0, *size), dtype=bool), np.zeros((0,), dtype=np.float32))
        if np.any(box_arr[:, 2] < box_arr[:, 0]) or np.any(box_arr[:, 3] < box_arr[:, 1]):
            raise ValueError(f"boxes must be x0, y0, x1, y1 with x1 >= x0 and y1 >= y0, got {box_arr.tolist()}")
        predictor = self.predictor
        # the state SamPredictor.set_torch_image would set, from the batched encoder output
        predictor.reset_image()
        predictor.features, predictor.input_size, predictor.original_size = features, tuple(input_size), size
        predictor.is_image_set = True
        box_t = torch.as_tensor(predictor.transform.apply_boxes(box_arr, size), dtype=torch.float32, device=self.device)
        masks, iou, _ = predictor.predict_torch(None, None, boxes=box_t, multimask_output=self.multimask_output)
        best = iou.argmax(dim=1)  # a single column unless multimask_output
        rows = torch.arange(len(box_arr), device=masks.device)
        predictor.reset_image()
        return BoxSegmentation(masks=masks[rows, best].cpu().numpy(), iou=iou[rows, best].float().cpu().numpy())
