"""The two 3D subnets of the dual-network method and their deployable average.

Re-implements the networks of the authors' code (AIPMLab/Semi-supervised-Segmentation, taken from
MCF / UA-MT): a V-Net (subnet B) and a ResNet-34-encoder network with the same V-Net decoder
(subnet A). Both return ``(logits, x9)`` from :meth:`forward_features`, where ``x9`` is the
``n_filters``-channel full-resolution decoder feature map used by the prototype loss, and logits
from ``forward``. :class:`DualNetwork3D` holds both and, as a single network, returns the average
of their softmax outputs (the authors' test-time ensemble). All three use plain modules only, so
``torch.jit.script``, ``torch.jit.trace`` and ``torch.export`` (dynamic batch) work.

Spatial sizes must be divisible by 16 (four stride-2 stages).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv, Norm
from torch import nn
from torch.nn import functional as F

from monai_ssl.networks.encoders import BasicBlock as _BasicBlock

__all__ = ["VNet3D", "ResNetSeg3D", "DualNetwork3D", "DualTrainForward", "RESNET34_LAYERS"]

#: BasicBlocks per encoder stage of the authors' 3D "ResNet34".
RESNET34_LAYERS: tuple[int, int, int, int] = (3, 4, 6, 3)


def _conv_stack(n_stages: int, in_channels: int, out_channels: int) -> nn.Sequential:
    """``n_stages`` x (3x3x3 conv + BatchNorm + ReLU), the V-Net ``ConvBlock``."""
    layers: list[nn.Module] = []
    for i in range(n_stages):
        layers += [
            Conv[Conv.CONV, 3](in_channels if i == 0 else out_channels, out_channels, 3, padding=1),
            Norm[Norm.BATCH, 3](out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def _down(in_channels: int, out_channels: int) -> nn.Sequential:
    """2x2x2 stride-2 convolution + BatchNorm + ReLU (V-Net downsampling)."""
    return nn.Sequential(
        Conv[Conv.CONV, 3](in_channels, out_channels, 2, stride=2), Norm[Norm.BATCH, 3](out_channels), nn.ReLU(inplace=True)
    )


def _up(in_channels: int, out_channels: int) -> nn.Sequential:
    """2x2x2 stride-2 transposed convolution + BatchNorm + ReLU (V-Net upsampling)."""
    return nn.Sequential(
        Conv[Conv.CONVTRANS, 3](in_channels, out_channels, 2, stride=2),
        Norm[Norm.BATCH, 3](out_channels),
        nn.ReLU(inplace=True),
    )


def _kaiming_init(module: nn.Module) -> None:
    """The authors' init: Kaiming-normal 3D convolutions, BatchNorm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _VNetDecoder(nn.Module):
    """The V-Net decoder: transposed-conv up-blocks with additive skips, then a 1x1x1 head.

    Takes the five encoder maps ``[x1 (f), x2 (2f), x3 (4f), x4 (8f), x5 (16f)]`` (full resolution
    to 1/16) and returns ``(logits, x9)``; ``Dropout3d`` is applied to ``x9`` when ``dropout > 0``.
    """

    def __init__(self, n_filters: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        f = n_filters
        self.up5 = _up(16 * f, 8 * f)
        self.block6 = _conv_stack(3, 8 * f, 8 * f)
        self.up6 = _up(8 * f, 4 * f)
        self.block7 = _conv_stack(3, 4 * f, 4 * f)
        self.up7 = _up(4 * f, 2 * f)
        self.block8 = _conv_stack(2, 2 * f, 2 * f)
        self.up8 = _up(2 * f, f)
        self.block9 = _conv_stack(1, f, f)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.out_conv = Conv[Conv.CONV, 3](f, num_classes, 1)

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor, x4: torch.Tensor, x5: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode the skip maps into ``(logits, x9)``."""
        x6 = self.block6(self.up5(x5) + x4)
        x7 = self.block7(self.up6(x6) + x3)
        x8 = self.block8(self.up7(x7) + x2)
        x9 = self.dropout(self.block9(self.up8(x8) + x1))
        return self.out_conv(x9), x9


class VNet3D(nn.Module):
    """The MCF / UA-MT V-Net (subnet B): 16-32-64-128-256 channels with ``n_filters=16``.

    9,448,866 parameters with the defaults (the paper's 9.44 M).

    Plain conv stacks (1, 2, 3, 3, 3 convolutions per encoder stage), 2x2x2 stride-2 downsampling
    convolutions, transposed-conv upsampling with additive skips, and ``Dropout3d`` on the
    bottleneck and on the last decoder feature ``x9`` (``has_dropout=True`` in the authors' code).

    Args:
        in_channels: input channels (1 for LA / Pancreas / single-modality BraTS).
        num_classes: output logit channels (2 in the paper).
        n_filters: channels of the first stage.
        dropout: ``Dropout3d`` probability on the bottleneck and ``x9`` (0 disables both).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, n_filters: int = 16, dropout: float = 0.5) -> None:
        super().__init__()
        f = n_filters
        self.block1 = _conv_stack(1, in_channels, f)
        self.down1 = _down(f, 2 * f)
        self.block2 = _conv_stack(2, 2 * f, 2 * f)
        self.down2 = _down(2 * f, 4 * f)
        self.block3 = _conv_stack(3, 4 * f, 4 * f)
        self.down3 = _down(4 * f, 8 * f)
        self.block4 = _conv_stack(3, 8 * f, 8 * f)
        self.down4 = _down(8 * f, 16 * f)
        self.block5 = _conv_stack(3, 16 * f, 16 * f)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.decoder = _VNetDecoder(f, num_classes, dropout)
        self.feature_channels = f
        _kaiming_init(self)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits, x9)``: logits ``(B, num_classes, *spatial)`` and the ``n_filters``-channel ``x9``."""
        x1 = self.block1(x)
        x2 = self.block2(self.down1(x1))
        x3 = self.block3(self.down2(x2))
        x4 = self.block4(self.down3(x3))
        x5 = self.dropout(self.block5(self.down4(x4)))
        return self.decoder(x1, x2, x3, x4, x5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return segmentation logits ``(B, num_classes, *spatial)``."""
        return self.forward_features(x)[0]


class ResNetSeg3D(nn.Module):
    """The authors' 3D "ResNet34" (subnet A): a residual encoder with the V-Net decoder.

    17,930,354 parameters with the defaults; the paper's pair total (27.30 M) implies about
    17.86 M, a 0.4 % gap that the published description does not explain.

    Stem: 7x7x7 stride-1 convolution to ``n_filters`` + BatchNorm + ReLU, no max-pooling. Four
    stages of basic blocks (``layers``, default ``(3, 4, 6, 3)``) with 2, 4, 8, 16 x ``n_filters``
    channels, each starting with stride 2; the last BatchNorm of every block is zero-initialised.
    The decoder is the V-Net decoder fed with ``[stem, stage1, stage2, stage3, stage4]`` and
    ``Dropout3d`` on ``x9`` only.

    Args:
        in_channels: input channels.
        num_classes: output logit channels.
        n_filters: stem channels.
        layers: basic blocks per stage.
        dropout: ``Dropout3d`` probability on ``x9`` (0 disables it).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        n_filters: int = 16,
        layers: Sequence[int] = RESNET34_LAYERS,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers needs 4 positive block counts, got {list(layers)}")
        f = n_filters
        self.stem = nn.Sequential(
            Conv[Conv.CONV, 3](in_channels, f, 7, padding=3, bias=False), Norm[Norm.BATCH, 3](f), nn.ReLU(inplace=True)
        )
        stages = []
        in_ch = f
        for i, blocks in enumerate(layers):
            out_ch = f * 2 ** (i + 1)
            stage = [_BasicBlock(3, in_ch, out_ch, stride=2)] + [_BasicBlock(3, out_ch, out_ch, stride=1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.decoder = _VNetDecoder(f, num_classes, dropout)
        self.feature_channels = f
        _kaiming_init(self)
        for m in self.modules():
            if isinstance(m, _BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits, x9)`` as :meth:`VNet3D.forward_features`."""
        c1 = self.stem(x)
        c2 = self.layer1(c1)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return self.decoder(c1, c2, c3, c4, c5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return segmentation logits ``(B, num_classes, *spatial)``."""
        return self.forward_features(x)[0]


class DualNetwork3D(nn.Module):
    """Subnet A (:class:`ResNetSeg3D`) and subnet B (:class:`VNet3D`) deployed as one network.

    ``forward`` returns the mean of the two subnets' softmax probabilities, ``(B, num_classes,
    *spatial)``: the authors' test-time ensemble, so a sliding-window inferer averaging these
    outputs over overlapping windows reproduces their test script. Training goes through
    :meth:`forward_both` (both subnets' logits and ``x9`` features); wrap the network in
    :class:`DualTrainForward` to make that the ``forward`` that ``DistributedDataParallel`` sees.

    Args:
        in_channels: input channels.
        num_classes: classes (2 in the paper).
        n_filters: first-stage channels of both subnets (16 in the paper).
        resnet_layers: basic blocks per stage of subnet A.
        dropout: ``Dropout3d`` probability of both subnets.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        n_filters: int = 16,
        resnet_layers: Sequence[int] = RESNET34_LAYERS,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.resnet = ResNetSeg3D(in_channels, num_classes, n_filters, resnet_layers, dropout)
        self.vnet = VNet3D(in_channels, num_classes, n_filters, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the averaged softmax probabilities of both subnets."""
        return 0.5 * (F.softmax(self.resnet(x), dim=1) + F.softmax(self.vnet(x), dim=1))

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(logits_A, x9_A, logits_B, x9_B)``: subnet A (ResNet) and subnet B (V-Net) on ``x``."""
        z_a, f_a = self.resnet.forward_features(x)
        z_b, f_b = self.vnet.forward_features(x)
        return z_a, f_a, z_b, f_b


class DualTrainForward(nn.Module):
    """Training view of a :class:`DualNetwork3D`: ``forward`` is its :meth:`~DualNetwork3D.forward_both`.

    ``DistributedDataParallel`` synchronises gradients only for what goes through the wrapped
    module's ``forward``; the deployable ``DualNetwork3D.forward`` returns the averaged softmax
    only, so multi-GPU training wraps this view instead:
    ``DistributedDataParallel(DualTrainForward(net))``. It holds ``net`` itself (no copy), so the
    optimisers, checkpoints and the deployed model all keep using ``net``'s parameters.
    """

    def __init__(self, net: DualNetwork3D) -> None:
        super().__init__()
        if not isinstance(net, DualNetwork3D):
            raise TypeError(f"DualTrainForward needs a DualNetwork3D, got {type(net).__name__}")
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(logits_A, x9_A, logits_B, x9_B)``."""
        return self.net.forward_both(x)
