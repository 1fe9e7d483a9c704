"""Reproducible across restarts: a ``dual_teacher`` run killed with SIGKILL in each of its three
stages (APPG, the static-teacher warm-up, the dual-teacher trainer) and restarted until it
completes ends with exactly the networks of a run that was never interrupted; and the pieces
that make it so (per-stage seeding, random transforms re-seeded from the checkpointed random
state at every epoch, one memory layout for a trained or loaded static teacher)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events

from monai.data import DataLoader, Dataset
from monai.losses import DiceLoss
from monai.transforms import RandGaussianNoised
from torch import nn

from bundle_utils import REPO_ROOT, config_path, tiny_overrides
from monai_ssl.engines import SemiSupervisedTrainer, StaticTeacherWarmup, seed_stage, stage_seed
from monai_ssl.handlers import ResumeCheckpoint
from monai_ssl.methods.supervised import SupervisedObjective
from monai_ssl.pseudo.appg import valid_pseudo_datalist

N_UNLABELED = 8  # unlabelled images of tiny_dataset_dir()
EPOCHS, EPOCH_LENGTH = 3, 2  # of the warm-up and of stage 3 alike
TIMEOUT = 600.0


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_seed_stage_draws_depend_on_seed_and_name_only() -> None:
    seed_stage(3, "stwp")
    first = _draws()
    _draws(), torch.randn(100)  # what another stage (or nothing) drew before
    assert seed_stage(3, "stwp") == stage_seed(3, "stwp") < 2**32
    again = _draws()
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])
    for other in (seed_stage(3, "train"), seed_stage(4, "stwp")):
        assert other != stage_seed(3, "stwp")
    assert stage_seed(np.int64(3), "stwp") == stage_seed(3, "stwp")
    with pytest.raises(ValueError, match="seed must be an int.*'stwp'"):
        stage_seed("3", "stwp")
    with pytest.raises(ValueError, match="seed must be an int"):
        stage_seed(True, "stwp")


def _augmented_trainer(max_epochs: int, save_dir: Path, seen: list[torch.Tensor]) -> SemiSupervisedTrainer:
    """A tiny trainer whose loader (no worker processes) adds random noise; ``seen`` gets each batch."""
    seed_stage(0, "train")
    data = [{"image": torch.full((1, 8, 8), float(i)), "label": torch.ones(1, 8, 8)} for i in range(4)]
    loader = DataLoader(Dataset(data, RandGaussianNoised(keys="image", prob=1.0)), batch_size=2, shuffle=True, num_workers=0)
    network = nn.Conv2d(1, 1, 3, padding=1)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    trainer = SemiSupervisedTrainer(device="cpu", max_epochs=max_epochs, train_data_loader=loader, network=network,
                                    optimizer=optimizer, objective=SupervisedObjective(DiceLoss(sigmoid=True)), decollate=False)
    ResumeCheckpoint(save_dir, {"network": network, "optimizer": optimizer, "trainer": trainer}).attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: seen.append(engine.state.output["image"].clone()))
    return trainer


def test_a_resumed_epoch_draws_the_uninterrupted_augmentations(tmp_path: Path) -> None:
    uninterrupted: list[torch.Tensor] = []
    _augmented_trainer(2, tmp_path / "a", uninterrupted).run()
    first_epoch: list[torch.Tensor] = []
    _augmented_trainer(1, tmp_path / "b", first_epoch).run()  # the run "killed" after its first epoch
    resumed: list[torch.Tensor] = []
    _augmented_trainer(2, tmp_path / "b", resumed).run()  # a new process: loaders and transforms made afresh
    assert len(uninterrupted) == 4 and len(first_epoch) == 2 and len(resumed) == 2
    for a, b in zip(uninterrupted, first_epoch + resumed):
        assert torch.equal(a, b), "a resumed epoch saw other augmented batches than the uninterrupted run"


class _OneImageAPPG:
    """A test double for APPGStage: a complete manifest with one valid pseudo-label."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def image_count(self) -> int:
        """One unlabelled image (the warm-up skips APPG when there are none)."""
        return 1

    def run(self) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        manifest = {"complete": True, "config_hash": "fixed",
                    "images": [{"case_id": "a", "image": "a.png", "mask": "masks/a.png", "valid": True}]}
        (self.out_dir / "manifest.json").write_text(json.dumps(manifest))
        return self.out_dir / "manifest.json"


