"""The dual-teacher bundle's stages: artifacts with manifests, skip/reuse, resume, rank-0-only work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from ignite.engine import Events

from bundle_utils import error_messages, make_workflow, tiny_dataset_dir, tiny_overrides
from monai_ssl.bundle import segmentation_transforms_2d
from monai_ssl.engines import StageArtifact, StaticTeacherWarmup, component_description, copy_weights
from monai_ssl.foundation import AppearanceBoxProposer
from monai_ssl.networks import ResNetUNet


def test_stage_artifact_needs_file_manifest_and_same_settings(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    artifact = StageArtifact(path, {"lr": 1e-4, "epochs": 2})
    assert not artifact.is_complete()
    torch.save({"w": torch.ones(1)}, path)
    assert not artifact.is_complete(), "a file without a manifest is not complete"
    artifact.commit({"iterations": 7})
    assert artifact.is_complete()
    manifest = json.loads((tmp_path / "weights.json").read_text())
    assert manifest["complete"] is True and manifest["iterations"] == 7 and manifest["config"] == {"lr": 1e-4, "epochs": 2}
    assert not StageArtifact(path, {"lr": 1e-3, "epochs": 2}).is_complete(), "other settings must not reuse it"
    (tmp_path / "weights.json").write_text('{"complete": tru')  # torn manifest
    assert not artifact.is_complete()
    artifact.commit()
    path.unlink()
    assert not artifact.is_complete(), "a manifest without its file is not complete"


def test_component_description_matches_the_cli_and_changes_with_settings() -> None:
    proposer = AppearanceBoxProposer()
    assert component_description(proposer) == {"name": "appearance", **vars(proposer)}

    class WithDescribe:
        def describe(self) -> dict:
            return {"name": "custom", "version": 3}

    assert component_description(WithDescribe()) == {"name": "custom", "version": 3}

    class Plain:
        def __init__(self, threshold: float) -> None:
            self.threshold, self.device, self._cache = threshold, "cpu", object()

    a, b = component_description(Plain(0.3)), component_description(Plain(0.4))
    assert a["threshold"] == 0.3 and "device" not in a and "_cache" not in a and a != b


def test_copy_weights_loads_every_target() -> None:
    torch.manual_seed(0)
    source, t1, t2 = (ResNetUNet(2, 1, 1, backbone="resnet18") for _ in range(3))
    copy_weights(source, [t1, t2])
    for target in (t1, t2):
        for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
            assert torch.equal(a, b), name


class _FixedAPPG:
    """A test double for APPGStage: a complete manifest whose pseudo-labels are the tiny set's truth masks."""

    def __init__(self, out_dir: Path, n_valid: int = 6) -> None:
        self.out_dir = out_dir
        self.n_valid = n_valid
        self.calls = 0

    def image_count(self) -> int:
        return self.n_valid + 1

    def run(self) -> Path:
        self.calls += 1
        data = Path(tiny_dataset_dir())
        entries = json.loads((data / "datalist.json").read_text())["labeled"] + json.loads((data / "datalist.json").read_text())["unlabeled"]
        (self.out_dir / "masks").mkdir(parents=True, exist_ok=True)
        images = []
        for i, entry in enumerate(entries[: self.n_valid + 1]):
            case_id = Path(entry["image"]).stem
            label = data / "labels" / f"{case_id}.png"
            shutil.copy(label, self.out_dir / "masks" / f"{case_id}.png")
            images.append({"case_id": case_id, "image": str(data / entry["image"]), "mask": f"masks/{case_id}.png",
                           "valid": i < self.n_valid})
        manifest = {"complete": True, "config_hash": "fixed", "images": images}
        (self.out_dir / "manifest.json").write_text(json.dumps(manifest))
        return self.out_dir / "manifest.json"


class _StopAfterFirstEpoch:
    """Raises after the first epoch's checkpoint has been written (a run killed mid-stage)."""

    def attach(self, engine) -> None:
        def stop(engine) -> None:
            if engine.state.epoch == 1:
                raise KeyboardInterrupt("simulated kill")

        engine.add_event_handler(Events.EPOCH_COMPLETED, stop)


def _warmup(root: Path, appg: _FixedAPPG, **kwargs) -> StaticTeacherWarmup:
    torch.manual_seed(0)
    settings = dict(batch_size=2, max_epochs=2, epoch_length=3, learning_rate=1e-3, amp=False, progress=False)
    settings.update(kwargs)
    return StaticTeacherWarmup(
        ResNetUNet(2, 1, 1, backbone="resnet18"), appg, root / "models" / "static_teacher.pt", root / "stwp",
        segmentation_transforms_2d(64), **settings,
    )


