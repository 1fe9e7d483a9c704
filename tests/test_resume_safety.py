"""Checkpoints never execute code; stale temporary files, duplicate log lines and 0600 artifacts are gone;
a missing trained model is one clear line.

Every checkpoint the project reads (a bundle's ``runs/resume.pt``, the warm-up's
``runs/stwp/<hash>/resume.pt``, ``static_teacher.pt``, ``models/model.pt`` read by evaluate and
inference, SAM and LiteMedSAM checkpoints) is replaced by a pickle whose ``__reduce__`` writes a
marker file: the run must refuse it with an error naming the file, and the marker must never appear.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from bundle_utils import REPO_ROOT, config_path, error_messages, make_workflow, tiny_overrides
from monai_ssl.handlers import ResumeCheckpoint, RNGState
from monai_ssl.utils import atomic_write
from test_dual_teacher_stages import _FixedAPPG, _StopAfterFirstEpoch, _warmup


class _PlantedPayload:
    """Unpickling this runs ``exec``, which writes ``marker`` (what a planted checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def _plant(path: Path, marker: Path) -> None:
    """Write a checkpoint-looking file at ``path`` whose full unpickling writes ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"network": _PlantedPayload(marker), "trainer": {"epoch": 1}}, path)


def test_the_planted_payload_runs_code_when_fully_unpickled(tmp_path: Path) -> None:
    """The test double is a real attack: an unsafe load runs it (so the tests below can fail)."""
    marker = tmp_path / "marker"
    _plant(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.read_text() == "code ran"


def _cli(config: list[str], bundle: str, **overrides) -> subprocess.CompletedProcess:
    files = [config_path(bundle, c) for c in config]
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", files[0] if len(files) == 1 else str(files),
        "--meta_file", config_path(bundle, "metadata.json"), "--logging_file", config_path(bundle, "logging.conf"),
        *(f"--{k}={v}" for k, v in overrides.items()),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MONAI_SSL_TRACEBACK", None)
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_training_command_refuses_a_planted_resume_checkpoint(tmp_path: Path) -> None:
    resume, marker = tmp_path / "runs" / "resume.pt", tmp_path / "marker"
    _plant(resume, marker)
    run = _cli(["train.json"], "supervised", **tiny_overrides(tmp_path, epoch_length=2))
    output = run.stdout + run.stderr
    assert run.returncode != 0, output[-3000:]
    assert not marker.exists(), "the planted checkpoint ran code"
    assert f"error: refusing to load resume checkpoint {resume}" in run.stderr, output[-3000:]
    assert "a pickled reference to exec" in run.stderr and "delete it" in run.stderr
    assert "Traceback" not in output, "a user error must be one line, not a traceback"
    assert not (tmp_path / "models" / "model.pt").exists(), "training went on"


def test_warmup_refuses_a_planted_resume_checkpoint_and_static_teacher(tmp_path: Path) -> None:
    appg = _FixedAPPG(tmp_path / "appg")
    marker = tmp_path / "marker"
    with pytest.raises(KeyboardInterrupt):  # killed after its first epoch: runs/stwp/<hash>/resume.pt
        _warmup(tmp_path, appg, handlers=[_StopAfterFirstEpoch()]).run()
    (stage_resume,) = (tmp_path / "stwp").glob("*/resume.pt")
    _plant(stage_resume, marker)
    with pytest.raises(Exception) as refused:
        _warmup(tmp_path, appg).run()
    assert not marker.exists(), "the planted warm-up checkpoint ran code"
    assert any(f"refusing to load resume checkpoint {stage_resume}" in m for m in error_messages(refused.value)), refused.value

    stage_resume.unlink()
    _warmup(tmp_path, appg).run()  # complete artifact: static_teacher.pt + its manifest
    weights = tmp_path / "models" / "static_teacher.pt"
    _plant(weights, marker)  # the manifest still says complete: the next run loads the file
    with pytest.raises(Exception) as refused:
        _warmup(tmp_path, appg).run()
    assert not marker.exists(), "the planted static teacher ran code"
    assert any(f"refusing to load static teacher {weights}" in m for m in error_messages(refused.value)), refused.value


@pytest.mark.parametrize("configs", [["inference.json"], ["train.json", "evaluate.json"]])
def test_evaluate_and_inference_refuse_a_planted_model(configs: list[str], tmp_path: Path) -> None:
    model, marker = tmp_path / "models" / "model.pt", tmp_path / "marker"
    _plant(model, marker)
    overrides = tiny_overrides(tmp_path) if "train.json" in configs else {"bundle_root": str(tmp_path), "spatial_size": 64}
    wf = make_workflow("supervised", configs, "inference" if len(configs) == 1 else "train", **overrides)
    with pytest.raises(Exception) as refused:
        wf.initialize()
        wf.run()
    assert not marker.exists(), "the planted model ran code"
    assert any(f"refusing to load trained model {model}" in m for m in error_messages(refused.value)), refused.value


def test_foundation_model_loaders_refuse_planted_checkpoints(tmp_path: Path) -> None:
    from monai_ssl.foundation.litemedsam import load_litemedsam
    from monai_ssl.foundation.sam import load_sam
    from test_appg import _tiny_sam

    marker = tmp_path / "marker"
    for what, load in (("LiteMedSAM checkpoint", load_litemedsam), ("SAM checkpoint", lambda p: load_sam(p, "tiny", builder=_tiny_sam))):
        path = tmp_path / f"{what.split()[0]}.pth"
        _plant(path, marker)
        with pytest.raises(Exception) as refused:
            load(path)
        assert not marker.exists(), f"the planted {what} ran code"
        assert f"refusing to load {what} {path}" in str(refused.value), refused.value


def test_resume_file_of_the_previous_version_says_to_start_afresh(tmp_path: Path) -> None:
    """The old RNG state (NumPy arrays, Python's tuple) is refused with what to do, not a crash."""
    path = tmp_path / "resume.pt"
    old_rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    trainer = Engine(lambda e, b: None)
    trainer.run([0, 1], max_epochs=1)
    torch.save({"trainer": trainer.state_dict(), "rng": old_rng}, path)  # what RNGState.state_dict() gave before
    checkpoint = ResumeCheckpoint(tmp_path, {"trainer": trainer})
    with pytest.raises(Exception) as refused:
        checkpoint.load(trainer)
    message = str(refused.value)
    assert f"refusing to load resume checkpoint {path}" in message and "NumPy" in message, message
    assert "delete it" in message and "start the run afresh" in message, message


def test_rng_state_loads_with_weights_only_and_restores_every_generator(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal(), random.gauss(0.0, 1.0)  # cached Gaussians are part of the state
    torch.save({"rng": RNGState().state_dict()}, tmp_path / "rng.pt")

    def draws() -> list:
        return [random.random(), random.gauss(0.0, 1.0), *np.random.standard_normal(2).tolist(), *torch.rand(2).tolist()]

    expected = draws()
    RNGState().load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert draws() == expected


# --------------------------------------------------------------------------- missing trained model


def test_inference_without_a_model_is_one_line_naming_the_file_and_the_training_command(tmp_path: Path) -> None:
    run = _cli(["inference.json"], "supervised", bundle_root=str(tmp_path))
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    model = tmp_path / "models" / "model.pt"
    command = "python -m monai.bundle run --config_file bundles/supervised/configs/train.json --bundle_root " + str(tmp_path)
    assert errors[0] == f"error: no trained model: {model} does not exist; train the bundle first: {command}"
    assert (REPO_ROOT / "bundles" / "supervised" / "configs" / "train.json").is_file()


def test_evaluate_without_a_model_stops_before_reading_data(tmp_path: Path) -> None:
    from monai_ssl.utils import MissingFileError

    wf = make_workflow("mean_teacher", ["train.json", "evaluate.json"], **tiny_overrides(tmp_path, ckpt_dir=str(tmp_path / "elsewhere")))
    wf.initialize()
    with pytest.raises(Exception) as missing:
        wf.run()
    (error,) = [e for e in _chain(missing.value) if isinstance(e, MissingFileError)]
    assert isinstance(error, FileNotFoundError)
    assert str(tmp_path / "elsewhere" / "model.pt") in str(error)
    assert f"--config_file bundles/mean_teacher/configs/train.json --bundle_root {tmp_path} --ckpt_dir {tmp_path / 'elsewhere'}" in str(error)


def _chain(exc: BaseException | None) -> list[BaseException]:
    out = []
    while exc is not None:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


# --------------------------------------------------------------------------- files left behind


def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path: Path) -> None:
    saved = os.umask(0o022)
    try:
        for umask, expected in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
            os.umask(umask)
            path = tmp_path / f"file_{umask:o}"
            atomic_write(path, "x")
            assert path.stat().st_mode & 0o777 == expected, f"umask {umask:o}: mode {path.stat().st_mode & 0o777:o}"
    finally:
        os.umask(saved)


def test_bundle_run_removes_its_stale_temps_only_and_writes_umask_modes(tmp_path: Path) -> None:
    models, runs = tmp_path / "models", tmp_path / "runs"
    stale = [models / ".model.pt.k2x_9abc.tmp", models / ".model.pt.0123abcd.tmp", runs / ".resume.pt.zz99zz99.tmp"]
    decoys = [models / ".model.pt.keep", models / "model.pt.tmp", models / ".notes.abcdefgh.tmp", models / ".model.pt.toolongname.tmp"]
    for path in stale + decoys:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
    saved = os.umask(0o022)
    try:
        wf = make_workflow("mean_teacher", ["train.json"], **tiny_overrides(tmp_path, epoch_length=2))
        wf.initialize()
        wf.run()
        wf.finalize()
    finally:
        os.umask(saved)
    assert [p for p in stale if p.exists()] == [], "stale temporary files left"
    assert all(p.exists() for p in decoys), "a file of another naming pattern was removed"
    for artifact in (models / "model.pt", runs / "resume.pt", runs / "training_curves.png"):
        assert artifact.stat().st_mode & 0o777 == 0o644, f"{artifact}: mode {artifact.stat().st_mode & 0o777:o}"
    state = torch.load(runs / "resume.pt", weights_only=True)  # every saved state is tensors and plain values
    assert {"network", "teacher", "optimizer", "trainer", "rng"} <= set(state), sorted(state)


@pytest.mark.slow
def test_metrics_log_keeps_one_line_per_iteration_after_a_resume(tmp_path: Path) -> None:
    """A run killed after logging epoch 2 but before its checkpoint is resumed from epoch 1."""
    log = tmp_path / "runs" / "metrics.jsonl"

    def train(max_epochs: int) -> None:
        overrides = tiny_overrides(tmp_path, max_epochs=max_epochs, epoch_length=2)
        wf = make_workflow("supervised", ["train.json"], **overrides, **{"metrics_logger#log_every": 1})
        wf.initialize()
        wf.run()

    def lines() -> list[tuple]:
        return [(r["epoch"], r["iteration"], "val" if "val_mean_dice" in r else "loss") for r in map(json.loads, log.read_text().splitlines())]

    train(1)
    shutil.copy(tmp_path / "runs" / "resume.pt", tmp_path / "epoch1.pt")
    train(2)  # epoch 2 logged...
    shutil.copy(tmp_path / "epoch1.pt", tmp_path / "runs" / "resume.pt")  # ...but the run "died" before its checkpoint
    with log.open("a") as f:
        f.write('{"epoch": 2, "iteration": 4, "lo')  # and a line cut short by the kill
    train(2)
    expected = [(1, 1, "loss"), (1, 2, "loss"), (1, 2, "val"), (2, 3, "loss"), (2, 4, "loss"), (2, 4, "val")]
    assert lines() == expected, "duplicate or missing lines after the resume"


def test_metrics_logger_drops_only_its_own_stage_beyond_the_iteration(tmp_path: Path) -> None:
    from monai_ssl.evaluation import MetricsLogger

    log = tmp_path / "metrics.jsonl"
    records = [{"epoch": 1, "iteration": 5, "loss": 1.0}, {"stage": "stwp", "epoch": 3, "iteration": 30, "loss": 2.0},
               {"epoch": 2, "iteration": 10, "loss": 3.0}, {"epoch": 2, "iteration": 10, "val_dice": 0.5}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"epoch": 3, "itera')
    assert MetricsLogger(log).drop_lines_after(5) == 3
    assert [json.loads(x) for x in log.read_text().splitlines()] == records[:2]
    assert MetricsLogger(log, stage="stwp").drop_lines_after(30) == 0


def test_an_uncaught_user_error_prints_one_line_unless_a_traceback_is_asked_for(capsys, monkeypatch) -> None:
    from monai_ssl.utils import UserError

    try:
        try:
            raise UserError("models/model.pt does not exist; train it")
        except UserError as inner:
            raise RuntimeError("Failed to evaluate ConfigExpression") from inner  # as MONAI wraps it
    except RuntimeError as wrapped:
        error = wrapped
    monkeypatch.delenv("MONAI_SSL_TRACEBACK", raising=False)
    sys.excepthook(type(error), error, error.__traceback__)
    assert capsys.readouterr().err == "error: models/model.pt does not exist; train it\n"
    monkeypatch.setenv("MONAI_SSL_TRACEBACK", "1")
    sys.excepthook(type(error), error, error.__traceback__)
    assert "Traceback" in capsys.readouterr().err
    other = ValueError("not ours")
    monkeypatch.delenv("MONAI_SSL_TRACEBACK")
    sys.excepthook(ValueError, other, None)
    assert "ValueError: not ours" in capsys.readouterr().err
