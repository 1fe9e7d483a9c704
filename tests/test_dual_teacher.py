"""Dual-teacher BUS method pieces: UEWF, AURCL, the objective, the appearance proposer, LiteMedSAM."""

from __future__ import annotations

import math
import socket
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from monai_ssl.foundation.appearance import AppearanceBoxProposer, BoxProposal, box_iou, parse_prompt, propose
from monai_ssl.losses.contrastive import (
    AURCLoss,
    confidence_map,
    low_confidence_mask,
    low_confidence_threshold,
    patch_info_nce,
    reverse_probabilities,
    weighted_patch_features,
)
from monai_ssl.methods.dual_teacher import DualTeacherObjective, SoftBCEDiceLoss
from monai_ssl.networks import ResNetUNet
from monai_ssl.pseudo.fusion import binary_entropy, patch_average, region_entropy, uewf


def h(p: float) -> float:
    """Binary entropy by hand (eps negligible)."""
    return -(p * math.log(p) + (1 - p) * math.log(1 - p)) if 0 < p < 1 else 0.0


# ----------------------------------------------------------------------------- UEWF


P_S = torch.tensor([[0.5, 0.9, 0.2, 0.2], [0.9, 0.5, 0.2, 0.2], [0.7, 0.7, 0.99, 0.01], [0.7, 0.7, 0.6, 0.6]])
P_D = torch.tensor([[0.8, 0.8, 0.6, 0.4], [0.8, 0.8, 0.4, 0.6], [0.3, 0.3, 0.5, 0.5], [0.3, 0.3, 0.5, 0.5]])


def test_entropy_and_patch_smoothing_by_hand() -> None:
    p = P_S.view(1, 1, 4, 4)
    assert binary_entropy(p)[0, 0, 0, 0].item() == pytest.approx(math.log(2), abs=1e-6)
    assert binary_entropy(p)[0, 0, 0, 1].item() == pytest.approx(h(0.9), abs=1e-6)
    u = region_entropy(p, patch_size=2)
    top_left = (2 * math.log(2) + 2 * h(0.9)) / 4
    bottom_right = (h(0.99) + h(0.01) + 2 * h(0.6)) / 4
    assert torch.allclose(u[0, 0, :2, :2], torch.full((2, 2), top_left), atol=1e-6)
    assert torch.allclose(u[0, 0, 2:, 2:], torch.full((2, 2), bottom_right), atol=1e-6)
    assert torch.allclose(region_entropy(p, 2, patchify=False), binary_entropy(p))


def test_patch_average_ragged_border() -> None:
    x = torch.arange(25.0).view(1, 1, 5, 5)
    pooled = patch_average(x, 2)
    assert pooled.shape == (1, 1, 3, 3)
    assert pooled[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 5 + 6) / 4)
    assert pooled[0, 0, 0, 2].item() == pytest.approx((4 + 9) / 2)  # ragged column: its own pixels only
    assert pooled[0, 0, 2, 2].item() == pytest.approx(24.0)
    assert region_entropy(torch.rand(2, 1, 5, 7), patch_size=4).shape == (2, 1, 5, 7)


def test_uewf_matches_hand_computation() -> None:
    p_s, p_d = P_S.view(1, 1, 4, 4), P_D.view(1, 1, 4, 4)
    fused = uewf(p_s, p_d, patch_size=2)
    u_s = (2 * math.log(2) + 2 * h(0.9)) / 4  # static teacher, top-left patch
    u_d = h(0.8)  # dynamic teacher, top-left patch (constant 0.8)
    w_s, w_d = 1 / u_s, 1 / u_d
    for (r, c), ps in {(0, 0): 0.5, (0, 1): 0.9}.items():
        assert fused[0, 0, r, c].item() == pytest.approx((w_s * ps + w_d * 0.8) / (w_s + w_d), abs=1e-5)
    # bottom-left patch: static 0.7 everywhere, dynamic 0.3 everywhere, equal entropies -> 0.5
    assert torch.allclose(fused[0, 0, 2:, :2], torch.full((2, 2), 0.5), atol=1e-6)
    # without patchify the weights are the pixel entropies
    pix = uewf(p_s, p_d, patch_size=2, patchify=False)
    w_s, w_d = 1 / h(0.5), 1 / h(0.8)
    assert pix[0, 0, 0, 0].item() == pytest.approx((w_s * 0.5 + w_d * 0.8) / (w_s + w_d), abs=1e-5)
    assert not torch.allclose(pix, fused)
    # fuse off: plain average
    assert torch.allclose(uewf(p_s, p_d, fuse=False), (p_s + p_d) / 2)
    # a confident teacher dominates an uncertain one
    sure, unsure = torch.full((1, 1, 4, 4), 0.999), torch.full((1, 1, 4, 4), 0.5)
    assert (uewf(sure, unsure, patch_size=2) > 0.99).all()


