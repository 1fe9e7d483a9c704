"""A U-Net on a selectable, optionally pretrained 2D encoder, that scripts, traces and exports cleanly.

MONAI's ``FlexibleUNet(backbone="resnet34")`` does not ``torch.jit.script`` in MONAI 1.6 (its
ResNet block keeps a ``functools.partial``), and tracing it bakes in the batch size. This network
uses plain modules only, so ``torch.jit.script``, ``torch.jit.trace`` and ``torch.export`` (with a
dynamic batch dimension) all work, which the bundle conformance tests check.

The encoders and their weights are in :mod:`monai_ssl.networks.encoders`.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .encoders import RESNET_LAYERS, build_encoder

__all__ = ["EncoderUNet", "ResNetUNet", "RESNET_LAYERS"]


class _DecoderBlock(nn.Module):
    """Upsample to the skip's size, concatenate the skip feature, then two conv-BN-ReLU layers."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels + skip_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: list[int]) -> torch.Tensor:
        """Upsample ``x`` to ``size`` (the skip's, or the output's), concatenate ``skip``, convolve."""
        if x.shape[-2] != size[0] or x.shape[-1] != size[1]:
            x = F.interpolate(x, size=size, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.block(x)


class EncoderUNet(nn.Module):
    """2D U-Net: an encoder of :data:`monai_ssl.networks.encoders.ENCODERS` and a five-stage decoder.

    The layout follows ``smp.Unet``: the encoder's five features (strides 2-32 for the CNNs) are
    the bottom and the skips of four decoder stages, each upsampling to its skip's size, and a
    fifth stage restores the input resolution. The input is
    first brought to what the encoder was trained on (grey to RGB, its normalisation), so the
    bundles feed ``[0, 1]``-scaled images whatever the encoder. Spatial sizes must be divisible
    by 32.

    Args:
        encoder: ``"resnet34"`` (default), ``"resnet18"``, ``"efficientnet-lite0"``, ``"litemedsam"``
            (256 x 256 inputs only).
        encoder_weights: ``None`` (random init), ``"pretrained"`` (weights a package ships) or a
            local state-dict file (see :func:`monai_ssl.networks.encoders.build_encoder`).
        in_channels: image channels (1 for grey ultrasound).
        out_channels: output logit channels (1 for binary segmentation with a sigmoid).
        decoder_channels: channels of the five decoder stages, coarse to fine.
        dropout: dropout probability on the deepest encoder feature (0 disables it).
    """

    def __init__(
        self,
        encoder: str = "resnet34",
        encoder_weights: str | os.PathLike | None = None,
        in_channels: int = 1,
        out_channels: int = 1,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 entries, got {list(decoder_channels)}")
        self.input_adapter, self.encoder = build_encoder(encoder, in_channels, encoder_weights)
        channels = tuple(self.encoder.channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        skip_channels = (channels[3], channels[2], channels[1], channels[0], 0)
        decoders = []
        prev = channels[4]
        for skip_ch, out_ch in zip(skip_channels, decoder_channels):
            decoders.append(_DecoderBlock(prev, skip_ch, out_ch))
            prev = out_ch
        self.decoder = nn.ModuleList(decoders)
        self.feature_channels = int(decoder_channels[-1])
        self.head = nn.Conv2d(self.feature_channels, out_channels, 1)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits, features)``; features are the last decoder map before the 1x1 head."""
        feats = self.encoder(self.input_adapter(x))
        out = self.dropout(feats[4])
        skips: list[torch.Tensor | None] = [feats[3], feats[2], feats[1], feats[0], None]
        sizes: list[list[int]] = [list(f.shape[-2:]) for f in feats[:4]][::-1] + [list(x.shape[-2:])]
        for i, block in enumerate(self.decoder):
            out = block(out, skips[i], sizes[i])
        return self.head(out), out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return segmentation logits of shape ``(B, out_channels, H, W)``."""
        return self.forward_features(x)[0]


class ResNetUNet(EncoderUNet):
    """:class:`EncoderUNet` with a ResNet-18/34 encoder, under the name earlier configs use.

    Args:
        spatial_dims: must be 2.
        in_channels: image channels.
        out_channels: output logit channels.
        backbone: ``"resnet34"`` (default) or ``"resnet18"``.
        decoder_channels: channels of the five decoder stages, coarse to fine.
        dropout: dropout on the deepest encoder feature.
        encoder_weights: ``None`` or a local torchvision state-dict file.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        backbone: str = "resnet34",
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        dropout: float = 0.0,
        encoder_weights: str | os.PathLike | None = None,
    ) -> None:
        if spatial_dims != 2:
            raise ValueError(f"ResNetUNet is 2D only, got spatial_dims={spatial_dims} (the 3D networks are in dual_3d)")
        if backbone not in RESNET_LAYERS:
            raise ValueError(f"backbone must be one of {sorted(RESNET_LAYERS)}, got {backbone!r}")
        super().__init__(backbone, encoder_weights, in_channels, out_channels, decoder_channels, dropout)
