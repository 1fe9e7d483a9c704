"""Faults: a training run killed with SIGKILL resumes without loss; interrupted saves leave no corrupt file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bundle_utils import REPO_ROOT, config_path, tiny_overrides
from monai_ssl.handlers import atomic_torch_save


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "resume.pt"
    atomic_torch_save({"a": torch.ones(3)}, path)

    def broken_save(obj, f):
        Path(f).write_bytes(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert list(tmp_path.iterdir()) == [path], "temporary file left behind"


def _bundle_cmd(bundle_root: Path, max_epochs: int) -> list[str]:
    overrides = tiny_overrides(bundle_root, max_epochs=max_epochs, epoch_length=6, val_interval=1)
    return [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", config_path("mean_teacher", "train.json"),
        "--meta_file", config_path("mean_teacher", "metadata.json"),
        "--logging_file", config_path("mean_teacher", "logging.conf"),
        *(f"--{k}={v}" for k, v in overrides.items()),
    ]


@pytest.mark.slow
def test_sigkill_during_training_then_rerun_loses_nothing(tmp_path: Path) -> None:
    resume = tmp_path / "runs" / "resume.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_bundle_cmd(tmp_path, 4), cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not resume.exists():
        assert proc.poll() is None, "training ended before writing its first checkpoint"
        time.sleep(0.05)
    assert resume.exists(), "no checkpoint within 300 s"
    time.sleep(1.0)  # into the next epoch (or the next save)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = torch.load(resume, weights_only=True)  # never a truncated file
    done_before = state["trainer"]["iteration"]
    assert done_before % 6 == 0 and done_before < 24
    stale_model_temp = tmp_path / "models" / ".model.pt.a1b2c3d4.tmp"  # as left by a kill during a model save
    stale_model_temp.parent.mkdir(exist_ok=True)
    stale_model_temp.write_bytes(b"partial")

    rerun = subprocess.run(_bundle_cmd(tmp_path, 4), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert f"resumed from {resume}" in rerun.stdout + rerun.stderr
    final = torch.load(resume, weights_only=True)
    assert final["trainer"]["iteration"] == 24
    assert not list(resume.parent.glob(".resume.pt.*.tmp"))
    assert not list((tmp_path / "models").glob(".*.tmp")), "stale temporary files left in models/"
    assert (tmp_path / "models" / "model.pt").is_file()
    log = [json.loads(line) for line in (tmp_path / "runs" / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["iteration"], "val_mean_dice" in r) for r in log]
    assert len(keys) == len(set(keys)), f"duplicate lines in metrics.jsonl after the resume: {keys}"
    assert sorted(i for i, is_val in keys if is_val) == [6, 12, 18, 24], keys
