"""Conformance of every 2D bundle with MONAI's bundle contract, and end-to-end runs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out
from PIL import Image

from bundle_utils import (
    BUNDLES_2D,
    REPO_ROOT,
    config_path,
    dataset_with_missing_image,
    error_messages,
    make_workflow,
    tiny_dataset_dir,
    tiny_overrides,
    tiny_stage_overrides,
)
from monai_ssl.bundle.conformance import check_metadata
from monai_ssl.evaluation import training_curves_figure


@contextlib.contextmanager
def captured_log(name: str) -> Iterator[list[str]]:
    """The messages logged to logger ``name`` inside the block (the bundle's logging.conf replaces
    the root handlers, pytest's caplog among them, so capture on the logger itself)."""
    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def build_network(bundle: str, encoder: str = "resnet34") -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(config_path(bundle, "inference.json"))
    parser["encoder"] = encoder
    return parser.get_parsed_content("network_def")


@pytest.mark.parametrize("bundle", BUNDLES_2D)
def test_bundle_files_and_metadata(bundle: str) -> None:
    root = REPO_ROOT / "bundles" / bundle
    for rel in ["LICENSE", "docs/README.md", *(f"configs/{c}" for c in
                ["metadata.json", "train.json", "evaluate.json", "inference.json", "multi_gpu_train.json", "logging.conf"])]:
        assert (root / rel).is_file(), f"{bundle}: {rel} missing"
    check_metadata(root / "configs" / "metadata.json")


def test_metadata_check_rejects_a_missing_key(tmp_path: Path) -> None:
    meta = json.loads(Path(config_path("supervised", "metadata.json")).read_text())
    del meta["network_data_format"]["inputs"]["image"]["dtype"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="dtype"):
        check_metadata(bad)


@pytest.mark.parametrize("bundle", BUNDLES_2D)
def test_properties_are_complete(bundle: str, tmp_path: Path) -> None:
    for config, kind in (("train.json", "train"), ("inference.json", "inference")):
        data = tiny_dataset_dir() + ("/images" if kind == "inference" else "")
        wf = make_workflow(bundle, [config], kind, bundle_root=str(tmp_path), dataset_dir=data)
        wf.initialize()
        assert wf.check_properties() == [], f"{bundle}/{config}: missing properties"


#: the bundles' default encoder for every bundle, the other CNN encoders on one bundle
ENCODER_CASES = [(b, "resnet34") for b in BUNDLES_2D] + [("supervised", "efficientnet-lite0"), ("supervised", "resnet18")]


@pytest.mark.parametrize("bundle, encoder", ENCODER_CASES)
def test_verify_net_in_out(bundle: str, encoder: str) -> None:
    verify_net_in_out(
        net_id="network_def",
        meta_file=config_path(bundle, "metadata.json"),
        config_file=config_path(bundle, "inference.json"),
        n=2,
        device="cpu",
        encoder=encoder,
    )


@pytest.mark.parametrize("bundle, encoder", ENCODER_CASES)
def test_torchscript_and_torch_export_match_eager(bundle: str, encoder: str, tmp_path: Path) -> None:
    net = build_network(bundle, encoder).eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    ts_path = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts_path),
        ckpt_file=str(tmp_path / "model.pt"),
        meta_file=config_path(bundle, "metadata.json"),
        config_file=config_path(bundle, "inference.json"),
        encoder=encoder,
    )
    scripted = torch.jit.load(str(ts_path))
    exported = torch.export.export(
        net, (torch.rand(2, 1, 64, 64),), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=32)},)
    ).module()
    for batch in (1, 2):
        x = torch.rand(batch, 1, 64, 64)
        with torch.no_grad():
            ref = net(x)
            torch.testing.assert_close(scripted(x), ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(exported(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bundle", BUNDLES_2D)
def test_one_epoch_lowers_the_loss_then_evaluate_and_infer(bundle: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    wf = make_workflow(bundle, ["train.json"], **tiny_overrides(tmp_path, epoch_length=24, learning_rate=0.003))
    wf.initialize()
    losses: list[float] = []
    wf.trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss_sup"])))
    wf.run()
    wf.finalize()
    assert len(losses) == 24
    assert np.mean(losses[-6:]) < np.mean(losses[:6]), f"supervised loss did not fall: {losses}"
    model_pt = tmp_path / "models" / "model.pt"
    state = torch.load(model_pt, weights_only=True)
    build_network(bundle).load_state_dict(state, strict=True)  # bare state dict, loadable strictly
    assert (tmp_path / "runs" / "resume.pt").is_file()
    assert (tmp_path / "runs" / "training_curves.png").is_file()
    # the model carries the settings it was trained with (models/model.json, next to model.pt)
    card = json.loads((tmp_path / "models" / "model.json").read_text())
    assert card["bundle"] == bundle and card["settings"]["spatial_size"] == 64
    if bundle == "dual_teacher":  # the static teacher's warm-up losses reach the curves too
        warmup_log = wf.parser.get_parsed_content("stwp").metrics_log
        assert warmup_log.is_file() and "loss" in warmup_log.read_text()
        figure = training_curves_figure(tmp_path / "runs" / "metrics.jsonl", warmup_log)
        assert [ax.get_title() for ax in figure.axes][0] == "warm-up (static teacher)"

    # the evaluate overlay merged on train.json: per-case CSV, summary and overlays for the test split
    ev = make_workflow(bundle, ["train.json", "evaluate.json"], **tiny_overrides(tmp_path))
    ev.initialize()
    ev.run()
    ev.finalize()
    summary = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())
    assert summary["n_cases"] == 4 and 0.0 <= summary["metrics"]["dice"]["mean"] <= 1.0
    assert summary["split"] == "test"
    assert len(list((tmp_path / "eval" / "overlays").glob("*.png"))) == 4

    # inference on a folder of mixed inputs writes one mask per image at the image's own size
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    src = sorted(Path(tiny_dataset_dir(), "images").glob("*.png"))[0]
    Image.open(src).resize((90, 70)).convert("RGB").save(inputs / "photo.jpg")
    Image.open(src).save(inputs / "scan.png")
    pixels = np.asarray(Image.open(src))
    nib.save(nib.Nifti1Image(pixels.T.astype(np.float32), np.diag([0.5, 0.5, 1.0, 1.0])), inputs / "frame.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(pixels[:40, :50]), str(inputs / "still.dcm"))  # 50 wide, 40 high
    # no --spatial_size: inference takes the 64 px the model was trained at from its card (the config says 224)
    inf = make_workflow(bundle, ["inference.json"], "inference", bundle_root=str(tmp_path), dataset_dir=str(inputs))
    assert inf.parser.get_parsed_content("spatial_size") == 64
    inf.initialize()
    with captured_log("monai_ssl.evaluation.report") as records:
        inf.run()
    inf.finalize()
    assert records[-1] == f"inference wrote 4 masks to {(tmp_path / 'inference').resolve()}"
    out = {p.name: Image.open(p) for p in (tmp_path / "inference").glob("*.png")}
    assert sorted(out) == ["photo_mask.png", "scan_mask.png", "still_mask.png"]
    assert out["photo_mask.png"].size == (90, 70) and out["still_mask.png"].size == (50, 40)
    assert set(np.unique(np.asarray(out["scan_mask.png"]))) <= {0, 255}
    nifti_mask = nib.load(tmp_path / "inference" / "frame_mask.nii.gz")
    assert nifti_mask.shape == (64, 64)
    np.testing.assert_allclose(nifti_mask.affine, np.diag([0.5, 0.5, 1.0, 1.0]))


def test_missing_file_in_datalist_is_named(tmp_path: Path) -> None:
    data_dir = dataset_with_missing_image(tiny_dataset_dir(), tmp_path / "data", "images/not_there.png")
    wf = make_workflow("supervised", ["train.json"], **tiny_overrides(tmp_path, dataset_dir=str(data_dir)))
    with pytest.raises(Exception) as info:
        wf.initialize()
        wf.run()
    # MONAI's config parser wraps the error; the traceback a user sees shows the whole chain
    chain = error_messages(info.value)
    assert any("not_there.png" in msg and "labeled" in msg for msg in chain), chain


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["mean_teacher", "dual_teacher"])
def test_torchrun_two_processes_on_cpu(bundle: str, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    overrides = {**tiny_stage_overrides(bundle), **tiny_overrides(tmp_path, max_epochs=2)}
    args = [f"--{k}={v}" for k, v in overrides.items()]
    cmd = [
        str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run",
        "--config_file", f"['{config_path(bundle, 'train.json')}','{config_path(bundle, 'multi_gpu_train.json')}']",
        "--meta_file", config_path(bundle, "metadata.json"),
        "--logging_file", config_path(bundle, "logging.conf"),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file()
    state = torch.load(tmp_path / "runs" / "resume.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 2 * state["trainer"]["epoch_length"]
