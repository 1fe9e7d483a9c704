"""SemiSupervisedTrainer, EMA / frozen teachers, ramps and resumable checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines.utils import IterationEvents
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.utils import set_determinism

from conftest import blob_batch
from monai_ssl.engines import SKIPPED_STEPS_WARNING, SemiSupervisedTrainer
from monai_ssl.handlers import BestModelSaver, EMATeacher, RampUp, ResumeCheckpoint, freeze, sigmoid_rampup
from monai_ssl.methods import MeanTeacherObjective, SupervisedObjective


def tiny_net() -> torch.nn.Module:
    return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm="batch")


def make_trainer(max_epochs: int, mean_teacher: bool = True, unlabeled: bool = True, handlers=()) -> tuple:
    net, teacher = tiny_net(), tiny_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss = DiceCELoss(sigmoid=True)
    labeled = DataLoader(blob_batch(4, seed=1), batch_size=2, shuffle=True)
    unlab = DataLoader([{"image": c["image"]} for c in blob_batch(6, seed=2)], batch_size=2, shuffle=True) if unlabeled else None
    objective = MeanTeacherObjective(loss, teacher, consistency_weight=RampUp(0.1, 10)) if mean_teacher else SupervisedObjective(loss)
    ema = EMATeacher(teacher, net, decay=0.99)
    trainer = SemiSupervisedTrainer(
        device="cpu", max_epochs=max_epochs, train_data_loader=labeled, network=net, optimizer=opt,
        objective=objective, unlabeled_data_loader=unlab, epoch_length=3, decollate=False,
        train_handlers=[ema, *handlers],
    )
    return trainer, net, teacher, opt


def test_sigmoid_rampup_values() -> None:
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5.0))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-5.0 * 0.25))
    assert sigmoid_rampup(10, 10) == 1.0 and sigmoid_rampup(50, 10) == 1.0
    assert RampUp(0.1, 0)(3) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="ramp kind"):
        RampUp(1.0, 10, kind="cosine")


def test_ema_update_matches_formula_and_moves_toward_student() -> None:
    student, teacher = tiny_net(), tiny_net()
    ema = EMATeacher(teacher, student, decay=0.9, warmup=False)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        next(m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_mean.add_(2.0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema.update(step=100)
    for name, s_val in student.state_dict().items():
        t_before, t_after = before[name], teacher.state_dict()[name]
        if s_val.is_floating_point():
            torch.testing.assert_close(t_after, 0.9 * t_before + 0.1 * s_val)
            assert (t_after - s_val).abs().sum() <= (t_before - s_val).abs().sum()
        else:
            assert torch.equal(t_after, s_val)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_ema_alpha_with_and_without_warmup() -> None:
    """alpha(t) = min(1 - 1/(t+1), decay) with the warm-up, the constant decay without it."""
    fixed = EMATeacher(tiny_net(), tiny_net(), decay=0.9, warmup=False)
    assert [fixed.alpha(t) for t in (1, 5, 1000)] == pytest.approx([0.9, 0.9, 0.9])
    warm = EMATeacher(tiny_net(), tiny_net(), decay=0.99)
    assert [warm.alpha(t) for t in (1, 3, 99, 1000)] == pytest.approx([0.5, 0.75, 0.99, 0.99])


def test_ema_update_uses_the_student_after_each_optimiser_step() -> None:
    """In a real trainer, after iteration t the teacher is ``alpha(t) teacher_{t-1} + (1 - alpha(t))
    student_t`` with ``student_t`` the weights *after* that step's optimiser update; an EMA fired
    before the step would average in the previous weights."""
    trainer, net, teacher, _ = make_trainer(max_epochs=1)
    (ema,) = {h for handlers in trainer._event_handlers.values() for h, *_ in handlers if isinstance(h, EMATeacher)}
    checked = []

    def before(engine) -> None:
        engine.state.teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
        engine.state.student_before = {k: v.clone() for k, v in net.state_dict().items()}

    def after(engine) -> None:
        alpha = ema.alpha(engine.state.iteration)
        for name, s_after in net.state_dict().items():
            if not s_after.is_floating_point():
                continue
            expected = alpha * engine.state.teacher_before[name] + (1 - alpha) * s_after
            torch.testing.assert_close(teacher.state_dict()[name], expected, msg=f"{name}, iteration {engine.state.iteration}")
        assert any(not torch.equal(engine.state.student_before[k], v) for k, v in net.state_dict().items())
        checked.append(engine.state.iteration)

    trainer.add_event_handler(Events.ITERATION_STARTED, before)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, after)
    trainer.run()
    assert checked == [1, 2, 3]


@pytest.mark.parametrize("joint_batch", [True, False])
def test_mean_teacher_joint_batch_decides_whose_batch_statistics_normalise_the_labelled_half(joint_batch: bool) -> None:
    """joint_batch=True: one student forward over cat([x_l, x_u]) (BatchNorm statistics shared, as the
    reference code); False: the labelled prediction is the student's on x_l alone."""

    class Engine:
        def __init__(self, network: torch.nn.Module) -> None:
            self.network = network
            self.state = type("State", (), {"iteration": 1})()

    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2)).train()
    teacher = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2)).eval()
    x_l, x_u = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4) * 5.0 + 3.0  # very different statistics
    objective = MeanTeacherObjective(lambda p, y: p.mean(), teacher, consistency_weight=0.1, noise_std=0.0, joint_batch=joint_batch)
    out = objective(Engine(student), {"image": x_l, "label": torch.zeros(2, 1, 4, 4)}, {"image": x_u})
    alone = student(x_l)
    joint = student(torch.cat([x_l, x_u]))[:2]
    expected, other = (joint, alone) if joint_batch else (alone, joint)
    torch.testing.assert_close(out["pred"], expected)
    assert not torch.allclose(out["pred"], other, atol=1e-3)
    target = torch.sigmoid(teacher(x_u))
    student_u = student(torch.cat([x_l, x_u]))[2:] if joint_batch else student(x_u)
    torch.testing.assert_close(out["loss_cons"], 0.1 * torch.mean((torch.sigmoid(student_u) - target) ** 2))