# ----------------------------------------------------------------------------- AURCL


def test_dynamic_threshold_quantile_vs_lower_bound() -> None:
    # image 0: c = [0.5, 0.6, 0.8, 0.95, 0.99] -> Quantile_0.2 = 0.5 + 0.8 * 0.1 = 0.58 < 0.7 -> theta = 0.7
    # image 1: c = [0.9, 0.92, 0.94, 0.96, 0.98] -> Quantile_0.2 = 0.916 > 0.7 -> theta = 0.916
    p = torch.tensor([[0.5, 0.4, 0.8, 0.05, 0.99], [0.1, 0.92, 0.06, 0.96, 0.02]]).view(2, 1, 1, 5)
    conf = confidence_map(p)
    assert torch.allclose(conf[1].flatten(), torch.tensor([0.9, 0.92, 0.94, 0.96, 0.98]))
    theta = low_confidence_threshold(conf, ratio=0.2, tau_min=0.7)
    assert theta.tolist() == pytest.approx([0.7, 0.916], abs=1e-6)
    mask = low_confidence_mask(p, ratio=0.2, tau_min=0.7)
    assert mask.flatten(1).tolist() == [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    fixed = low_confidence_mask(p, ratio=0.2, tau_min=0.7, dynamic=False)
    assert fixed.flatten(1).tolist() == [[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]
    # r = 0.6: position 0.6 * 4 = 2.4 in the sorted values -> 0.8 + 0.4 * 0.15 and 0.94 + 0.4 * 0.02
    assert low_confidence_threshold(conf, ratio=0.6, tau_min=0.7).tolist() == pytest.approx([0.86, 0.948], abs=1e-6)


def test_probability_reversal() -> None:
    p = torch.tensor([0.1, 0.45, 0.9, 0.6])
    m = torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert reverse_probabilities(p, m).tolist() == pytest.approx([0.1, 0.55, 0.9, 0.4])


def test_weighted_patch_features_by_hand() -> None:
    p = torch.tensor([[0.1, 0.2, 0.5, 0.5], [0.3, 0.4, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]).view(1, 1, 4, 4)
    feats = torch.stack([torch.ones(4, 4), torch.arange(16.0).view(4, 4)]).unsqueeze(0)  # (1, 2, 4, 4)
    f = weighted_patch_features(p, feats, patch_size=2)
    assert f.shape == (1, 4, 2)  # N = (4/2) * (4/2) patches, row-major
    assert f[0, 0].tolist() == pytest.approx([(0.1 + 0.2 + 0.3 + 0.4) / 4, (0.1 * 0 + 0.2 * 1 + 0.3 * 4 + 0.4 * 5) / 4])
    assert f[0, 1].tolist() == pytest.approx([0.5, 0.5 * (2 + 3 + 6 + 7) / 4])
    assert f[0, 2].tolist() == pytest.approx([0.25, 8 / 4])
    assert f[0, 3].tolist() == pytest.approx([0.25, 15 / 4])


def test_info_nce_matches_manual_computation() -> None:
    f = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    f_rev = torch.tensor([[[1.0, 1.0], [0.0, 2.0]]])
    t = 0.1
    s = [[1 / math.sqrt(2), 0.0], [1 / math.sqrt(2), 1.0]]  # s[j][k] = cos(f_j, f~_k)
    manual = -sum(s[j][j] / t - math.log(sum(math.exp(s[j][k] / t) for k in range(2))) for j in range(2)) / 2
    assert patch_info_nce(f, f_rev, t).item() == pytest.approx(manual, rel=1e-5)
    # batch: per-image negatives only, mean over B * N anchors
    two = patch_info_nce(torch.cat([f, f]), torch.cat([f_rev, f_rev]), t)
    assert two.item() == pytest.approx(manual, rel=1e-5)


def test_aurcl_composes_equations_and_backpropagates_through_both_views() -> None:
    g = torch.Generator().manual_seed(0)
    prob = torch.rand(2, 1, 8, 8, generator=g).requires_grad_()
    feats = torch.randn(2, 3, 8, 8, generator=g).requires_grad_()
    loss = AURCLoss(patch_size=4, ratio=0.2, tau_min=0.7, temperature=0.1)(prob, feats)
    mask = low_confidence_mask(prob, 0.2, 0.7)
    expected = patch_info_nce(
        weighted_patch_features(prob, feats, 4), weighted_patch_features(reverse_probabilities(prob, mask), feats, 4), 0.1
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert prob.grad is not None and prob.grad.abs().sum() > 0
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="share batch and spatial"):
        AURCLoss(patch_size=4)(prob.detach(), feats.detach()[..., :4])


# ----------------------------------------------------------------------------- objective


def tiny_unet(seed: int) -> ResNetUNet:
    torch.manual_seed(seed)
    return ResNetUNet(backbone="resnet18", decoder_channels=(16, 16, 8, 8, 8))


class _NoFeatures(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.fixture(scope="module")
def nets() -> dict[str, ResNetUNet]:
    return {"student": tiny_unet(0), "static": tiny_unet(1), "dynamic": tiny_unet(2)}


@pytest.fixture(scope="module")
def batch() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    labeled = {"image": torch.rand(2, 1, 32, 32, generator=g), "label": (torch.rand(2, 1, 32, 32, generator=g) > 0.7).float()}
    return labeled, {"image": torch.rand(2, 1, 32, 32, generator=g)}


def make_objective(nets: dict[str, ResNetUNet], **kwargs) -> DualTeacherObjective:
    return DualTeacherObjective(DiceCELoss(sigmoid=True), nets["static"], nets["dynamic"], **kwargs)


def test_objective_one_step_finite_terms_and_gradients(nets, batch) -> None:
    student = nets["student"]
    student.zero_grad()
    out = make_objective(nets, patch_size=8)(SimpleNamespace(network=student), *batch)
    assert set(out) == {"pred", "loss_sup", "loss_unsup", "loss_con"}
    assert out["pred"].shape == (2, 1, 32, 32)
    for name in ("loss_sup", "loss_unsup", "loss_con"):
        assert out[name].dim() == 0 and torch.isfinite(out[name]), name
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    assert student.head.weight.grad is not None and student.head.weight.grad.abs().sum() > 0
    for teacher in (nets["static"], nets["dynamic"]):
        assert all(p.grad is None for p in teacher.parameters())
    sup_only = make_objective(nets)(SimpleNamespace(network=student), batch[0], None)
    assert set(sup_only) == {"pred", "loss_sup"}


def test_objective_switches(nets, batch) -> None:
    engine = SimpleNamespace(network=nets["student"])
    x_u = batch[1]["image"]
    with torch.no_grad():
        p_s, p_d = torch.sigmoid(nets["static"](x_u)), torch.sigmoid(nets["dynamic"](x_u))
    assert torch.allclose(make_objective(nets, patch_size=8).pseudo_label(x_u), uewf(p_s, p_d, 8))
    assert torch.allclose(make_objective(nets, use_uewf=False).pseudo_label(x_u), (p_s + p_d) / 2)
    assert torch.allclose(make_objective(nets, patch_size=8, patchify=False).pseudo_label(x_u), uewf(p_s, p_d, 8, patchify=False))
    no_static = DualTeacherObjective(DiceCELoss(sigmoid=True), None, nets["dynamic"], use_static_teacher=False)
    assert torch.allclose(no_static.pseudo_label(x_u), p_d)
    static_only = make_objective(nets, use_dynamic_teacher=False)
    assert torch.allclose(static_only.pseudo_label(x_u), p_s)
    with pytest.raises(ValueError, match="at least one teacher"):
        DualTeacherObjective(DiceCELoss(sigmoid=True), None, nets["dynamic"], use_static_teacher=False, use_dynamic_teacher=False)
    hard = make_objective(nets, hard_pseudo_labels=True).pseudo_label(x_u)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="static_teacher"):
        DualTeacherObjective(DiceCELoss(sigmoid=True), None, nets["dynamic"])

    with torch.no_grad():
        base = make_objective(nets, patch_size=8)(engine, *batch)
        assert "loss_con" not in make_objective(nets, use_aurcl=False)(engine, *batch)
        doubled = make_objective(nets, patch_size=8, lambda_u=2.0, lambda_c=1.0)(engine, *batch)
        assert doubled["loss_unsup"].item() == pytest.approx(2 * base["loss_unsup"].item(), rel=1e-5)
        assert doubled["loss_con"].item() == pytest.approx(2 * base["loss_con"].item(), rel=1e-5)
        target = make_objective(nets, patch_size=8).pseudo_label(x_u)
        assert base["loss_unsup"].item() == pytest.approx(SoftBCEDiceLoss()(_student_u(nets, batch), target).item(), rel=1e-5)
    with pytest.raises(TypeError, match="forward_features"):
        make_objective(nets)(SimpleNamespace(network=_NoFeatures()), *batch)
    make_objective(nets, use_aurcl=False)(SimpleNamespace(network=_NoFeatures()), *batch)


def test_objective_one_forward_per_half_when_joint_batch_is_off(nets, batch) -> None:
    """joint_batch=False: pred = S(x_l) alone; L_unsup and L_con from S(x_u) alone."""
    engine = SimpleNamespace(network=nets["student"].train())
    x_l, x_u = batch[0]["image"], batch[1]["image"]
    objective = make_objective(nets, patch_size=8, joint_batch=False)
    with torch.no_grad():
        out = objective(engine, *batch)
        alone_l = nets["student"](x_l)
        logits_u, features_u = nets["student"].forward_features(x_u)
        target = objective.pseudo_label(x_u)
        torch.testing.assert_close(out["pred"], alone_l)
        assert not torch.allclose(out["pred"], make_objective(nets, patch_size=8)(engine, *batch)["pred"])  # BN sees the halves apart
        assert out["loss_unsup"].item() == pytest.approx(SoftBCEDiceLoss()(logits_u, target).item(), rel=1e-5)
        expected_con = 0.5 * objective.contrastive(torch.sigmoid(logits_u.float()), features_u)
        assert out["loss_con"].item() == pytest.approx(expected_con.item(), rel=1e-5)


def _student_u(nets, batch) -> torch.Tensor:
    """The student's unlabelled logits from the joint batch (BatchNorm in train mode sees both halves)."""
    joint = torch.cat([batch[0]["image"], batch[1]["image"]])
    return nets["student"](joint)[batch[0]["image"].shape[0] :]


def test_objective_dynamic_threshold_switch(batch) -> None:
    student = tiny_unet(0)
    with torch.no_grad():
        student.head.weight.mul_(200.0)  # confident predictions: Quantile_0.2(c) > tau_min
    teachers = {"static": tiny_unet(1), "dynamic": tiny_unet(2)}
    engine = SimpleNamespace(network=student)
    with torch.no_grad():
        dyn = make_objective(teachers, patch_size=8)(engine, *batch)["loss_con"]
        fixed = make_objective(teachers, patch_size=8, dynamic_threshold=False)(engine, *batch)["loss_con"]
    assert torch.isfinite(dyn) and torch.isfinite(fixed) and not torch.isclose(dyn, fixed)


@pytest.mark.parametrize("amp", [False, True])
def test_objective_in_semi_supervised_trainer_with_ema(batch, amp: bool) -> None:
    from monai.data import DataLoader

    from monai_ssl.engines import SemiSupervisedTrainer
    from monai_ssl.handlers import EMATeacher

    student, static, dynamic = tiny_unet(0), tiny_unet(1), tiny_unet(2)
    labeled = [{"image": x, "label": y} for x, y in zip(batch[0]["image"], batch[0]["label"])]
    unlabeled = [{"image": x} for x in batch[1]["image"]]
    objective = DualTeacherObjective(DiceCELoss(sigmoid=True), static, dynamic, patch_size=8)
    trainer = SemiSupervisedTrainer(
        device="cpu", max_epochs=1, train_data_loader=DataLoader(labeled, batch_size=2), network=student,
        optimizer=torch.optim.Adam(student.parameters(), lr=1e-3), objective=objective,
        unlabeled_data_loader=DataLoader(unlabeled, batch_size=2), epoch_length=1, decollate=False, amp=amp,
        train_handlers=[EMATeacher(dynamic, student, decay=0.995)],
    )
    static_before = {k: v.clone() for k, v in static.state_dict().items()}
    ema_start = dynamic.head.weight.detach().clone()  # EMATeacher copied the student in
    assert torch.equal(ema_start, student.head.weight)
    trainer.run()
    out = trainer.state.output
    assert all(torch.isfinite(out[k]) for k in ("loss", "loss_sup", "loss_unsup", "loss_con"))
    assert all(torch.equal(v, static.state_dict()[k]) for k, v in static_before.items())  # static teacher frozen
    assert not torch.equal(dynamic.head.weight, ema_start)  # the EMA teacher followed the updated student


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_objective_under_ddp_matches_plain(nets, batch) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        student = tiny_unet(5)
        ddp = torch.nn.parallel.DistributedDataParallel(student)
        objective = make_objective(nets, patch_size=8)
        wrapped = objective(SimpleNamespace(network=ddp), *batch)
        sum(v for k, v in wrapped.items() if k.startswith("loss_")).backward()
        assert "forward" not in vars(student)  # the temporary routing is undone
        plain = objective(SimpleNamespace(network=tiny_unet(5)), *batch)
        for name in ("loss_sup", "loss_unsup", "loss_con"):
            assert wrapped[name].item() == pytest.approx(plain[name].item(), rel=1e-4), name
        assert student.head.weight.grad is not None
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- appearance proposer


def speckled_oval(seed: int = 0, size: int = 256, center=(140, 110), axes=(35, 55)) -> tuple[np.ndarray, tuple]:
    """A dark oval on a speckled background with a brightness gradient, and its true box."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    oval = ((yy - center[0]) / axes[0]) ** 2 + ((xx - center[1]) / axes[1]) ** 2 <= 1
    base = np.where(oval, 0.25, 0.6) + 0.1 * np.sin(xx / 20.0)
    img = np.clip(base * rng.rayleigh(1.0, (size, size)) / 1.25 * 255, 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(oval)
    return img, (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def test_box_iou_of_inclusive_pixel_boxes() -> None:
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)  # 10x10 boxes sharing 5 columns
    assert box_iou((0, 0, 9, 9), (10, 0, 19, 9)) == 0.0 and box_iou((2, 3, 4, 5), (2, 3, 4, 5)) == 1.0


def test_appearance_proposer_finds_dark_oval() -> None:
    img, truth = speckled_oval()
    props = propose(img, ["dark oval", "dark round", "dark lobulated"], top_k=3)
    assert 1 <= len(props) <= 3 and all(isinstance(p, BoxProposal) for p in props)
    assert props[0].prompt == "dark oval" and 0.0 < props[0].score <= 1.0
    assert box_iou(props[0].box, truth) > 0.5
    assert props == propose(img, ["dark oval", "dark round", "dark lobulated"], top_k=3)  # deterministic
    assert [p.score for p in props] == sorted((p.score for p in props), reverse=True)
    # the same oval, bright on dark, found by a "bright" prompt; Grounding-DINO style prompt strings work
    bright = AppearanceBoxProposer().propose(255 - img, ["bright oval . bright round ."], top_k=1)
    assert box_iou(bright[0].box, truth) > 0.5
    assert propose(np.full((64, 64), 7.0), top_k=2) == []


def test_prompt_parsing() -> None:
    assert parse_prompt("dark lobulated") == parse_prompt("Dark, LOBULATED mass")
    assert parse_prompt("round").brightness == "dark"
    assert parse_prompt("bright").shape is None
    with pytest.raises(ValueError, match="no brightness word"):
        parse_prompt("tumor")
    with pytest.raises(ValueError, match="conflicting"):
        parse_prompt("dark bright oval")


# ----------------------------------------------------------------------------- LiteMedSAM


def test_litemedsam_real_weights_segment_dark_ellipse() -> None:
    from monai_ssl.foundation.litemedsam import LiteMedSAMPredictor, load_litemedsam, packaged_checkpoint

    net = load_litemedsam()  # strict load of the shipped asset
    shipped = torch.load(packaged_checkpoint(), map_location="cpu", weights_only=True)
    state = net.state_dict()
    assert set(state) == set(shipped)
    assert all(torch.equal(state[k], shipped[k]) for k in state)
    assert "timm.models.layers" not in sys.modules or hasattr(sys.modules["timm.models.layers"], "__file__")  # shim removed

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :256]
    ellipse = ((yy - 120) / 40.0) ** 2 + ((xx - 140) / 60.0) ** 2 <= 1
    img = np.where(ellipse, 0.2, 0.6) + 0.1 * rng.standard_normal((256, 256))
    img = np.clip(img * 255, 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(ellipse)
    box = [xs.min(), ys.min(), xs.max(), ys.max()]
    result = LiteMedSAMPredictor(net).segment(img, [box])
    assert result.masks.shape == (1, 256, 256) and result.masks.dtype == bool and result.iou.shape == (1,)
    mask = result.masks[0]
    dice = 2 * (mask & ellipse).sum() / (mask.sum() + ellipse.sum())
    assert dice > 0.7, dice
    assert 0.0 < result.iou[0] <= 1.5
