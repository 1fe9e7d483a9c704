"""Uncertainty-entropy weighted fusion (UEWF) of two teachers' soft pseudo-labels.

Dual-teacher BUS framework (methods spec §1.4, Eq.7-10, reconstructed): for the static teacher's
and the dynamic teacher's foreground probabilities ``p_s`` and ``p_d``::

    H_k = -[p_k log(p_k + eps) + (1 - p_k) log(1 - p_k + eps)]        (Eq.7, per pixel)
    U_k = Up_nearest(AvgPool_{P x P, stride P}(H_k))                   (Eq.8, region smoothing)
    w_k = 1 / (U_k + eps)                                              (Eq.9)
    y   = (w_s p_s + w_d p_d) / (w_s + w_d)                            (Eq.10)

Patch grid: the map is tiled from the top-left corner with non-overlapping ``P x P`` patches.
When a side is not divisible by ``P`` the last row/column of patches is smaller (ragged) and is
averaged over its own pixels only; no padding values enter any average. The same tiling is used
by the patch features of AURCL (:mod:`monai_ssl.losses.contrastive`).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

__all__ = [
    "binary_entropy",
    "patch_average",
    "patch_grid_shape",
    "patch_upsample",
    "region_entropy",
    "uewf",
]


def binary_entropy(prob: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-pixel binary Shannon entropy (nats) of foreground probabilities (Eq.7)."""
    return -(prob * torch.log(prob + eps) + (1.0 - prob) * torch.log(1.0 - prob + eps))


def patch_grid_shape(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Rows and columns of the ``patch_size`` grid over an ``height x width`` map (ragged last patches)."""
    if patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size}")
    return math.ceil(height / patch_size), math.ceil(width / patch_size)


def patch_average(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Mean of ``x`` (B, C, H, W) over each non-overlapping ``patch_size`` patch.

    Returns (B, C, ceil(H/P), ceil(W/P)). Border patches of a map whose side is not divisible by
    ``P`` are averaged over the pixels they actually contain.
    """
    if x.dim() != 4:
        raise ValueError(f"patch_average expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    patch_grid_shape(x.shape[-2], x.shape[-1], patch_size)  # validates patch_size
    # ceil_mode windows that run past the border are divided by their in-image size (padding=0)
    return F.avg_pool2d(x, kernel_size=patch_size, stride=patch_size, ceil_mode=True)


def patch_upsample(grid: torch.Tensor, patch_size: int, size: tuple[int, int]) -> torch.Tensor:
    """Nearest upsampling of a patch grid back to pixel resolution ``size`` (inverse of the tiling)."""
    rows, cols = patch_grid_shape(size[0], size[1], patch_size)
    if tuple(grid.shape[-2:]) != (rows, cols):
        raise ValueError(f"grid of shape {tuple(grid.shape[-2:])} does not tile {size} with patch {patch_size}")
    full = grid.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)
    return full[..., : size[0], : size[1]]


def region_entropy(prob: torch.Tensor, patch_size: int = 16, patchify: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Region-level uncertainty ``U`` (Eq.8): patch-averaged entropy, or the pixel entropy when not ``patchify``."""
    entropy = binary_entropy(prob, eps)
    if not patchify:
        return entropy
    return patch_upsample(patch_average(entropy, patch_size), patch_size, (prob.shape[-2], prob.shape[-1]))


def uewf(
    p_static: torch.Tensor,
    p_dynamic: torch.Tensor,
    patch_size: int = 16,
    patchify: bool = True,
    fuse: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Fuse two teachers' foreground probabilities (B, C, H, W) into one soft pseudo-label (Eq.10).

    Args:
        p_static: probabilities of the static (pseudo-label-trained, frozen) teacher.
        p_dynamic: probabilities of the dynamic (EMA) teacher.
        patch_size: patch side ``P`` of the region smoothing (Eq.8).
        patchify: smooth the entropy over patches; ``False`` weights by the pixel entropy
            (the paper's "w/o patchify" ablation).
        fuse: ``False`` returns the plain average ``(p_s + p_d) / 2`` (the "w/o UEWF" ablation).
        eps: the constant of Eq.7 and Eq.9.

    Computed in float32 whatever the input dtype (the weights reach ``1/eps``).
    """
    if p_static.shape != p_dynamic.shape:
        raise ValueError(f"teacher probabilities differ in shape: {tuple(p_static.shape)} vs {tuple(p_dynamic.shape)}")
    p_s, p_d = p_static.float(), p_dynamic.float()
    if not fuse:
        return 0.5 * (p_s + p_d)
    w_s = 1.0 / (region_entropy(p_s, patch_size, patchify, eps) + eps)
    w_d = 1.0 / (region_entropy(p_d, patch_size, patchify, eps) + eps)
    return (w_s * p_s + w_d * p_d) / (w_s + w_d)
