"""Wiring faults that the loss-term unit tests cannot see (issue 10, section 7).

Each test checks where a term's input comes from and where its gradient goes, on tiny tensors:
the dual-network 3D objective's routing (which subnet, which half of the batch, which direction),
the dual-teacher objective's AURCL gradient path and the bundle's weight initialisation, and the
bundle configs' defaults pinned against the methods spec.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.losses import DiceCELoss
from torch import nn

from bundle_utils import REPO_ROOT, make_workflow, tiny_overrides
from monai_ssl.losses.dual_3d import (
    CODE_ENTROPY_PERCENTILE,
    PAPER_ENTROPY_PERCENTILE,
    contrastive_weight,
    cross_pseudo_supervision_loss,
    uncertainty_rectified_loss,
)
from monai_ssl.methods import DualNetwork3DObjective
from monai_ssl.handlers.teachers import freeze
from monai_ssl.methods.dual_teacher import DualTeacherObjective
from monai_ssl.networks.dual_3d import DualTrainForward

# ----------------------------------------------------------------------------- dual_network_3d routing

N_L = 2  # labelled volumes first in the joint batch, then N_L unlabelled ones
SHAPE = (2 * N_L, 2, 6, 6, 6)


class _LeafDualForward(DualTrainForward):
    """A "network" whose training forward returns fixed leaf tensors ``(z_A, x9_A, z_B, x9_B)``,
    so each loss term's gradient can be read off per subnet and per half of the batch."""

    def __init__(self, outputs: tuple[torch.Tensor, ...]) -> None:
        nn.Module.__init__(self)
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        assert x.shape[0] == self.outputs[0].shape[0], "the objective must feed the joint batch [x_l; x_u]"
        return self.outputs


