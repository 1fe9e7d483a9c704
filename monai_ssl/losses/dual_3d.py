"""Loss terms of the dual-network 3D method (Lu, Wu, Chaddad et al., arXiv 2509.13084).

Subnet A is the ResNet-34-encoder network, subnet B the V-Net; both output two-class logits
(background, foreground). Every function is pure (no state) and takes ``(B, 2, *spatial)`` logits
or softmax probabilities; labels are class-index maps ``(B, *spatial)`` (a ``(B, 1, *spatial)``
channel is accepted). Nothing is weighted here: the objective applies beta, lambda_c(t), etc.

=================  ======================================================================
term               paper (default)
=================  ======================================================================
supervised         ``CE(z, y) + Dice(p_fg, y)``, MCF's squared-denominator Dice
CR (Eq. 4-6)       ``sum M (p_fg - y)^2 / (sum M + 1e-16)`` on labelled voxels, with
                   ``M = [yhat_A=1 & q_A>=T] XOR [yhat_B=1 & q_B>=T]``, T = 0.6
consistency        mean squared difference of the two subnets' softmax outputs
CPS (Eq. 7-8)      ``CE(z_A, 1[p_B,fg > T]) + CE(z_B, 1[p_A,fg > T])``
EFS (Eq. 9-11)     union pseudo-label; a voxel is ignored where both entropies reach their
                   subnet's alpha-percentile; ``N / N_valid * sum_k CE_valid(z_k)``
UE (Eq. 13-15)     ``mean(exp(-KL) * CE(z_s, argmax p~_t)) + mean(KL)``, ``p~_t = softmax(z_t / T)``,
                   T = 0.5, only for the pseudo-label; KL(p_t || p_s) with the untempered teacher
                   softmax (methods spec 4.2; ``sharpened_kl`` puts p~_t in the KL)
PGL (Eq. 16-20)    prototypes from reliable voxels (not ignored, A/B agree); uncertain voxels
                   pulled to their class prototype; with gradient
lambda_c(t)        ``0.1 * exp(-5 (1 - min(t // 150, 40) / 40)^2)``
=================  ======================================================================

``code_faithful=True`` reproduces the authors' released code (``train_LA.py`` /
``train_pancreas.py``) where it differs from the paper:

* CR mask: XOR (the paper's prose says OR). XOR is the default in both modes; ``mode="or"``
  is the switch.
* consistency: ``mean(1 - cos(p_A, p_B))`` over the class axis instead of MSE
  (:func:`prediction_consistency_loss`).
* EFS percentile alpha = 20 instead of the paper's 70 / 80 / 30 (:func:`entropy_filter`).
* EFS: the cross-entropy is taken on *detached softmax probabilities used as logits*, so the
  term carries no gradient (:func:`entropy_filtered_loss`).
* CPS: the code has no thresholded CPS term (the objective leaves it out).
* UE: nothing differs. The code's KL is against the untempered teacher softmax (T only enters an
  argmax, so it changes nothing) and UE runs in one direction, V-Net teaching ResNet; the
  methods spec (4.2) reads the paper the same way, so both are the default in both modes. The
  other reading (sharpened teacher inside the KL, both directions) is a switch:
  :func:`uncertainty_rectified_loss`'s ``sharpened_kl``, the objective's ``kl_sharpened`` and
  ``kl_bidirectional``.
* PGL: computed under ``no_grad`` (no gradient at all) and without the A/B agreement check
  (:func:`prototype_contrastive_loss`).

Not reproduced: the code computes the EFS / PGL entropies on *logits* (``p log p`` of raw
logits, NaN wherever a logit is negative), which makes its entropy percentile NaN, so nothing
is ignored and PGL's uncertain set is empty (its value is NaN). Both terms are gradient-free
there, so this only changes logged values; entropies are computed on probabilities here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.nn import functional as F

from monai_ssl.handlers.schedules import sigmoid_rampup

__all__ = [
    "EntropyFilter",
    "PAPER_ENTROPY_PERCENTILE",
    "CODE_ENTROPY_PERCENTILE",
    "dice_loss",
    "supervised_loss",
    "confidence_mask",
    "cross_reliable_loss",
    "prediction_consistency_loss",
    "cross_pseudo_supervision_loss",
    "entropy",
    "percentile",
    "entropy_filter",
    "entropy_filtered_loss",
    "uncertainty_rectified_loss",
    "prototype_contrastive_loss",
    "contrastive_weight",
]

#: EFS percentile alpha (in %) of the paper's Table 7 per dataset (the LA value is the default).
PAPER_ENTROPY_PERCENTILE: dict[str, float] = {"LA": 70.0, "Pancreas": 80.0, "BraTS": 30.0}
#: EFS percentile hard-coded in the authors' training scripts.
CODE_ENTROPY_PERCENTILE = 20.0

_IGNORE = -100  # ignore index for F.cross_entropy


def _check_binary(x: torch.Tensor, name: str) -> None:
    if x.dim() < 3 or x.shape[1] != 2:
        raise ValueError(f"{name} must be (B, 2, *spatial) two-class scores, got shape {tuple(x.shape)}")


def _as_index(label: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Class-index map ``(B, *spatial)`` (long) from a ``(B, *spatial)`` or ``(B, 1, *spatial)`` label."""
    if label.dim() == reference.dim():
        if label.shape[1] != 1:
            raise ValueError(f"label must have one channel, got shape {tuple(label.shape)}")
        label = label[:, 0]
    if label.shape != reference.shape[:1] + reference.shape[2:]:
        raise ValueError(f"label shape {tuple(label.shape)} does not match scores {tuple(reference.shape)}")
    return label.long()


