"""Pieces shared by the objectives."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

Output = TypeVar("Output", torch.Tensor, tuple)


def forward_halves(
    forward: Callable[[torch.Tensor], Output], x_l: torch.Tensor, x_u: torch.Tensor, joint_batch: bool = True
) -> tuple[Output, Output]:
    """The student's outputs on the labelled and on the unlabelled images.

    ``joint_batch=True``: one ``forward(cat([x_l, x_u]))`` split back into the two halves
    (BatchNorm statistics shared by both, as the reference codes do); False: one forward per half.
    ``forward`` returns a tensor or a tuple of tensors (e.g. ``(logits, features)``), every one
    batch-first; the halves have the same structure.
    """
    if not joint_batch:
        return forward(x_l), forward(x_u)
    out = forward(torch.cat([x_l, x_u], dim=0))
    n_l = x_l.shape[0]
    if isinstance(out, tuple):
        return tuple(t[:n_l] for t in out), tuple(t[n_l:] for t in out)
    return out[:n_l], out[n_l:]
