"""Dual-network 3D method: loss terms against hand-computed values, networks, objective, sliding window."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import DataLoader
from torch.nn import functional as F

from monai_ssl.engines import SemiSupervisedTrainer
from monai_ssl.inference import (
    SLIDING_WINDOW_PRESETS,
    SlidingWindowPreset,
    dual_sliding_window_inference,
    naive_sliding_window,
    stride_to_overlap,
)
from monai_ssl.losses.dual_3d import (
    EntropyFilter,
    confidence_mask,
    contrastive_weight,
    cross_pseudo_supervision_loss,
    cross_reliable_loss,
    entropy_filter,
    entropy_filtered_loss,
    percentile,
    prediction_consistency_loss,
    prototype_contrastive_loss,
    supervised_loss,
    uncertainty_rectified_loss,
)
from monai_ssl.methods.dual_network_3d import DualNetwork3DObjective
from monai_ssl.networks.dual_3d import DualNetwork3D, ResNetSeg3D, VNet3D

SHAPE = (1, 2, 2, 2)  # B, D, H, W: 8 voxels, in this order in every flat list below


def probs(fg: list[float]) -> torch.Tensor:
    """(1, 2, 2, 2, 2) two-class probabilities from the foreground values of the 8 voxels."""
    p = torch.tensor(fg, dtype=torch.float64).reshape(SHAPE)
    return torch.stack([1 - p, p], dim=1)


def logits(fg: list[float]) -> torch.Tensor:
    """Logits whose softmax is ``probs(fg)`` (log-probabilities)."""
    return probs(fg).log()


def labels(values: list[int]) -> torch.Tensor:
    return torch.tensor(values).reshape(SHAPE)


def tiny_dual() -> DualNetwork3D:
    return DualNetwork3D(n_filters=2, resnet_layers=(1, 1, 1, 1))


# ----------------------------------------------------------------------------- loss terms


def test_supervised_loss_is_ce_plus_mcf_dice() -> None:
    fg = [0.75, 0.75, 0.25, 0.25, 0.75, 0.25, 0.25, 0.25]
    y = [1, 0, 0, 1, 1, 0, 0, 0]
    ce = (6 * -math.log(0.75) + 2 * -math.log(0.25)) / 8  # six voxels get 0.75 on their class
    inter, p2, y2 = 0.75 + 0.25 + 0.75, 3 * 0.75**2 + 5 * 0.25**2, 3.0
    dice = 1 - (2 * inter + 1e-5) / (p2 + y2 + 1e-5)
    got = supervised_loss(logits(fg), labels(y).unsqueeze(1).float())  # (B, 1, ...) float label accepted
    assert got.item() == pytest.approx(ce + dice, rel=1e-9)


P_A = [0.9, 0.9, 0.55, 0.3, 0.7, 0.1, 0.65, 0.4]
P_B = [0.9, 0.2, 0.9, 0.3, 0.59, 0.8, 0.61, 0.45]
Y_CR = [1, 0, 1, 0, 0, 0, 1, 1]


@pytest.mark.parametrize(
    "mode, expected_mask",
    [
        ("xor", [0, 1, 1, 0, 1, 1, 0, 0]),  # exactly one subnet confident foreground (>= 0.6)
        ("or", [1, 1, 1, 0, 1, 1, 1, 0]),
    ],
)
def test_cr_mask_and_loss(mode: str, expected_mask: list[int]) -> None:
    mask = confidence_mask(probs(P_A), probs(P_B), threshold=0.6, mode=mode)
    assert mask.reshape(-1).tolist() == expected_mask
    idx = [i for i, m in enumerate(expected_mask) if m]
    expected = sum((P_A[i] - Y_CR[i]) ** 2 for i in idx) / len(idx)
    assert cross_reliable_loss(probs(P_A), labels(Y_CR), mask).item() == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="'xor' or 'or'"):
        confidence_mask(probs(P_A), probs(P_B), mode="and")


def test_prediction_consistency_mse_and_cosine() -> None:
    pa, pb = probs(P_A), probs(P_B)
    mse = sum((a - b) ** 2 for a, b in zip(P_A, P_B)) / 8  # both classes differ by the same amount
    assert prediction_consistency_loss(pa, pb).item() == pytest.approx(mse, rel=1e-9)
    cos = [((1 - a) * (1 - b) + a * b) / math.hypot(a, 1 - a) / math.hypot(b, 1 - b) for a, b in zip(P_A, P_B)]
    expected_cos = sum(1 - c for c in cos) / 8
    assert prediction_consistency_loss(pa, pb, code_faithful=True).item() == pytest.approx(expected_cos, rel=1e-7)
    assert prediction_consistency_loss(pa, pb, kind="cosine").item() == pytest.approx(expected_cos, rel=1e-7)


def test_cps_uses_thresholded_cross_labels() -> None:
    fg_a = [0.75, 0.25] + [0.5] * 6
    fg_b = [0.8, 0.55] + [0.3] * 6  # 0.55 is foreground by argmax but not > 0.6
    y_a = [1, 0] + [0] * 6  # 0.5 is not > 0.6
    y_b = [1, 0] + [0] * 6
    pa = lambda i: fg_a[i] if y_b[i] else 1 - fg_a[i]  # noqa: E731
    pb = lambda i: fg_b[i] if y_a[i] else 1 - fg_b[i]  # noqa: E731
    expected = sum(-math.log(pa(i)) for i in range(8)) / 8 + sum(-math.log(pb(i)) for i in range(8)) / 8
    za, zb = logits(fg_a).requires_grad_(), logits(fg_b).requires_grad_()
    loss = cross_pseudo_supervision_loss(za, zb, threshold=0.6)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    loss.backward()
    assert za.grad.abs().sum() > 0 and zb.grad.abs().sum() > 0


# EFS example: with alpha = 50 the four highest-entropy voxels of each subnet are uncertain:
# A: {3, 4, 5, 6}, B: {0, 4, 5, 7}, so voxels 4 and 5 are ignored (uncertain in both).
E_A = [0.99, 0.9, 0.8, 0.7, 0.6, 0.45, 0.25, 0.03]
E_B = [0.52, 0.97, 0.1, 0.92, 0.4, 0.55, 0.02, 0.35]


def test_entropy_filter_masks() -> None:
    filt = entropy_filter(probs(E_A), probs(E_B), percentile_alpha=50)
    assert filt.ignore.reshape(-1).tolist() == [False, False, False, False, True, True, False, False]
    assert filt.pseudo_label.reshape(-1).tolist() == [1, 1, 1, 1, 1, 1, 0, 0]  # argmax A OR argmax B
    assert filt.agree.reshape(-1).tolist() == [True, True, False, True, False, False, True, True]
    # paper default percentile 70 vs code 20: 20 marks more voxels uncertain
    assert entropy_filter(probs(E_A), probs(E_B), code_faithful=True).ignore.sum() >= entropy_filter(probs(E_A), probs(E_B)).ignore.sum()


def test_efs_ignores_and_rescales_to_valid_count() -> None:
    filt = entropy_filter(probs(E_A), probs(E_B), percentile_alpha=50)
    valid = [0, 1, 2, 3, 6, 7]
    target = [1, 1, 1, 1, 1, 1, 0, 0]
    ce = lambda p, i: -math.log(p[i] if target[i] else 1 - p[i])  # noqa: E731
    expected = 8 / 6 * (sum(ce(E_A, i) for i in valid) / 6 + sum(ce(E_B, i) for i in valid) / 6)
    za, zb = logits(E_A).requires_grad_(), logits(E_B).requires_grad_()
    loss = entropy_filtered_loss(za, zb, filt)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert za.grad.reshape(2, -1)[:, 4:6].abs().sum() == 0  # ignored voxels get no gradient
    assert za.grad.abs().sum() > 0
    # code: cross-entropy on detached softmax probabilities used as logits, no gradient
    faithful = entropy_filtered_loss(za, zb, filt, code_faithful=True)
    t = torch.tensor(target).reshape(SHAPE).masked_fill(filt.ignore, -100)
    expected_code = 8 / 6 * (F.cross_entropy(probs(E_A), t) + F.cross_entropy(probs(E_B), t))
    assert faithful.item() == pytest.approx(expected_code.item(), rel=1e-9) and not faithful.requires_grad
    # every voxel ignored (equal entropies): the term is 0
    flat = entropy_filter(probs([0.5] * 8), probs([0.5] * 8), 50)
    assert bool(flat.ignore.all()) and entropy_filtered_loss(logits([0.5] * 8), logits([0.5] * 8), flat).item() == 0


def test_percentile_matches_numpy() -> None:
    x = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(0))
    for q in (0, 20, 33.3, 70, 100):
        assert percentile(x, q).item() == pytest.approx(np.percentile(x.numpy(), q), rel=1e-6, abs=1e-6)


def test_uncertainty_rectified_loss_untempered_kl_by_default_sharpened_on_switch() -> None:
    """Spec 4.2: T enters only the pseudo-label; ``sharpened_kl`` puts softmax(z_t / T) in the KL."""
    student = torch.zeros(1, 2, 1, 1, 1, requires_grad=True)  # p_s = (0.5, 0.5)
    teacher = torch.tensor([0.0, math.log(3)]).reshape(1, 2, 1, 1, 1).requires_grad_()  # p_t = (0.25, 0.75)
    ce = math.log(2)  # CE(z_s, argmax p_t = 1)
    kl_plain = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl_sharp = 0.1 * math.log(0.1 / 0.5) + 0.9 * math.log(0.9 / 0.5)  # softmax(z_t / 0.5) = (0.1, 0.9)
    default = uncertainty_rectified_loss(student, teacher, temperature=0.5)
    sharp = uncertainty_rectified_loss(student, teacher, temperature=0.5, sharpened_kl=True)
    assert default.item() == pytest.approx(math.exp(-kl_plain) * ce + kl_plain, rel=1e-6)  # 0.5506
    assert sharp.item() == pytest.approx(math.exp(-kl_sharp) * ce + kl_sharp, rel=1e-6)  # 0.7679
    # T changes nothing without the switch (it only enters an argmax)
    assert uncertainty_rectified_loss(student, teacher, temperature=0.1).item() == pytest.approx(default.item(), rel=1e-7)
    sharp.backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None  # the teacher is detached


# PGL example, 8 voxels with 2-d features (voxel order as above).
PGL_FEATS = [(2.0, 0.0), (0.0, 5.0), (0.0, 3.0), (0.0, 1.0), (1.0, 1.0), (3.0, 0.0), (0.0, 2.0), (1.0, 1.0)]
PGL_FILTER = EntropyFilter(
    pseudo_label=labels([1, 1, 0, 0, 1, 0, 1, 0]),
    ignore=labels([0, 0, 0, 0, 1, 1, 1, 1]).bool(),
    agree=labels([1, 0, 1, 1, 1, 1, 1, 1]).bool(),  # voxel 1 is reliable only without the agreement check
)
PGL_OWN = probs([0.9, 0.9, 0.1, 0.1, 0.8, 0.3, 0.7, 0.2])  # uncertain: U_f = {4, 6}, U_b = {5, 7}


def pgl_features() -> torch.Tensor:
    return torch.tensor(PGL_FEATS, dtype=torch.float64).T.reshape(1, 2, 2, 2, 2).clone().requires_grad_()


def unit(v: tuple[float, float]) -> tuple[float, float]:
    n = math.hypot(*v)
    return (v[0] / n, v[1] / n)


def dist(u: tuple[float, float], v: tuple[float, float]) -> float:
    return math.hypot(u[0] - v[0], u[1] - v[1])


def expected_pgl(proto_f: tuple[float, float], proto_b: tuple[float, float], third: bool = True) -> float:
    pf, pb = unit(proto_f), unit(proto_b)
    term_f = (dist(unit(PGL_FEATS[4]), pf) + dist(unit(PGL_FEATS[6]), pf)) / 2
    term_b = (dist(unit(PGL_FEATS[5]), pb) + dist(unit(PGL_FEATS[7]), pb)) / 2
    return term_f + term_b + (dist(pf, pb) if third else 0.0)


def test_prototype_loss_values_and_gradient() -> None:
    z = pgl_features()
    loss = prototype_contrastive_loss(z, PGL_OWN, PGL_FILTER, sample_fraction=1.0)
    # reliable (not ignored, agreeing): fg {0} -> (2, 0); bg {2, 3} -> (0, 2)
    assert loss.item() == pytest.approx(expected_pgl((2.0, 0.0), (0.0, 2.0)), rel=1e-9)
    loss.backward()
    grad = z.grad.reshape(2, 8).abs().sum(dim=0)
    assert all(grad[i] > 0 for i in (0, 2, 3, 4, 5, 6, 7))  # uncertain voxels, and reliable ones via term 3
    assert grad[1] == 0  # neither reliable (disagreement) nor uncertain
    no_third = prototype_contrastive_loss(pgl_features(), PGL_OWN, PGL_FILTER, sample_fraction=1.0, third_term=False)
    assert no_third.item() == pytest.approx(expected_pgl((2.0, 0.0), (0.0, 2.0), third=False), rel=1e-9)
    # fewer than 1 / sample_fraction uncertain foreground voxels: only the prototype term is left
    tiny = prototype_contrastive_loss(pgl_features(), PGL_OWN, PGL_FILTER, sample_fraction=0.01)
    assert tiny.item() == pytest.approx(math.sqrt(2), rel=1e-9)


def test_prototype_loss_code_faithful_has_no_gradient_and_no_agreement_check() -> None:
    z = pgl_features()
    loss = prototype_contrastive_loss(z, PGL_OWN, PGL_FILTER, sample_fraction=1.0, code_faithful=True)
    # without the agreement check voxel 1 joins the foreground prototype: mean((2, 0), (0, 5))
    assert loss.item() == pytest.approx(expected_pgl((1.0, 2.5), (0.0, 2.0)), rel=1e-9)
    assert not loss.requires_grad


def test_prototype_loss_is_finite_on_float16_features_with_all_zero_voxels() -> None:
    """Float16 features (CUDA autocast) with dead (all-zero) voxels: finite loss and gradient."""
    z = pgl_features().detach().to(torch.float16)
    voxels = z.view(2, 8)  # (channels, voxels)
    voxels[:, 3] = 0.0  # a reliable background voxel whose features are all zero
    voxels[:, 7] = 0.0  # an uncertain background voxel likewise
    z.requires_grad_(True)
    loss = prototype_contrastive_loss(z, PGL_OWN, PGL_FILTER, sample_fraction=1.0)
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert (z.grad.view(2, 8)[:, 7] == 0).all()  # the dead uncertain voxel is left out of the sample


def test_contrastive_weight_schedule() -> None:
    assert contrastive_weight(0) == pytest.approx(0.1 * math.exp(-5))
    assert contrastive_weight(149) == contrastive_weight(0)
    assert contrastive_weight(150) == pytest.approx(0.1 * math.exp(-5 * (1 - 1 / 40) ** 2))
    assert contrastive_weight(6000) == pytest.approx(0.1) and contrastive_weight(20000) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- networks


def test_subnet_shapes_and_vnet_size() -> None:
    x = torch.randn(2, 1, 16, 16, 16)
    for net in (VNet3D(n_filters=2), ResNetSeg3D(n_filters=2, layers=(1, 1, 1, 1))):
        logits_, feats = net.forward_features(x)
        assert logits_.shape == (2, 2, 16, 16, 16) and feats.shape == (2, 2, 16, 16, 16)
        assert net(x).shape == (2, 2, 16, 16, 16)
    assert 9.44e6 <= sum(p.numel() for p in VNet3D().parameters()) < 9.45e6  # the paper's 9.44 M
    with pytest.raises(ValueError, match="4 positive"):
        ResNetSeg3D(layers=(1, 1, 1))


def test_dual_network_scripts_and_exports_with_dynamic_batch() -> None:
    net = tiny_dual().eval()
    x = torch.randn(2, 1, 16, 16, 16)
    ref = net(x)
    assert ref.shape == (2, 2, 16, 16, 16)
    torch.testing.assert_close(ref.sum(dim=1), torch.ones(2, 16, 16, 16))
    torch.testing.assert_close(torch.jit.script(net)(x), ref)
    exported = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=8)},))
    x3 = torch.randn(3, 1, 16, 16, 16)
    torch.testing.assert_close(exported.module()(x3), net(x3), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- objective


def blobs(n: int, seed: int, with_label: bool = True) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    cases = []
    for _ in range(n):
        lab = torch.zeros(1, 16, 16, 16)
        c = torch.randint(3, 9, (3,), generator=g).tolist()
        lab[:, c[0] : c[0] + 6, c[1] : c[1] + 6, c[2] : c[2] + 6] = 1
        case = {"image": torch.rand(1, 16, 16, 16, generator=g) * 0.3 + 0.6 * lab}
        if with_label:
            case["label"] = lab
        cases.append(case)
    return cases


@pytest.mark.parametrize(
    "kwargs, absent",
    [
        ({}, set()),
        ({"code_faithful": True}, {"loss_cps"}),
        ({"pgl_routing": "both", "cr_mask": "or", "pred": "vnet", "consistency": "none"}, {"loss_consistency"}),
    ],
)
def test_objective_one_step(kwargs: dict, absent: set[str]) -> None:
    torch.manual_seed(0)
    net = tiny_dual()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    objective = DualNetwork3DObjective(pgl_sample_fraction=0.5, **kwargs)
    trainer = SemiSupervisedTrainer(
        device="cpu", max_epochs=1, train_data_loader=DataLoader(blobs(2, 1), batch_size=2), network=net,
        optimizer=opt, objective=objective, unlabeled_data_loader=DataLoader(blobs(2, 2, False), batch_size=2),
        epoch_length=1, decollate=False,
    )
    before = [p.detach().clone() for p in (net.vnet.block1[0].weight, net.resnet.stem[0].weight)]
    trainer.run()
    out = trainer.state.output
    terms = {"loss_sup_vnet", "loss_sup_resnet", "loss_cr", "loss_consistency", "loss_kl", "loss_cps", "loss_efs", "loss_pgl"}
    assert {k for k in out if k.startswith("loss_")} == terms - absent
    assert all(torch.isfinite(out[k]) for k in terms - absent)
    assert out["pred"].shape == (2, 2, 16, 16, 16)
    after = (net.vnet.block1[0].weight, net.resnet.stem[0].weight)
    assert all(not torch.equal(a, b) for a, b in zip(before, after))  # both subnets were updated


def test_objective_rejects_single_network_and_bad_switch() -> None:
    class _Engine:
        network = VNet3D(n_filters=2)

    batch = blobs(1, 0)[0]
    with pytest.raises(TypeError, match="DualNetwork3D"):
        DualNetwork3DObjective()(_Engine(), {k: v[None] for k, v in batch.items()}, None)
    with pytest.raises(ValueError, match="pgl_routing"):
        DualNetwork3DObjective(pgl_routing="winner")


# ----------------------------------------------------------------------------- sliding window


def test_presets_give_exact_strides() -> None:
    for spec in SLIDING_WINDOW_PRESETS.values():
        overlap = stride_to_overlap(spec.roi_size, spec.stride)
        assert tuple(int(r * (1 - o)) for r, o in zip(spec.roi_size, overlap)) == spec.stride
    with pytest.raises(ValueError, match="preset"):
        dual_sliding_window_inference(tiny_dual(), torch.zeros(1, 1, 16, 16, 16), preset="Liver")


@pytest.mark.parametrize("shape", [(2, 1, 27, 21, 19), (1, 1, 12, 20, 16)])  # the second is smaller than the window
def test_sliding_window_matches_naive_loop(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    net = tiny_dual().eval()
    image = torch.randn(*shape)
    spec = SlidingWindowPreset(roi_size=(16, 16, 16), stride=(5, 3, 4))
    fast = dual_sliding_window_inference(net, image, spec, sw_batch_size=3)
    slow = naive_sliding_window(net, image, spec.roi_size, spec.stride)
    assert fast.shape == slow.shape == (shape[0], 2, *shape[2:])
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_unsup_rampup_scales_only_the_unsupervised_terms() -> None:
    from types import SimpleNamespace

    torch.manual_seed(0)
    net = tiny_dual().eval()  # eval: BatchNorm/dropout identical in both calls
    labeled = {k: torch.stack([c[k] for c in blobs(2, 1)]) for k in ("image", "label")}
    unlabeled = {"image": torch.stack([c["image"] for c in blobs(2, 2, False)])}
    engine = SimpleNamespace(network=net, state=SimpleNamespace(iteration=11))  # t = 10 of a 40-iteration ramp
    with torch.no_grad():
        torch.manual_seed(1)
        full = DualNetwork3DObjective(pgl_sample_fraction=1.0)(engine, labeled, unlabeled)
        torch.manual_seed(1)
        ramped = DualNetwork3DObjective(pgl_sample_fraction=1.0, unsup_rampup=40)(engine, labeled, unlabeled)
    weight = math.exp(-5.0 * (1 - 10 / 40) ** 2)
    for name in ("loss_consistency", "loss_kl", "loss_cps", "loss_efs"):
        torch.testing.assert_close(ramped[name], weight * full[name], msg=name)
    for name in ("loss_sup_vnet", "loss_sup_resnet", "loss_cr", "loss_pgl"):
        torch.testing.assert_close(ramped[name], full[name], msg=name)
    with pytest.raises(ValueError, match="unsup_rampup"):
        DualNetwork3DObjective(unsup_rampup=-1)
