"""Adaptive uncertainty-guided reverse contrastive learning (AURCL) of the dual-teacher BUS framework.

Methods spec §1.4, Eq.11-15 (reconstructed). For the student's foreground probability ``p``
(B, 1, H, W) on unlabelled images and its feature map ``F`` (B, C, H, W)::

    c     = max(p, 1 - p)                                    confidence
    theta = max(Quantile_r(c), tau_min)   per image           (Eq.11; fixed: theta = tau_min)
    M     = 1[c <= theta]                                     (Eq.12, low-confidence pixels)
    p~    = M (1 - p) + (1 - M) p                             (Eq.13, probability reversal)
    f_j   = mean_{i in patch j} p(i) F(i),  f~_j = mean_{i in patch j} p~(i) F(i)       (Eq.14)
    L     = -1/(B N) sum_b sum_j log softmax_k(cos(f_j, f~_k) / T)[k = j]              (Eq.15)

The positive of patch ``j`` is the same patch in the reversed view; the negatives are the other
patches of the same image. Gradients flow through ``p``, ``p~`` and ``F`` in both views; the
mask ``M`` is a non-differentiable selection. Patches tile the map as in
:func:`monai_ssl.pseudo.fusion.patch_average` (ragged last row/column when ``P`` does not divide
the size), so ``N = ceil(H/P) * ceil(W/P)``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from monai_ssl.pseudo.fusion import patch_average

__all__ = [
    "AURCLoss",
    "confidence_map",
    "low_confidence_mask",
    "low_confidence_threshold",
    "patch_info_nce",
    "reverse_probabilities",
    "weighted_patch_features",
]


def confidence_map(prob: torch.Tensor) -> torch.Tensor:
    """Binary prediction confidence ``c = max(p, 1 - p)``, in [0.5, 1]."""
    return torch.maximum(prob, 1.0 - prob)


def low_confidence_threshold(
    confidence: torch.Tensor, ratio: float = 0.2, tau_min: float = 0.7, dynamic: bool = True
) -> torch.Tensor:
    """Per-image threshold ``theta`` (B,) of Eq.11.

    ``dynamic``: ``max(Quantile_ratio(c), tau_min)`` with the linear-interpolation quantile over
    each image's pixels, so at least a fraction ``ratio`` of the pixels is selected and every pixel
    with ``c <= tau_min`` is. Otherwise the fixed bound ``tau_min`` alone (the alternative reading
    of the paper's Table 4); as ``c >= 0.5``, a fixed bound below 0.5 selects no pixel.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    flat = confidence.detach().reshape(confidence.shape[0], -1).float()
    bound = torch.full((flat.shape[0],), float(tau_min), dtype=flat.dtype, device=flat.device)
    if not dynamic:
        return bound
    return torch.maximum(torch.quantile(flat, ratio, dim=1), bound)


def low_confidence_mask(
    prob: torch.Tensor, ratio: float = 0.2, tau_min: float = 0.7, dynamic: bool = True
) -> torch.Tensor:
    """``M = 1[c <= theta]`` (Eq.12) as a float mask of ``prob``'s shape, without gradient."""
    conf = confidence_map(prob.detach().float())
    theta = low_confidence_threshold(conf, ratio, tau_min, dynamic)
    return (conf <= theta.view(-1, *([1] * (conf.dim() - 1)))).to(prob.dtype)


def reverse_probabilities(prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Probability reversal ``p~ = M (1 - p) + (1 - M) p`` (Eq.13)."""
    return mask * (1.0 - prob) + (1.0 - mask) * prob


def weighted_patch_features(prob: torch.Tensor, features: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Probability-weighted patch features (Eq.14): (B, N, C), ``N`` patches in row-major order."""
    if prob.shape[0] != features.shape[0] or prob.shape[-2:] != features.shape[-2:]:
        raise ValueError(
            f"probabilities {tuple(prob.shape)} and features {tuple(features.shape)} must share batch and spatial size"
        )
    if prob.shape[1] != 1:
        raise ValueError(f"AURCL expects one foreground-probability channel, got {prob.shape[1]}")
    pooled = patch_average(prob * features, patch_size)  # (B, C, rows, cols)
    return pooled.flatten(2).transpose(1, 2)


def patch_info_nce(anchor: torch.Tensor, other: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Within-image InfoNCE (Eq.15) between two (B, N, C) patch-feature sets.

    Row ``j`` of ``anchor`` is pulled to row ``j`` of ``other`` and pushed from its other rows,
    with cosine similarity over ``temperature``; averaged over the ``B * N`` anchors.
    """
    if anchor.shape != other.shape or anchor.dim() != 3:
        raise ValueError(f"expected two (B, N, C) tensors of one shape, got {tuple(anchor.shape)} and {tuple(other.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    a = F.normalize(anchor.float(), dim=-1)
    o = F.normalize(other.float(), dim=-1)
    logits = torch.bmm(a, o.transpose(1, 2)) / temperature  # (B, N, N): cos(f_j, f~_k) / T
    batch, n = logits.shape[:2]
    target = torch.arange(n, device=logits.device).repeat(batch)
    return F.cross_entropy(logits.reshape(batch * n, n), target)


class AURCLoss(nn.Module):
    """AURCL contrastive loss on the student's unlabelled probabilities and features (Eq.11-15).

    Args:
        patch_size: patch side ``P`` of Eq.14 (16 gives N = 196 at 224 x 224).
        ratio: the reverse ratio ``r`` of Eq.11 (fraction of least-confident pixels).
        tau_min: lower bound of the dynamic threshold, or the fixed threshold when not ``dynamic_threshold``.
        temperature: InfoNCE temperature ``T`` of Eq.15.
        dynamic_threshold: ``True`` for Eq.11 ``max(Quantile_r(c), tau_min)``; ``False`` for the fixed ``tau_min``.
    """

    def __init__(
        self,
        patch_size: int = 16,
        ratio: float = 0.2,
        tau_min: float = 0.7,
        temperature: float = 0.1,
        dynamic_threshold: bool = True,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.ratio = ratio
        self.tau_min = tau_min
        self.temperature = temperature
        self.dynamic_threshold = dynamic_threshold

    def forward(self, prob: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Loss for probabilities (B, 1, H, W) and features (B, C, H, W); differentiable in both."""
        prob, features = prob.float(), features.float()
        mask = low_confidence_mask(prob, self.ratio, self.tau_min, self.dynamic_threshold)
        reversed_prob = reverse_probabilities(prob, mask)
        f = weighted_patch_features(prob, features, self.patch_size)
        f_rev = weighted_patch_features(reversed_prob, features, self.patch_size)
        return patch_info_nce(f, f_rev, self.temperature)