def dice_loss(prob_fg: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """MCF / UA-MT Dice loss ``1 - (2 sum(p y) + s) / (sum(p^2) + sum(y^2) + s)`` over the whole batch."""
    target = target.to(prob_fg.dtype)
    intersect = (prob_fg * target).sum()
    return 1.0 - (2.0 * intersect + smooth) / ((prob_fg * prob_fg).sum() + (target * target).sum() + smooth)


def supervised_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """``CE(z, y) + Dice(softmax(z)[:, 1], y == 1)`` for one subnet on the labelled batch (Eq. 2)."""
    _check_binary(logits, "logits")
    y = _as_index(label, logits)
    return F.cross_entropy(logits, y) + dice_loss(F.softmax(logits, dim=1)[:, 1], y == 1)


def confidence_mask(prob_a: torch.Tensor, prob_b: torch.Tensor, threshold: float = 0.6, mode: str = "xor") -> torch.Tensor:
    """CR mask (Eq. 5): voxels where a subnet calls foreground with confidence ``>= threshold``.

    ``mode="xor"`` (the authors' code, default) keeps voxels where exactly one subnet does, i.e.
    confident disagreements; ``mode="or"`` (the paper's prose) keeps voxels where either does.
    Returns a float mask ``(B, *spatial)``.
    """
    _check_binary(prob_a, "prob_a")
    _check_binary(prob_b, "prob_b")
    q_a, y_a = prob_a.max(dim=1)
    q_b, y_b = prob_b.max(dim=1)
    conf_a = (y_a == 1) & (q_a >= threshold)
    conf_b = (y_b == 1) & (q_b >= threshold)
    if mode == "xor":
        mask = conf_a ^ conf_b
    elif mode == "or":
        mask = conf_a | conf_b
    else:
        raise ValueError(f"mode must be 'xor' or 'or', got {mode!r}")
    return mask.to(prob_a.dtype)


def cross_reliable_loss(prob: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CR loss of one subnet (Eq. 6): ``sum M (p_fg - y)^2 / (sum M + 1e-16)`` on labelled voxels.

    ``prob`` is that subnet's softmax, ``mask`` the :func:`confidence_mask` of both subnets.
    Gradient flows into ``prob`` (as in both the paper and the code).
    """
    _check_binary(prob, "prob")
    y = _as_index(label, prob)
    dist = (prob[:, 1] - y.to(prob.dtype)) ** 2
    return (mask * dist).sum() / (mask.sum() + 1e-16)


def prediction_consistency_loss(
    prob_a: torch.Tensor, prob_b: torch.Tensor, kind: str | None = None, code_faithful: bool = False
) -> torch.Tensor:
    """Consistency between the two subnets' softmax outputs; gradient flows into both.

    ``kind="mse"`` (paper: "minimizing the MSE between the predictions of Subnet A and Subnet
    B") is the mean of ``(p_A - p_B)^2`` over classes and voxels; ``kind="cosine"`` (the code's
    ``consist_loss``) is ``mean(1 - cos(p_A, p_B))`` with the cosine over the class axis.
    ``kind=None`` picks ``"cosine"`` when ``code_faithful`` else ``"mse"``.
    """
    if prob_a.shape != prob_b.shape:
        raise ValueError(f"prob_a {tuple(prob_a.shape)} and prob_b {tuple(prob_b.shape)} differ in shape")
    kind = kind or ("cosine" if code_faithful else "mse")
    if kind == "mse":
        return F.mse_loss(prob_a, prob_b)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(prob_a, prob_b, dim=1)).mean()
    raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")


def cross_pseudo_supervision_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, threshold: float = 0.6) -> torch.Tensor:
    """CPS (Eq. 7-8): ``CE(z_A, yhat_B) + CE(z_B, yhat_A)``, ``yhat_k = 1[softmax(z_k)_fg > threshold]``.

    Pseudo-labels are hard and carry no gradient; each subnet learns from the other's. (The
    authors' code has no such term.)
    """
    _check_binary(logits_a, "logits_a")
    _check_binary(logits_b, "logits_b")
    with torch.no_grad():
        y_a = (F.softmax(logits_a, dim=1)[:, 1] > threshold).long()
        y_b = (F.softmax(logits_b, dim=1)[:, 1] > threshold).long()
    return F.cross_entropy(logits_a, y_b) + F.cross_entropy(logits_b, y_a)


def entropy(prob: torch.Tensor) -> torch.Tensor:
    """Voxel-wise entropy ``-sum_c p_c log(p_c + 1e-10)`` over the class axis, ``(B, *spatial)``."""
    prob = prob.float()
    return -(prob * torch.log(prob + 1e-10)).sum(dim=1)


def percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``q``-th percentile (0-100) of all elements, with linear interpolation (as ``numpy.percentile``)."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    flat = x.reshape(-1)
    if flat.numel() == 0:
        raise ValueError("percentile of an empty tensor")
    pos = q / 100.0 * (flat.numel() - 1)
    lo, frac = int(math.floor(pos)), pos - math.floor(pos)
    v_lo = flat.kthvalue(lo + 1).values
    if frac == 0.0:
        return v_lo
    v_hi = flat.kthvalue(lo + 2).values
    return v_lo + (v_hi - v_lo) * frac


class EntropyFilter(NamedTuple):
    """Pseudo-labels and masks shared by EFS and PGL (all ``(B, *spatial)``, no gradient)."""

    #: union of the two subnets' argmax labels, ``argmax p_A OR argmax p_B`` (long).
    pseudo_label: torch.Tensor
    #: both subnets uncertain: ``H_A >= theta_A and H_B >= theta_B`` (bool).
    ignore: torch.Tensor
    #: the subnets' argmax labels agree (bool).
    agree: torch.Tensor


def entropy_filter(
    prob_a: torch.Tensor, prob_b: torch.Tensor, percentile_alpha: float | None = None, code_faithful: bool = False
) -> EntropyFilter:
    """EFS masks (Eq. 9-10): ``theta_k`` is the alpha-percentile of subnet k's entropies over the batch.

    ``percentile_alpha=None`` uses the code's 20 when ``code_faithful`` else the paper's LA value
    70 (see :data:`PAPER_ENTROPY_PERCENTILE`).
    """
    _check_binary(prob_a, "prob_a")
    _check_binary(prob_b, "prob_b")
    if percentile_alpha is None:
        percentile_alpha = CODE_ENTROPY_PERCENTILE if code_faithful else PAPER_ENTROPY_PERCENTILE["LA"]
    with torch.no_grad():
        y_a, y_b = prob_a.argmax(dim=1), prob_b.argmax(dim=1)
        h_a, h_b = entropy(prob_a), entropy(prob_b)
        ignore = (h_a >= percentile(h_a, percentile_alpha)) & (h_b >= percentile(h_b, percentile_alpha))
    return EntropyFilter(pseudo_label=y_a | y_b, ignore=ignore, agree=y_a == y_b)


def entropy_filtered_loss(
    logits_a: torch.Tensor, logits_b: torch.Tensor, filt: EntropyFilter, code_faithful: bool = False
) -> torch.Tensor:
    """EFS loss (Eq. 11): ``N / N_valid * sum_k CE_valid(z_k, yhat)``, ``CE_valid`` the mean over valid voxels.

    ``N`` is the number of voxels and ``N_valid`` the non-ignored ones (the U2PL / code
    rescaling). Returns 0 when every voxel is ignored. With ``code_faithful`` the cross-entropy
    is taken on detached softmax probabilities as if they were logits, as the authors' code does,
    so the value matches theirs and no gradient flows.
    """
    _check_binary(logits_a, "logits_a")
    _check_binary(logits_b, "logits_b")
    target = filt.pseudo_label.masked_fill(filt.ignore, _IGNORE)
    n_valid = int((~filt.ignore).sum())
    if n_valid == 0:
        return logits_a.new_zeros(())
    if code_faithful:
        logits_a = F.softmax(logits_a, dim=1).detach()
        logits_b = F.softmax(logits_b, dim=1).detach()
    weight = filt.ignore.numel() / n_valid
    ce_a = F.cross_entropy(logits_a, target, ignore_index=_IGNORE)
    ce_b = F.cross_entropy(logits_b, target, ignore_index=_IGNORE)
    return weight * (ce_a + ce_b)


def uncertainty_rectified_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 0.5, sharpened_kl: bool = False
) -> torch.Tensor:
    """UE (Eq. 13-15, Zheng & Yang 2021): pseudo-supervision of the student, down-weighted by the KL.

    ``yhat = argmax softmax(z_t / T)``, ``D(v) = KL(p_t(v) || p_s(v))`` over the class axis and
    ``L = mean(exp(-D) * CE(z_s, yhat)) + mean(D)``. The teacher is detached; the weight
    ``exp(-D)`` keeps its gradient into the student, as in the reference code. By default
    ``p_t = softmax(z_t)`` (untempered), as the methods spec (4.2) and the authors' code: T only
    enters the pseudo-label's argmax, where it changes nothing. ``sharpened_kl`` uses the
    temperature-sharpened ``p_t = softmax(z_t / T)`` inside the KL (the other reading of the paper).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} differ in shape")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    teacher_logits = teacher_logits.detach()
    pseudo_label = teacher_logits.argmax(dim=1)  # argmax softmax(z / T) == argmax z for T > 0
    p_t = F.softmax(teacher_logits / temperature if sharpened_kl else teacher_logits, dim=1)
    kl = F.kl_div(F.log_softmax(student_logits, dim=1), p_t, reduction="none").sum(dim=1)
    ce = F.cross_entropy(student_logits, pseudo_label, reduction="none")
    return (torch.exp(-kl) * ce).mean() + kl.mean()


#: Uncertain voxels whose feature vector is shorter than this are left out of PGL's sample (no direction).
MIN_FEATURE_NORM = 1e-3


def _mean_distance(candidates: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance between L2-normalised rows of ``candidates`` (N, C) and ``prototype`` (C)."""
    return torch.linalg.vector_norm(F.normalize(candidates, dim=1) - F.normalize(prototype, dim=0), dim=1).mean()


def prototype_contrastive_loss(
    features: torch.Tensor,
    prob: torch.Tensor,
    filt: EntropyFilter,
    require_agreement: bool | None = None,
    sample_fraction: float = 0.01,
    third_term: bool = True,
    code_faithful: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PGL (Eq. 16-20) on one subnet's decoder features ``z`` (``(B, C, *spatial)``).

    * reliable voxels: not ignored by :func:`entropy_filter` and (``require_agreement``) the two
      subnets' argmax agree; prototypes ``p_f`` / ``p_b`` are the mean feature of the reliable
      voxels with union pseudo-label 1 / 0;
    * uncertain voxels: the ignored ones, split by this subnet's own argmax (``prob``) into
      ``U_f`` and ``U_b``; ``n = floor(sample_fraction * |U_f|)`` voxels are drawn at random from
      each (the code uses the foreground count for both), leaving out voxels whose feature
      vector is shorter than :data:`MIN_FEATURE_NORM` (no direction to normalise);
    * ``L = mean_{U_f} |z^ - p^_f| + mean_{U_b} |z^ - p^_b| + |p^_f - p^_b|`` with ``^`` the L2
      normalisation; the third term (``third_term``) pulls the prototypes together, as the
      code and the paper's Table 6 ablation do.

    A term whose voxel set or prototype is empty contributes 0. With gradient (paper) the
    prototypes are detached in the first two terms, so uncertain features move toward fixed
    prototypes, and the third term's gradient reaches the reliable features. With
    ``code_faithful`` everything runs under ``no_grad`` and ``require_agreement=None`` means no
    agreement check, as the authors' code. ``generator`` (a CPU generator) seeds the subsampling.
    """
    _check_binary(prob, "prob")
    if features.shape[0] != prob.shape[0] or features.shape[2:] != prob.shape[2:]:
        raise ValueError(f"features {tuple(features.shape)} do not match probabilities {tuple(prob.shape)}")
    if not 0.0 < sample_fraction <= 1.0:
        raise ValueError(f"sample_fraction must be in (0, 1], got {sample_fraction}")
    if require_agreement is None:
        require_agreement = not code_faithful
    with torch.set_grad_enabled(torch.is_grad_enabled() and not code_faithful):
        # At least float32, and uncertain voxels whose features (nearly) vanish are not sampled:
        # the direction of a zero vector is undefined and F.normalize's gradient there is 1/eps
        # (1e12), which overflows float16 and, under CUDA autocast, made GradScaler skip every
        # optimiser step (seen on an H100: the paper-loss runs never learned).
        z = features.to(torch.promote_types(features.dtype, torch.float32)).movedim(1, -1).reshape(-1, features.shape[1])  # (N, C)
        label = filt.pseudo_label.reshape(-1)
        ignore = filt.ignore.reshape(-1)
        reliable = ~ignore & filt.agree.reshape(-1) if require_agreement else ~ignore
        own = prob.argmax(dim=1).reshape(-1)
        proto_f = z[reliable & (label == 1)].mean(dim=0) if bool((reliable & (label == 1)).any()) else None
        proto_b = z[reliable & (label == 0)].mean(dim=0) if bool((reliable & (label == 0)).any()) else None
        n = int(sample_fraction * int((ignore & (own == 1)).sum()))
        directed = torch.linalg.vector_norm(z.detach(), dim=1) > MIN_FEATURE_NORM
        cand_f, cand_b = z[ignore & (own == 1) & directed], z[ignore & (own == 0) & directed]
        loss = z.new_zeros(())
        for cand, proto in ((cand_f, proto_f), (cand_b, proto_b)):
            k = min(n, cand.shape[0])
            if proto is not None and k > 0:
                idx = torch.randperm(cand.shape[0], generator=generator)[:k].to(cand.device)
                loss = loss + _mean_distance(cand[idx], proto.detach())
        if third_term and proto_f is not None and proto_b is not None:
            loss = loss + torch.linalg.vector_norm(F.normalize(proto_f, dim=0) - F.normalize(proto_b, dim=0))
    return loss


def contrastive_weight(iteration: int, max_weight: float = 0.1, rampup_length: int = 40, step_size: int = 150) -> float:
    """lambda_c(t) = ``max_weight * exp(-5 (1 - min(t // step_size, L) / L)^2)``, full from t = 6000.

    ``iteration`` counts from 0 (the code's ``iter_num``).
    """
    return max_weight * sigmoid_rampup(iteration // step_size, rampup_length)
