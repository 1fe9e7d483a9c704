"""Supervised baseline objective: the labelled batch only."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.utils.enums import CommonKeys as Keys

__all__ = ["SupervisedObjective"]


class SupervisedObjective:
    """``loss_sup = loss_function(network(x_l), y_l)``; unlabelled batches are ignored.

    Args:
        loss_function: e.g. ``monai.losses.DiceCELoss(sigmoid=True)`` (BCE + Dice on logits).
    """

    uses_unlabeled_data = False

    def __init__(self, loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.loss_function = loss_function

    def __call__(self, engine, labeled: dict[str, torch.Tensor], unlabeled: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        pred = engine.network(labeled[Keys.IMAGE])
        return {Keys.PRED: pred, "loss_sup": self.loss_function(pred, labeled[Keys.LABEL])}