@pytest.mark.parametrize("channels_last", [True, False])
def test_a_loaded_static_teacher_has_the_layout_it_was_trained_in(tmp_path: Path, channels_last: bool) -> None:
    """The warm-up's trainer makes the network channels-last (``channels_last``); a static teacher
    loaded from disk must get the same layout, or stage 3's convolutions round otherwise."""
    network = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    if not channels_last:
        network.to(memory_format=torch.channels_last)  # whatever layout it had before, it gets the trained one
    warmup = StaticTeacherWarmup(network, _OneImageAPPG(tmp_path / "appg"), tmp_path / "models" / "st.pt", tmp_path / "stwp",
                                 transform=None, channels_last=channels_last, amp=False, progress=False)
    manifest = warmup.appg.run()
    artifact = warmup._artifact(manifest, valid_pseudo_datalist(manifest))
    artifact.path.parent.mkdir(parents=True)
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)).state_dict(), artifact.path)
    artifact.commit()
    loaded = warmup.run()  # complete: loaded, not trained
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert all(conv.weight.is_contiguous(memory_format=layout) for conv in loaded), [c.weight.stride() for c in loaded]


def _command(root: Path) -> list[str]:
    """The tiny dual_teacher run in ``root`` (own APPG store; augmentation on, so that it draws)."""
    overrides = tiny_overrides(
        root, max_epochs=EPOCHS, epoch_length=EPOCH_LENGTH, stwp_max_epochs=EPOCHS, stwp_epoch_length=EPOCH_LENGTH,
        appg_dir=str(root / "appg"), augment=True, progress=False,
    )
    return [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", config_path("dual_teacher", "train.json"),
        "--meta_file", config_path("dual_teacher", "metadata.json"),
        "--logging_file", config_path("dual_teacher", "logging.conf"),
        *(f"--{k}={v}" for k, v in overrides.items()),
    ]


def _start(root: Path, attempt: int) -> tuple[subprocess.Popen, Path]:
    """Start the run in ``root`` as the CLI does, in its own process group; its log file."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"attempt{attempt}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every run (two share the CPU)
    with open(log, "wb") as out:
        proc = subprocess.Popen(_command(root), cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, log


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def _kill_when(proc: subprocess.Popen, log: Path, ready: Callable[[], bool], what: str, delay: float) -> None:
    """Wait until ``ready()`` (the stage's output shows it started or got that far), ``delay``
    seconds more, then SIGKILL the run (its process group: the APPG workers too)."""
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        assert proc.poll() is None, f"the run ended (exit code {proc.returncode}) before {what}:\n{_tail(log)}"
        assert time.monotonic() < deadline, f"no {what} within {TIMEOUT:.0f} s:\n{_tail(log)}"
        time.sleep(0.02)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait(proc: subprocess.Popen, log: Path) -> None:
    try:
        code = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert code == 0, f"the run failed (exit code {code}):\n{_tail(log)}"


def _final_networks(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The deployable model, the static teacher, and the student and EMA teacher at the end of stage 3."""
    resume = root / "runs" / "resume.pt"
    try:
        state = torch.load(resume, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a checkpoint whose random states are NumPy arrays
        with torch.serialization.safe_globals([np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]):
            state = torch.load(resume, map_location="cpu", weights_only=True)
    return {  # in the order they are made, so that the first difference reported is the earliest
        "models/static_teacher.pt": torch.load(root / "models" / "static_teacher.pt", map_location="cpu", weights_only=True),
        "models/model.pt": torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True),
        "final student (runs/resume.pt)": state["network"],
        "final EMA teacher (runs/resume.pt)": state["teacher"],
    }


def _masks(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "appg" / "masks").glob("*.png"))}