def test_trainer_fires_all_events_and_reports_terms() -> None:
    trainer, net, teacher, _ = make_trainer(max_epochs=1)
    fired: list[str] = []
    for ev in IterationEvents:
        trainer.add_event_handler(ev, lambda e, ev=ev: fired.append(ev.name))
    trainer.run()
    assert trainer.state.iteration == 3
    assert fired[:4] == ["FORWARD_COMPLETED", "LOSS_COMPLETED", "BACKWARD_COMPLETED", "MODEL_COMPLETED"]
    out = trainer.state.output
    assert {"loss", "loss_sup", "loss_cons", "pred"} <= set(out)
    torch.testing.assert_close(out["loss"], out["loss_sup"] + out["loss_cons"])


def test_ema_teacher_follows_the_student() -> None:
    trainer, net, teacher, _ = make_trainer(max_epochs=1)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.run()
    moved = any(not torch.equal(t0[k], v) for k, v in teacher.state_dict().items())
    assert moved, "EMA teacher did not move"
    assert all(p.grad is None for p in teacher.parameters())


def test_frozen_teacher_used_in_training_does_not_move() -> None:
    """A static (frozen) teacher that the objective calls every step: its weights and BatchNorm
    statistics stay as they were, it gets no gradient, and the student still trains."""
    set_determinism(0)
    net, frozen = tiny_net(), freeze(tiny_net())
    calls = []
    frozen.register_forward_hook(lambda *_: calls.append(1))
    trainer = SemiSupervisedTrainer(
        device="cpu", max_epochs=1, train_data_loader=DataLoader(blob_batch(4, seed=1), batch_size=2),
        network=net, optimizer=torch.optim.Adam(net.parameters(), lr=1e-3),
        objective=MeanTeacherObjective(DiceCELoss(sigmoid=True), frozen, consistency_weight=1.0),
        unlabeled_data_loader=DataLoader([{"image": c["image"]} for c in blob_batch(4, seed=2)], batch_size=2),
        epoch_length=2, decollate=False,
    )
    frozen_before = {k: v.clone() for k, v in frozen.state_dict().items()}
    student_before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer.run()
    assert len(calls) == 2, "the frozen teacher was not used by the objective"
    for k, v in frozen.state_dict().items():
        assert torch.equal(frozen_before[k], v), f"frozen teacher moved: {k}"
    assert all(p.grad is None for p in frozen.parameters())
    assert any(not torch.equal(student_before[k], v) for k, v in net.state_dict().items())