def test_stwp_resumes_after_a_kill_to_the_uninterrupted_result_then_skips(tmp_path: Path, monkeypatch) -> None:
    appg = _FixedAPPG(tmp_path / "appg")
    reference = _warmup(tmp_path / "uninterrupted", appg)
    reference.run()
    assert all(not p.requires_grad for p in reference.network.parameters()) and not reference.network.training
    reference.load_state_dict(reference.state_dict())  # what stage 3's resume checkpoint records and checks
    with pytest.raises(RuntimeError, match="another static teacher"):
        reference.load_state_dict({"config_hash": "0" * 64})

    killed = _warmup(tmp_path / "killed", appg, handlers=[_StopAfterFirstEpoch()])
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    assert not (tmp_path / "killed" / "models" / "static_teacher.pt").exists(), "no artifact from a killed stage"
    assert list((tmp_path / "killed" / "stwp").glob("*/resume.pt")), "the killed stage left its resume checkpoint"

    resumed = _warmup(tmp_path / "killed", appg)
    resumed.run()
    for (name, a), b in zip(reference.network.state_dict().items(), resumed.network.state_dict().values()):
        assert torch.equal(a, b), f"resumed warm-up differs from the uninterrupted one at {name}"
    assert not list((tmp_path / "killed" / "stwp").glob("*/resume.pt")), "spent resume state is removed"

    # complete and same settings: loaded, not retrained; other settings: retrained
    def no_training(*args, **kwargs):
        raise AssertionError("a complete artifact was retrained")

    again = _warmup(tmp_path / "killed", appg)
    monkeypatch.setattr(again, "_train", no_training)
    loaded = again.run()
    assert torch.equal(next(iter(loaded.state_dict().values())), next(iter(reference.network.state_dict().values())))
    changed = _warmup(tmp_path / "killed", appg, learning_rate=5e-4)
    monkeypatch.setattr(changed, "_train", no_training)
    with pytest.raises(AssertionError, match="retrained"):
        changed.run()


def test_stwp_without_valid_pseudo_labels_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no valid pseudo-labels.*use_static_teacher=false"):
        _warmup(tmp_path, _FixedAPPG(tmp_path / "appg", n_valid=0)).run()


def test_bundle_reuses_finished_stages_and_runs_without_them(tmp_path: Path) -> None:
    first = make_workflow("dual_teacher", ["train.json"], **tiny_overrides(tmp_path / "a", epoch_length=2))
    first.initialize()
    first.run()
    weights = tmp_path / "a" / "models" / "static_teacher.pt"
    stamp = weights.stat().st_mtime_ns
    student = first.parser.get_parsed_content("network")
    assert (tmp_path / "a" / "models" / "static_teacher.json").is_file()

    # stage 3 never resumes on top of a static teacher made by other settings
    changed = make_workflow("dual_teacher", ["train.json"], **tiny_overrides(tmp_path / "a", epoch_length=2, max_epochs=2,
                            stwp_learning_rate=3e-4))
    changed.initialize()
    with pytest.raises(Exception) as info:
        changed.run()
    chain = error_messages(info.value)
    assert any("another static teacher" in msg for msg in chain), chain
    weights.unlink()  # restore the first settings' static teacher for the reuse check below
    first.parser.get_parsed_content("stwp").run()
    stamp = weights.stat().st_mtime_ns

    # a second bundle root reusing the same static teacher file skips APPG and the warm-up
    again = make_workflow("dual_teacher", ["train.json"], **tiny_overrides(tmp_path / "b", epoch_length=2,
                          static_teacher_path=str(weights)))
    again.initialize()
    again.run()
    assert weights.stat().st_mtime_ns == stamp, "a complete static teacher was retrained"
    assert again.parser.get_parsed_content("stwp").network.training is False
    assert student is not None

    # the ablation without APPG / static teacher: no APPG output, no static teacher
    plain = make_workflow("dual_teacher", ["train.json"], **tiny_overrides(
        tmp_path / "c", epoch_length=2, use_static_teacher=False, appg_dir=str(tmp_path / "c" / "appg")))
    plain.initialize()
    plain.run()
    assert not (tmp_path / "c" / "appg").exists() and not (tmp_path / "c" / "models" / "static_teacher.pt").exists()
    assert (tmp_path / "c" / "models" / "model.pt").is_file()