def _dual_case(winner: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Leaf outputs and a label for which ``winner`` (``"vnet"`` or ``"resnet"``) has the clearly lower
    supervised Dice loss on the labelled half; the unlabelled half is random (with uncertain voxels)."""
    g = torch.Generator().manual_seed(seed)
    label = (torch.rand(N_L, 1, *SHAPE[2:], generator=g) > 0.6).float()
    good = torch.cat([-4.0 * (2 * label - 1), 4.0 * (2 * label - 1)], dim=1)  # confident and right
    leaves = {}
    for name in ("z_a", "z_b"):
        z = torch.randn(SHAPE, generator=g)
        if (name == "z_b") == (winner == "vnet"):
            z[:N_L] = good
        leaves[name] = z.requires_grad_()
    for name in ("f_a", "f_b"):
        leaves[name] = torch.randn(SHAPE[0], 3, *SHAPE[2:], generator=g).requires_grad_()
    return leaves, {"label": label}


def _run_objective(leaves: dict[str, torch.Tensor], label: torch.Tensor, **kwargs: Any) -> dict[str, torch.Tensor]:
    engine = SimpleNamespace(
        network=_LeafDualForward((leaves["z_a"], leaves["f_a"], leaves["z_b"], leaves["f_b"])),
        state=SimpleNamespace(iteration=1),
    )
    x = torch.zeros(N_L, 1, *SHAPE[2:])
    settings = {"pgl_weight": 1.0, "pgl_sample_fraction": 1.0, **kwargs}
    return DualNetwork3DObjective(**settings)(engine, {"image": x, "label": label}, {"image": x.clone()})


def _grads(term: torch.Tensor, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """d term / d leaf for every leaf (zeros where the term does not depend on it)."""
    names = list(leaves)
    grads = torch.autograd.grad(term, [leaves[n] for n in names], retain_graph=True, allow_unused=True)
    return {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)}


def _reaches(grad: torch.Tensor) -> tuple[bool, bool]:
    """Whether a gradient is non-zero on (the labelled half, the unlabelled half)."""
    return bool(grad[:N_L].abs().sum() > 0), bool(grad[N_L:].abs().sum() > 0)


@pytest.mark.parametrize("winner, learner", [("vnet", "f_a"), ("resnet", "f_b")])
def test_pgl_goes_to_the_loser_subnet_and_only_to_its_unlabelled_features(winner: str, learner: str) -> None:
    """The code's routing: the subnet with the *higher* supervised Dice loss learns from PGL, on its
    own x9 features of the unlabelled half; nothing reaches the winner or any logits."""
    leaves, batch = _dual_case(winner)
    out = _run_objective(leaves, batch["label"])
    assert out["loss_pgl"] > 0
    grads = _grads(out["loss_pgl"], leaves)
    other = "f_b" if learner == "f_a" else "f_a"
    assert _reaches(grads[learner]) == (False, True), f"PGL must train {learner} on the unlabelled half only"
    assert _reaches(grads[other]) == (False, False), f"PGL reached the winner's features {other}"
    assert all(grads[z].abs().sum() == 0 for z in ("z_a", "z_b"))


def test_pgl_both_routing_trains_both_subnets_unlabelled_features() -> None:
    leaves, batch = _dual_case("vnet")
    grads = _grads(_run_objective(leaves, batch["label"], pgl_routing="both")["loss_pgl"], leaves)
    assert _reaches(grads["f_a"]) == _reaches(grads["f_b"]) == (False, True)


@pytest.mark.parametrize("code_faithful", [False, True])
def test_ue_is_one_way_vnet_teaching_resnet_on_the_whole_batch_by_default(code_faithful: bool) -> None:
    """Methods spec 4.2: ``L_ue`` trains subnet A (ResNet) only, on labelled and unlabelled voxels, with
    the V-Net's untempered softmax in the KL; the same in both modes."""
    leaves, batch = _dual_case("vnet")
    out = _run_objective(leaves, batch["label"], code_faithful=code_faithful)
    grads = _grads(out["loss_kl"], leaves)
    assert _reaches(grads["z_a"]) == (True, True), "UE must train the ResNet on the whole batch"
    assert _reaches(grads["z_b"]) == (False, False), "UE must not train the V-Net (one-way, B -> A)"
    expected = uncertainty_rectified_loss(leaves["z_a"], leaves["z_b"], temperature=0.5)
    torch.testing.assert_close(out["loss_kl"], expected)
    sharpened = uncertainty_rectified_loss(leaves["z_a"], leaves["z_b"], temperature=0.5, sharpened_kl=True)
    assert not torch.isclose(out["loss_kl"], sharpened), "the default KL must not use the sharpened teacher"


def test_ue_switches_give_the_two_way_and_sharpened_readings() -> None:
    leaves, batch = _dual_case("vnet")
    z_a, z_b = leaves["z_a"], leaves["z_b"]
    two_way = _run_objective(leaves, batch["label"], kl_bidirectional=True)
    grads = _grads(two_way["loss_kl"], leaves)
    assert _reaches(grads["z_a"]) == _reaches(grads["z_b"]) == (True, True)
    torch.testing.assert_close(
        two_way["loss_kl"], uncertainty_rectified_loss(z_a, z_b, 0.5) + uncertainty_rectified_loss(z_b, z_a, 0.5)
    )
    sharp = _run_objective(leaves, batch["label"], kl_sharpened=True, temperature=0.25)
    torch.testing.assert_close(sharp["loss_kl"], uncertainty_rectified_loss(z_a, z_b, 0.25, sharpened_kl=True))
    old = _run_objective(leaves, batch["label"], kl_bidirectional=True, kl_sharpened=True)
    torch.testing.assert_close(
        old["loss_kl"],
        uncertainty_rectified_loss(z_a, z_b, 0.5, sharpened_kl=True) + uncertainty_rectified_loss(z_b, z_a, 0.5, sharpened_kl=True),
    )


def test_cps_and_efs_use_the_unlabelled_half_of_both_subnets() -> None:
    leaves, batch = _dual_case("vnet")
    out = _run_objective(leaves, batch["label"])
    for term in ("loss_cps", "loss_efs"):
        grads = _grads(out[term], leaves)
        for z in ("z_a", "z_b"):
            assert _reaches(grads[z]) == (False, True), f"{term} must train {z} on the unlabelled half only"
        assert all(grads[f].abs().sum() == 0 for f in ("f_a", "f_b")), term
    expected = cross_pseudo_supervision_loss(leaves["z_a"][N_L:], leaves["z_b"][N_L:], 0.6)
    torch.testing.assert_close(out["loss_cps"], expected)


def test_supervised_and_cr_terms_use_the_labelled_half_only() -> None:
    leaves, batch = _dual_case("resnet")
    out = _run_objective(leaves, batch["label"])
    for term, trained in (("loss_sup_resnet", ("z_a",)), ("loss_sup_vnet", ("z_b",)), ("loss_cr", ("z_a", "z_b"))):
        grads = _grads(out[term], leaves)
        for z in ("z_a", "z_b"):
            assert _reaches(grads[z]) == ((True, False) if z in trained else (False, False)), f"{term} -> {z}"


# ----------------------------------------------------------------------------- dual_teacher AURCL gradient path


class _LeafStudent(nn.Module):
    """A student whose ``forward_features`` returns fixed leaf ``(logits, features)`` for the joint batch."""

    def __init__(self, logits: torch.Tensor, features: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.features = logits, features

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.shape[0] == self.logits.shape[0]
        return self.logits, self.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


class _ConstantTeacher(nn.Module):
    def __init__(self, prob: float) -> None:
        super().__init__()
        self.logit = math.log(prob / (1 - prob))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, self.logit)


def test_aurcl_gets_gradient_through_the_students_probabilities_and_features() -> None:
    """``loss_con`` = lambda_c * AURCL(sigmoid(logits_u), F_u) with gradient into both, from the
    unlabelled half only; detaching either in the objective fails here."""
    g = torch.Generator().manual_seed(0)
    logits = (3.0 * torch.randn(4, 1, 16, 16, generator=g)).requires_grad_()
    features = torch.randn(4, 3, 16, 16, generator=g).requires_grad_()
    objective = DualTeacherObjective(
        DiceCELoss(sigmoid=True), _ConstantTeacher(0.7), _ConstantTeacher(0.4), patch_size=8, lambda_c=0.5
    )
    x = torch.zeros(2, 1, 16, 16)
    labeled = {"image": x, "label": (torch.rand(2, 1, 16, 16, generator=g) > 0.5).float()}
    out = objective(SimpleNamespace(network=_LeafStudent(logits, features)), labeled, {"image": x.clone()})
    d_logits, d_features = (
        torch.zeros_like(t) if g is None else g
        for t, g in zip((logits, features), torch.autograd.grad(out["loss_con"], [logits, features], allow_unused=True))
    )
    assert _reaches(d_logits) == (False, True), "AURCL must back-propagate into the unlabelled probabilities"
    assert _reaches(d_features) == (False, True), "AURCL must back-propagate into the unlabelled features"
    expected = 0.5 * objective.contrastive(torch.sigmoid(logits[2:]), features[2:])
    torch.testing.assert_close(out["loss_con"], expected)


class _FakeWarmup:
    """Stands in for the bundle's ``stwp`` stage (APPG + warm-up): ``run`` gives the static teacher
    seeded weights unlike any fresh network's and freezes it, as the real stage returns it."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def run(self) -> nn.Module:
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for value in self.network.state_dict().values():
                if value.is_floating_point():
                    value.copy_(0.05 * torch.randn(value.shape, generator=g))
        return freeze(self.network)

    def state_dict(self) -> dict[str, str]:
        return {"config_hash": "fake"}

    def load_state_dict(self, state: dict[str, str]) -> None:
        pass


def test_dual_teacher_bundle_starts_student_and_ema_teacher_from_the_static_teacher(tmp_path: Path) -> None:
    """Spec 1.1: S is initialised from T_s, and T_d from S. Checked on the bundle's own ``run``
    steps, at the trainer's first iteration (before any optimiser step)."""
    stwp = {"_target_": _FakeWarmup, "network": "@static_teacher"}
    wf = make_workflow("dual_teacher", ["train.json"], **tiny_overrides(tmp_path, epoch_length=1, stwp=stwp))
    wf.initialize()
    seen: dict[str, dict[str, torch.Tensor]] = {}

    def capture(engine) -> None:
        if engine.state.iteration == 1:
            for name in ("network", "teacher", "static_teacher"):
                net = wf.parser.get_parsed_content(name)
                seen[name] = {k: v.detach().clone() for k, v in net.state_dict().items()}

    wf.parser.get_parsed_content("train#trainer").add_event_handler(Events.ITERATION_STARTED, capture)
    wf.run()
    static = seen["static_teacher"]
    g = torch.Generator().manual_seed(123)
    first = next(k for k, v in static.items() if v.is_floating_point())
    assert torch.equal(static[first], 0.05 * torch.randn(static[first].shape, generator=g)), "the stage did not run"
    for name in ("network", "teacher"):
        for key in static:
            assert torch.equal(seen[name][key], static[key]), f"{name}.{key} does not start from the static teacher"


# ----------------------------------------------------------------------------- bundle defaults vs the methods spec
#
# The numbers below are the constants of /work/shared/docs/methods_spec.md (sections named per line),
# hard-coded on purpose: this is the pin. The values they are compared with are read from the bundle
# configs through monai.bundle.ConfigParser, as a run resolves them (the components are instantiated
# where that is cheap, with tiny stand-in networks), so a default changed in a config, or an id no
# longer passed to its component, fails here.


def _bundle_parser(bundle: str, **stand_ins: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundles" / bundle / "configs" / "train.json"))
    for name, expression in stand_ins.items():
        parser[name] = expression
    return parser


def _handler(parser: ConfigParser, target_suffix: str) -> Any:
    handlers = parser["train"]["handlers"]
    index = next(i for i, h in enumerate(handlers) if str(h.get("_target_", "")).endswith(target_suffix))
    return parser.get_parsed_content(f"train#handlers#{index}")


def test_dual_teacher_bundle_defaults_are_the_methods_spec_constants() -> None:
    tiny = "$torch.nn.Conv2d(1, 1, 1)"
    parser = _bundle_parser("dual_teacher", network=tiny, teacher=tiny, static_teacher=tiny)
    get = parser.get_parsed_content
    objective = get("objective")
    # spec 1.4, Eq.1: lambda_u = 1, lambda_c = 0.5, constant
    assert (objective.lambda_u, objective.lambda_c) == (1.0, 0.5)
    # spec 1.4, UEWF: patch P = 16, patchified; soft targets; both teachers; AURCL on
    assert (objective.patch_size, objective.patchify, objective.use_uewf) == (16, True, True)
    assert (objective.hard_pseudo_labels, objective.use_static_teacher, objective.use_dynamic_teacher) == (False, True, True)
    # spec 1.4, AURCL Eq.11-15: r = 0.20, tau_min = 0.7, dynamic threshold, tau = 0.1, P = 16
    aurcl = objective.contrastive
    assert objective.use_aurcl and aurcl.dynamic_threshold
    assert (aurcl.ratio, aurcl.tau_min, aurcl.temperature, aurcl.patch_size) == (0.2, 0.7, 0.1, 16)
    # spec 1.4, EMA: theta_d <- alpha theta_d + (1 - alpha) theta_S every iteration, alpha = 0.995
    ema = _handler(parser, "EMATeacher")
    assert [ema.alpha(t) for t in (1, 10, 1000)] == pytest.approx([0.995] * 3)
    # spec 1.4, optimisation: Adam (default betas), lr 1e-4; ReduceLROnPlateau on validation Dice, factor 0.5, patience 10
    optimizer = get("optimizer")
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["lr"] == 1e-4 and optimizer.defaults["betas"] == (0.9, 0.999)
    scheduler = get("lr_scheduler")
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert (scheduler.mode, scheduler.factor, scheduler.patience) == ("max", 0.5, 10)
    # spec 1.4: 100 epochs, 4 labelled + 4 unlabelled, no augmentation; spec 1.1: 224 x 224 input
    assert get("train#trainer#max_epochs") == 100
    assert (get("train#dataloader#batch_size"), get("train#unlabeled_dataloader#batch_size")) == (4, 4)
    assert get("train#preprocessing#augment") is False and get("train#unlabeled_preprocessing#augment") is False
    assert get("train#preprocessing#spatial_size") == 224
    # spec 1.2: the three appearance prompts; spec 1.3: delta = 0.01, STWP as stage 3 (Adam 1e-4, 100 epochs)
    # (null = the calibration's prompts, else the paper's three; with no calibration, the paper's)
    from monai_ssl.pseudo.calibration import calibrated_prompts

    assert get("appg#prompts") is None
    assert calibrated_prompts(get("appg#prompts"), None) == ["dark oval", "dark round", "dark lobulated"]
    assert get("appg#min_foreground") == 0.01
    assert (get("stwp#learning_rate"), get("stwp#max_epochs")) == (1e-4, 100)


def test_dual_network_3d_bundle_defaults_are_the_methods_spec_constants() -> None:
    from monai_ssl.losses.dual_3d import entropy_filter

    parser = _bundle_parser("dual_network_3d", network="$monai_ssl.networks.DualNetwork3D(n_filters=2, resnet_layers=(1, 1, 1, 1))")
    get = parser.get_parsed_content
    objective = get("objective")
    assert objective.code_faithful is False  # the paper's losses are the default
    # spec 4.2, Eq.2 / Eq.4-6: beta = 0.5 (LA), T = 0.6, XOR mask
    assert (objective.beta, objective.threshold, objective.cr_mask) == (0.5, 0.6, "xor")
    # spec 4.2, CCE: thresholded CPS on; EFS alpha = 70 % (LA, Table 7): of 100 voxels whose entropies
    # are distinct, the ones at or above the 70th percentile (30 of them) are ignored
    assert objective.use_cps is True
    assert PAPER_ENTROPY_PERCENTILE == {"LA": 70.0, "Pancreas": 80.0, "BraTS": 30.0} and CODE_ENTROPY_PERCENTILE == 20.0
    fg = torch.linspace(0.01, 0.49, 100).reshape(1, 1, 100, 1, 1)
    prob = torch.cat([1 - fg, fg], dim=1)
    assert int(entropy_filter(prob, prob, objective.entropy_percentile, objective.code_faithful).ignore.sum()) == 30
    # spec 4.2, UE: T = 0.5, V-Net -> ResNet only, untempered teacher softmax in the KL
    assert objective.temperature == 0.5 and objective.kl_bidirectional is False and objective.kl_sharpened is False
    # spec 4.2, PGL: A/B agreement (paper), third term kept, loser routing, 1 % sampled,
    # lambda_c(t) = 0.1 exp(-5 (1 - min(t // 150, 40) / 40)^2)
    assert objective.pgl_agreement in (None, True) and objective.pgl_third_term is True
    assert (objective.pgl_routing, objective.pgl_sample_fraction) == ("loser", 0.01)
    for t in (0, 149, 150, 3000, 5999, 6000, 9000):
        expected = 0.1 * math.exp(-5 * (1 - min(t // 150, 40) / 40) ** 2)
        assert objective.pgl_weight(t) == pytest.approx(expected, rel=1e-12), t
    # spec 4.3: SGD lr 0.01, momentum 0.9, weight decay 1e-4 for both subnets; x0.1 every 2500 iterations; 6000 iterations
    for opt_id, sched_id in (("optimizer", "lr_scheduler"), ("optimizer_vnet", "lr_scheduler_vnet")):
        optimizer = get(opt_id)
        assert isinstance(optimizer, torch.optim.SGD), opt_id
        assert (optimizer.defaults["lr"], optimizer.defaults["momentum"], optimizer.defaults["weight_decay"]) == (0.01, 0.9, 1e-4)
        scheduler = get(sched_id)
        assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and (scheduler.step_size, scheduler.gamma) == (2500, 0.1)
    assert get("train#trainer#max_epochs") * get("train#trainer#epoch_length") == 6000
    # spec 4.3: batch 2 labelled + 2 unlabelled, seed 1337, LA crop 112 x 112 x 80
    assert (get("train#dataloader#batch_size"), get("train#unlabeled_dataloader#batch_size")) == (2, 2)
    assert get("seed") == 1337 and list(get("train#preprocessing#crop_size")) == [112, 112, 80]
    # spec 4.3, inference: LA window 112 x 112 x 80, stride 18 x 18 x 4
    inferer = get("validate#inferer")
    assert tuple(inferer.roi_size) == (112, 112, 80)
    assert tuple(int(r * (1 - o)) for r, o in zip(inferer.roi_size, inferer.overlap)) == (18, 18, 4)
    # spec 4.1: V-Net n_filters 16, ResNet-34 blocks 3-4-6-3, Dropout3d 0.5
    net_def = parser["network_def"]
    assert (get("network_def#n_filters"), list(get("network_def#resnet_layers")), get("network_def#dropout")) == (16, [3, 4, 6, 3], 0.5)
    assert net_def["_target_"].endswith("DualNetwork3D")