def test_no_unlabeled_data_warns_and_trains_supervised() -> None:
    with pytest.warns(UserWarning, match="supervised only"):
        trainer, *_ = make_trainer(max_epochs=1, unlabeled=False)
    trainer.run()
    assert "loss_cons" not in trainer.state.output and "loss_sup" in trainer.state.output


def test_consecutive_grad_scaler_skips_are_counted_and_warned(caplog) -> None:
    """The CUDA float16 scaler shrinks its scale on every skipped step; a run of skips is reported."""
    trainer, *_ = make_trainer(max_epochs=1)
    scale = 65536.0
    with caplog.at_level("WARNING"):
        for _ in range(SKIPPED_STEPS_WARNING - 1):
            trainer.track_skipped_steps(scale, scale / 2)
            scale /= 2
        assert trainer.skipped_steps == SKIPPED_STEPS_WARNING - 1 and "skipped" not in caplog.text
        trainer.track_skipped_steps(scale, scale / 2)
    assert f"{SKIPPED_STEPS_WARNING} consecutive optimiser steps skipped" in caplog.text
    trainer.track_skipped_steps(1.0, 1.0)  # a step taken (scale kept or grown) resets the count
    assert trainer.skipped_steps == 0


def test_unlabeled_loader_is_cycled_within_an_epoch() -> None:
    trainer, *_ = make_trainer(max_epochs=2)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e._unlabeled_cycle))
    trainer.run()
    # 6 unlabelled images / batch 2 = 3 batches per pass, epoch_length 3: no restart mid-epoch
    assert trainer.state.iteration == 6 and max(seen) == 0


def test_supervised_training_lowers_loss() -> None:
    set_determinism(0)
    trainer, *_ = make_trainer(max_epochs=15, mean_teacher=False)
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    trainer.run()
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3])


def _state_after(tmp_path, epochs_first: int | None, total: int) -> dict[str, torch.Tensor]:
    """Train ``total`` epochs, optionally stopping after ``epochs_first`` and resuming in a new trainer."""
    ckpt_dir = tmp_path / "ckpt"
    runs = [epochs_first, total] if epochs_first else [total]
    for max_epochs in runs:
        set_determinism(0)
        trainer, net, teacher, opt = make_trainer(max_epochs=max_epochs)
        ResumeCheckpoint(ckpt_dir, {"network": net, "teacher": teacher, "optimizer": opt, "trainer": trainer}).attach(trainer)
        trainer.run()
    assert trainer.state.epoch == total
    return {**{f"s.{k}": v for k, v in net.state_dict().items()}, **{f"t.{k}": v for k, v in teacher.state_dict().items()}}


def test_resume_gives_the_same_state_as_an_uninterrupted_run(tmp_path) -> None:
    straight = _state_after(tmp_path / "a", None, 3)
    resumed = _state_after(tmp_path / "b", 1, 3)
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], msg=f"{k} differs after resume")


def test_best_model_saver_keeps_best_and_writes_bare_state_dict(tmp_path) -> None:
    net = tiny_net()
    saver = BestModelSaver(net, tmp_path / "model.pt", metric_name="dice")

    class _State:
        def __init__(self, v):
            self.metrics, self.epoch = {"dice": v}, 1

    class _Eval:
        def __init__(self, v):
            self.state = _State(v)

    saver(_Eval(0.5))
    first = (tmp_path / "model.pt").stat().st_mtime_ns
    saver(_Eval(0.4))
    assert (tmp_path / "model.pt").stat().st_mtime_ns == first and saver.best == 0.5
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    tiny_net().load_state_dict(state, strict=True)
    with pytest.raises(KeyError, match="not in"):
        BestModelSaver(net, tmp_path / "m.pt", metric_name="nope")(_Eval(0.1))
