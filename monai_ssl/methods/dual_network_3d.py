"""Dual-network 3D semi-supervised segmentation: CR + CCE (CPS + EFS) + UE (KL) + PGL.

Lu, Wu, Chaddad et al., "Enhancing Dual Network Based Semi-Supervised Medical Image Segmentation
with Uncertainty-Guided Pseudo-Labeling" (arXiv 2509.13084); code AIPMLab/Semi-supervised-
Segmentation. The loss terms and their paper / code differences are documented in
:mod:`monai_ssl.losses.dual_3d`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from monai.utils.enums import CommonKeys as Keys
from torch import nn
from torch.nn import functional as F

from monai_ssl.handlers.schedules import sigmoid_rampup
from monai_ssl.losses.dual_3d import (
    confidence_mask,
    contrastive_weight,
    cross_pseudo_supervision_loss,
    cross_reliable_loss,
    dice_loss,
    entropy_filter,
    entropy_filtered_loss,
    prediction_consistency_loss,
    prototype_contrastive_loss,
    supervised_loss,
    uncertainty_rectified_loss,
)
from monai_ssl.networks.dual_3d import DualNetwork3D, DualTrainForward

__all__ = ["DualNetwork3DObjective"]


def _unwrap(network: nn.Module) -> nn.Module:
    return network.module if hasattr(network, "module") and isinstance(network.module, nn.Module) else network


def _training_forward(network: nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """The callable giving ``(z_A, x9_A, z_B, x9_B)`` for ``engine.network``.

    * :class:`DualTrainForward`, bare or wrapped (``DistributedDataParallel``): called through
      the wrapper, so DDP sees the forward pass and synchronises both subnets' gradients;
    * a bare :class:`DualNetwork3D`: its ``forward_both``;
    * a DDP-wrapped ``DualNetwork3D``: refused, since its ``forward`` (the softmax average)
      cannot give the features and calling the subnets past the wrapper would skip the gradient
      all-reduce.
    """
    inner = _unwrap(network)
    if isinstance(inner, DualTrainForward):
        return network
    if isinstance(inner, DualNetwork3D):
        if inner is not network:
            raise TypeError(
                f"DualNetwork3DObjective: a {type(network).__name__}-wrapped DualNetwork3D would not synchronise "
                "gradients (its forward is the deployable softmax average); wrap DualTrainForward(net) instead"
            )
        return inner.forward_both
    raise TypeError(
        "DualNetwork3DObjective needs a DualNetwork3D or DualTrainForward network (optionally DDP-wrapped), "
        f"got {type(inner).__name__}"
    )


class DualNetwork3DObjective:
    """The method's loss for one batch of labelled + unlabelled volumes.

    ``engine.network`` is a :class:`~monai_ssl.networks.dual_3d.DualNetwork3D`, or a
    :class:`~monai_ssl.networks.dual_3d.DualTrainForward` view of one, bare or wrapped in
    ``DistributedDataParallel`` (multi-GPU: the forward pass goes through the wrapper, so both
    subnets' gradients are all-reduced); subnet A is its ``resnet``, subnet B its ``vnet``. Both subnets see the
    joint batch ``[x_l; x_u]`` (the authors' code feeds both the same crop). Returned terms
    (already weighted; absent when disabled or when there is no unlabelled batch):

    * ``loss_sup_resnet`` / ``loss_sup_vnet``: ``CE + Dice`` on the labelled half;
    * ``loss_cr``: ``beta * (L_cr^A + L_cr^B)``, the confidence-masked MSE to the label;
    * ``loss_consistency``: ``consistency_weight *`` the subnets' prediction consistency (whole batch);
    * ``loss_kl``: UE, B (V-Net) teaching A (ResNet), plus A teaching B when ``kl_bidirectional``
      (whole batch);
    * ``loss_cps``: thresholded cross pseudo supervision (unlabelled half);
    * ``loss_efs``: entropy-filtered supervision with the union pseudo-label (unlabelled half);
    * ``loss_pgl``: ``lambda_c(t) *`` the prototype loss on the unlabelled half, computed on the
      subnet with the higher supervised Dice loss (the code's "winner" routing) or on both.

    ``pred`` is ``log`` of the mean of both subnets' softmax on the labelled half (``"average"``:
    its softmax and argmax are the test-time ensemble's), or one subnet's logits.

    Args:
        code_faithful: reproduce the authors' released code; every argument left at ``None``
            then takes the code's value, and the EFS / PGL terms carry no gradient.
        beta: CR weight (paper: 0.5 for LA and BraTS, 0.6 for Pancreas; code: 0.5).
        threshold: confidence threshold T of the CR mask and of the CPS pseudo-labels.
        cr_mask: ``"xor"`` (code, default) or ``"or"`` (paper prose).
        consistency: ``"mse"`` (paper), ``"cosine"`` (code) or ``"none"``; ``None``: by ``code_faithful``.
        consistency_weight: weight of ``loss_consistency`` (1 in the code).
        use_cps: add the CPS term; ``None``: yes unless ``code_faithful`` (the code has none).
        entropy_percentile: EFS alpha in % (paper: LA 70, Pancreas 80, BraTS 30); ``None``: 70, or 20 if ``code_faithful``.
        temperature: UE temperature T (sharpens the teacher for the pseudo-label, and inside the KL
            only with ``kl_sharpened``).
        kl_bidirectional: UE in both directions; off (``None`` too), in both modes: the methods spec
            (4.2) and the code have V-Net -> ResNet only.
        kl_sharpened: the KL against the temperature-sharpened teacher ``softmax(z_t / T)``; off
            (default, spec 4.2 and code): against the untempered ``softmax(z_t)``. Switches on, with
            ``kl_bidirectional``, the UE of earlier versions' paper mode.
        pgl_weight: lambda_c as a function of the 0-based iteration, or a constant.
        pgl_agreement: require A/B agreement for reliable voxels; ``None``: yes unless ``code_faithful``.
        pgl_third_term: keep PGL's prototype-to-prototype term (Table 6 ablation).
        pgl_sample_fraction: fraction of uncertain voxels sampled per class (1 %).
        pgl_routing: ``"loser"`` (code) or ``"both"`` subnets.
        pred: ``"average"``, ``"vnet"`` or ``"resnet"``.
        unsup_rampup: iterations of a sigmoid ramp-up, ``exp(-5 (1 - t/L)^2)``, applied to
            ``loss_consistency``, ``loss_kl``, ``loss_cps`` and ``loss_efs`` (0, the default: full
            weight from the first step, as the paper and code). Against the early all-background
            state seen on LA at CPU scale (bundle README): there it avoided the collapse but
            learned less than the supervised V-Net; at the paper's crop on a GPU the default
            needs no ramp.
    """

    def __init__(
        self,
        code_faithful: bool = False,
        beta: float = 0.5,
        threshold: float = 0.6,
        cr_mask: str = "xor",
        consistency: str | None = None,
        consistency_weight: float = 1.0,
        use_cps: bool | None = None,
        entropy_percentile: float | None = None,
        temperature: float = 0.5,
        kl_bidirectional: bool | None = None,
        kl_sharpened: bool = False,
        pgl_weight: Callable[[int], float] | float = contrastive_weight,
        pgl_agreement: bool | None = None,
        pgl_third_term: bool = True,
        pgl_sample_fraction: float = 0.01,
        pgl_routing: str = "loser",
        pred: str = "average",
        unsup_rampup: int = 0,
    ) -> None:
        if unsup_rampup < 0:
            raise ValueError(f"unsup_rampup must be >= 0 iterations, got {unsup_rampup}")
        self.consistency = consistency or ("cosine" if code_faithful else "mse")
        for name, value, allowed in (
            ("cr_mask", cr_mask, ("xor", "or")),
            ("consistency", self.consistency, ("mse", "cosine", "none")),
            ("pgl_routing", pgl_routing, ("loser", "both")),
            ("pred", pred, ("average", "vnet", "resnet")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.code_faithful = code_faithful
        self.beta = beta
        self.threshold = threshold
        self.cr_mask = cr_mask
        self.consistency_weight = consistency_weight
        self.use_cps = (not code_faithful) if use_cps is None else use_cps
        self.entropy_percentile = entropy_percentile
        self.temperature = temperature
        self.kl_bidirectional = bool(kl_bidirectional)
        self.kl_sharpened = kl_sharpened
        self.pgl_weight = pgl_weight if callable(pgl_weight) else (lambda _t, w=float(pgl_weight): w)
        self.pgl_agreement = pgl_agreement
        self.pgl_third_term = pgl_third_term
        self.pgl_sample_fraction = pgl_sample_fraction
        self.pgl_routing = pgl_routing
        self.pred = pred
        self.unsup_rampup = unsup_rampup

    def __call__(
        self, engine, labeled: dict[str, torch.Tensor], unlabeled: dict[str, torch.Tensor] | None
    ) -> dict[str, torch.Tensor]:
        """Compute the prediction and the weighted loss terms for one step."""
        forward = _training_forward(engine.network)
        x_l, y = labeled[Keys.IMAGE], labeled[Keys.LABEL]
        n_l = x_l.shape[0]
        x = x_l if unlabeled is None else torch.cat([x_l, unlabeled[Keys.IMAGE]], dim=0)
        z_a, f_a, z_b, f_b = forward(x)
        p_a, p_b = F.softmax(z_a, dim=1), F.softmax(z_b, dim=1)

        out: dict[str, torch.Tensor] = {Keys.PRED: self._pred(z_a[:n_l], z_b[:n_l])}
        out["loss_sup_resnet"] = supervised_loss(z_a[:n_l], y)
        out["loss_sup_vnet"] = supervised_loss(z_b[:n_l], y)
        mask = confidence_mask(p_a[:n_l].detach(), p_b[:n_l].detach(), self.threshold, self.cr_mask)
        out["loss_cr"] = self.beta * (cross_reliable_loss(p_a[:n_l], y, mask) + cross_reliable_loss(p_b[:n_l], y, mask))
        if self.consistency != "none":
            out["loss_consistency"] = self.consistency_weight * prediction_consistency_loss(p_a, p_b, self.consistency)
        kl = uncertainty_rectified_loss(z_a, z_b, self.temperature, self.kl_sharpened)  # V-Net teaches ResNet
        if self.kl_bidirectional:
            kl = kl + uncertainty_rectified_loss(z_b, z_a, self.temperature, self.kl_sharpened)
        out["loss_kl"] = kl
        if unlabeled is None:
            return self._ramp(out, engine)

        z_a_u, z_b_u = z_a[n_l:], z_b[n_l:]
        p_a_u, p_b_u = p_a[n_l:].detach(), p_b[n_l:].detach()
        if self.use_cps:
            out["loss_cps"] = cross_pseudo_supervision_loss(z_a_u, z_b_u, self.threshold)
        filt = entropy_filter(p_a_u, p_b_u, self.entropy_percentile, self.code_faithful)
        out["loss_efs"] = entropy_filtered_loss(z_a_u, z_b_u, filt, self.code_faithful)
        if self.pgl_routing == "both":
            targets = [(f_a[n_l:], p_a_u), (f_b[n_l:], p_b_u)]
        else:
            with torch.no_grad():  # the subnet with the higher supervised Dice loss learns from PGL
                target = y[:, 0] if y.dim() == x_l.dim() else y
                vnet_wins = dice_loss(p_b[:n_l, 1], target == 1) < dice_loss(p_a[:n_l, 1], target == 1)
            targets = [(f_a[n_l:], p_a_u)] if vnet_wins else [(f_b[n_l:], p_b_u)]
        pgl = sum(
            prototype_contrastive_loss(
                feats, prob, filt, self.pgl_agreement, self.pgl_sample_fraction, self.pgl_third_term, self.code_faithful
            )
            for feats, prob in targets
        )
        out["loss_pgl"] = self.pgl_weight(max(engine.state.iteration - 1, 0)) * pgl
        return self._ramp(out, engine)

    def _ramp(self, out: dict[str, torch.Tensor], engine) -> dict[str, torch.Tensor]:
        """Scale the unsupervised consistency / KL / CPS / EFS terms by the sigmoid ramp-up."""
        if self.unsup_rampup > 0:
            weight = sigmoid_rampup(max(engine.state.iteration - 1, 0), self.unsup_rampup)
            for name in ("loss_consistency", "loss_kl", "loss_cps", "loss_efs"):
                if name in out:
                    out[name] = weight * out[name]
        return out

    def _pred(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        if self.pred == "vnet":
            return z_b
        if self.pred == "resnet":
            return z_a
        both = torch.stack([F.log_softmax(z_a, dim=1), F.log_softmax(z_b, dim=1)])
        return torch.logsumexp(both, dim=0) - math.log(2.0)
