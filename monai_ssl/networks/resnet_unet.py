"""A ResNet-encoder U-Net that scripts, traces and exports cleanly.

MONAI's ``FlexibleUNet(backbone="resnet34")`` does not ``torch.jit.script`` in MONAI 1.6 (its
ResNet block keeps a ``functools.partial``), and tracing it bakes in the batch size. This network
uses plain modules only, so ``torch.jit.script``, ``torch.jit.trace`` and ``torch.export`` (with a
dynamic batch dimension) all work, which the bundle conformance tests check.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from monai.networks.layers.factories import Conv, Norm, Pool

__all__ = ["ResNetUNet", "RESNET_LAYERS"]

#: Blocks per encoder stage of the torchvision ResNet variants built from basic blocks.
RESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
}


class _BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convolutions with a residual connection)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        conv, norm = Conv[Conv.CONV, spatial_dims], Norm[Norm.BATCH, spatial_dims]
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                conv(in_channels, out_channels, 1, stride=stride, bias=False), norm(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class _DecoderBlock(nn.Module):
    """Upsample x2, concatenate the skip feature, then two conv-BN-ReLU layers."""

    def __init__(self, spatial_dims: int, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        conv, norm = Conv[Conv.CONV, spatial_dims], Norm[Norm.BATCH, spatial_dims]
        self.block = nn.Sequential(
            conv(in_channels + skip_channels, out_channels, 3, padding=1, bias=False),
            norm(out_channels),
            nn.ReLU(inplace=True),
            conv(out_channels, out_channels, 3, padding=1, bias=False),
            norm(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.block(x)


class ResNetUNet(nn.Module):
    """U-Net with a ResNet-18/34 encoder (random init) and a five-stage upsampling decoder.

    The layout follows the common ``smp.Unet('resnet34')``: a 7x7 stride-2 stem, max-pooling, four
    residual stages (64, 128, 256, 512 channels) and decoder stages of ``decoder_channels`` that
    restore the input resolution. Spatial sizes must be divisible by 32.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (1 for grayscale ultrasound).
        out_channels: output logit channels (1 for binary segmentation with a sigmoid).
        backbone: ``"resnet34"`` (default) or ``"resnet18"``.
        decoder_channels: channels of the five decoder stages, coarse to fine.
        dropout: dropout probability applied to the deepest encoder feature (0 disables it).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        backbone: str = "resnet34",
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if backbone not in RESNET_LAYERS:
            raise ValueError(f"backbone must be one of {sorted(RESNET_LAYERS)}, got {backbone!r}")
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 entries, got {list(decoder_channels)}")
        conv, norm = Conv[Conv.CONV, spatial_dims], Norm[Norm.BATCH, spatial_dims]
        pool = Pool[Pool.MAX, spatial_dims]
        self.spatial_dims = spatial_dims
        self.stem = nn.Sequential(
            conv(in_channels, 64, 7, stride=2, padding=3, bias=False), norm(64), nn.ReLU(inplace=True)
        )
        self.pool = pool(kernel_size=3, stride=2, padding=1)
        encoder_channels = (64, 128, 256, 512)
        stages = []
        in_ch = 64
        for i, (out_ch, blocks) in enumerate(zip(encoder_channels, RESNET_LAYERS[backbone])):
            layers = [_BasicBlock(spatial_dims, in_ch, out_ch, stride=1 if i == 0 else 2)]
            layers += [_BasicBlock(spatial_dims, out_ch, out_ch, stride=1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            in_ch = out_ch
        self.encoder = nn.ModuleList(stages)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # skips, deepest first: layer3 (256), layer2 (128), layer1 (64), stem (64), none
        skip_channels = (256, 128, 64, 64, 0)
        decoders = []
        prev = 512
        for skip_ch, out_ch in zip(skip_channels, decoder_channels):
            decoders.append(_DecoderBlock(spatial_dims, prev, skip_ch, out_ch))
            prev = out_ch
        self.decoder = nn.ModuleList(decoders)
        self.feature_channels = int(decoder_channels[-1])
        self.head = conv(self.feature_channels, out_channels, 1)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits, features)``; features are the last decoder map before the 1x1 head."""
        stem = self.stem(x)
        feats = [stem]
        out = self.pool(stem)
        for stage in self.encoder:
            out = stage(out)
            feats.append(out)
        out = self.dropout(feats[-1])
        skips: list[torch.Tensor | None] = [feats[3], feats[2], feats[1], feats[0], None]
        for i, block in enumerate(self.decoder):
            out = block(out, skips[i])
        return self.head(out), out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return segmentation logits of shape ``(B, out_channels, *spatial)``."""
        return self.forward_features(x)[0]