def _contains(log: Path, text: str) -> Callable[[], bool]:
    return lambda: log.exists() and text in log.read_text(errors="replace")


@pytest.mark.slow
def test_dual_teacher_killed_in_every_stage_ends_with_the_uninterrupted_model(tmp_path: Path) -> None:
    straight, straight_log = _start(tmp_path / "straight", 1)  # beside the killed run: the CPU has two cores
    root = tmp_path / "killed"
    rng = random.Random()
    appg_images = rng.randint(0, N_UNLABELED - 2)
    stwp_epochs = rng.randint(0, EPOCHS - 1)
    stage3_iterations = rng.randint(1, EPOCHS * EPOCH_LENGTH - 1)
    delays = [rng.uniform(0.0, 0.25) for _ in range(3)]
    points = (f"kill points: APPG after {appg_images} masks, warm-up after {stwp_epochs} epochs, stage 3 after "
              f"{stage3_iterations} iterations, each + {', '.join(f'{d:.2f}' for d in delays)} s")
    proc: subprocess.Popen | None = None
    try:
        # 1. APPG: its journal exists (it started) and it holds the chosen number of masks
        proc, log = _start(root, 1)
        masks = root / "appg" / "masks"
        _kill_when(proc, log, lambda: (root / "appg" / "journal.jsonl").exists()
                   and len(list(masks.glob("*.png"))) >= appg_images, "APPG output", delays[0])
        assert not (root / "appg" / "manifest.json").exists(), f"APPG was complete when killed; {points}"

        # 2. the warm-up: it started, or finished the chosen number of epochs
        proc, log = _start(root, 2)
        text = "static-teacher warm-up on" if stwp_epochs == 0 else f"STWP epoch {stwp_epochs}/{EPOCHS}"
        _kill_when(proc, log, _contains(log, text), f"{text!r} in the log", delays[1])
        assert (root / "appg" / "manifest.json").exists(), f"the restarted APPG did not finish; {points}"
        assert not (root / "models" / "static_teacher.json").exists(), f"the warm-up was complete when killed; {points}"

        # 3. stage 3 after the chosen number of iterations
        proc, log = _start(root, 3)
        epoch, iteration = divmod(stage3_iterations - 1, EPOCH_LENGTH)
        text = f"Epoch: {epoch + 1}/{EPOCHS}, Iter: {iteration + 1}/{EPOCH_LENGTH} --"
        _kill_when(proc, log, _contains(log, text), f"{text!r} in the log", delays[2])
        assert (root / "models" / "static_teacher.json").exists(), f"the restarted warm-up did not finish; {points}"
        metrics = root / "runs" / "metrics.jsonl"
        assert not metrics.exists() or len(metrics.read_text().splitlines()) < EPOCHS, f"stage 3 was complete when killed; {points}"

        # re-run until complete: this one resumes stage 3 (or starts it afresh) with the warm-up loaded from disk
        proc, log = _start(root, 4)
        _wait(proc, log)
        if stage3_iterations > EPOCH_LENGTH:
            assert f"resumed from {root / 'runs' / 'resume.pt'}" in log.read_text(), _tail(log)
        _wait(straight, straight_log)
    finally:
        for p in (straight, proc):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    assert _masks(root) == _masks(tmp_path / "straight") and len(_masks(root)) == N_UNLABELED, f"APPG masks differ; {points}"
    expected, got = _final_networks(tmp_path / "straight"), _final_networks(root)
    for what, reference in expected.items():
        differ = [name for name, value in reference.items() if not torch.equal(value, got[what][name])]
        if differ:
            worst = max(float((reference[n].float() - got[what][n].float()).abs().max()) for n in differ)
            raise AssertionError(f"{what}: {len(differ)} of {len(reference)} tensors differ (max |diff| {worst:.3g}) "
                                 f"from the uninterrupted run, e.g. {differ[0]}; {points}")
