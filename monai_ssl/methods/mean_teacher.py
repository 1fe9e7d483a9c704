"""Mean teacher (Tarvainen & Valpola 2017) as used in SSL4MIS for segmentation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from monai_ssl.handlers.schedules import RampUp
from monai_ssl.methods.common import forward_halves

__all__ = ["MeanTeacherObjective"]


class MeanTeacherObjective:
    """Supervised loss on the labelled half plus a ramped consistency loss on the unlabelled half.

    By default the student sees the labelled and unlabelled images in one joint batch (shared
    BatchNorm statistics, as the reference code); ``joint_batch=False`` runs two student forwards
    instead, so that each half is normalised with its own batch statistics. The teacher (an EMA of the student, updated by
    :class:`monai_ssl.handlers.EMATeacher`) sees the unlabelled images with small Gaussian noise;
    the consistency term is the mean squared difference of the two sigmoid probability maps::

        loss_sup  = loss_function(S(x_l), y_l)
        loss_cons = w(t) * mean((sigmoid(S(x_u)) - sigmoid(T(x_u + n)))^2),  n ~ clip(N(0, s^2), -2s, 2s)

    Args:
        loss_function: supervised loss on logits (e.g. ``DiceCELoss(sigmoid=True)``).
        teacher: the EMA teacher network (no gradients).
        consistency_weight: ``w(t)`` as a :class:`RampUp` called with the global iteration, or a constant.
        noise_std: standard deviation ``s`` of the teacher's input noise (0 disables it).
        joint_batch: one student forward over ``cat([x_l, x_u])`` (True) or one per half (False).
    """

    def __init__(
        self,
        loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        teacher: nn.Module,
        consistency_weight: RampUp | float = 0.1,
        noise_std: float = 0.1,
        joint_batch: bool = True,
    ) -> None:
        self.loss_function = loss_function
        self.teacher = teacher
        self.consistency_weight = consistency_weight if callable(consistency_weight) else RampUp(float(consistency_weight))
        self.noise_std = noise_std
        self.joint_batch = joint_batch

    def __call__(self, engine, labeled: dict[str, torch.Tensor], unlabeled: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        x_l, y_l = labeled[Keys.IMAGE], labeled[Keys.LABEL]
        if unlabeled is None:
            pred = engine.network(x_l)
            return {Keys.PRED: pred, "loss_sup": self.loss_function(pred, y_l)}
        x_u = unlabeled[Keys.IMAGE]
        pred, logits_u = forward_halves(engine.network, x_l, x_u, self.joint_batch)
        with torch.no_grad():
            noisy = x_u
            if self.noise_std > 0:
                noisy = x_u + torch.clamp(torch.randn_like(x_u) * self.noise_std, -2 * self.noise_std, 2 * self.noise_std)
            target = torch.sigmoid(self.teacher(noisy))
        weight = self.consistency_weight(engine.state.iteration)
        cons = torch.mean((torch.sigmoid(logits_u) - target) ** 2)
        return {Keys.PRED: pred, "loss_sup": self.loss_function(pred, y_l), "loss_cons": weight * cons}
