"""Conformance and end-to-end runs of the `dual_network_3d` bundle, its 3D transforms and its DDP design.

Every run uses tiny subnets (4 filters, one block per ResNet stage), 32^3 crops and windows and
a 32^3 synthetic dataset so that each test takes seconds. bf16 autocast is off in the training
runs: on CPU (PyTorch 2.13, oneDNN 3.12) the bf16 conv3d weight gradient is intermittently NaN
when a feature map is 2x2x2, which is what a 32^3 crop gives at the bottleneck.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out
from torch import nn

from bundle_utils import REPO_ROOT, config_path, dataset_with_missing_image, error_messages, make_workflow
from monai_ssl.bundle import (
    find_volumes,
    inference_transforms_3d,
    segmentation_transforms_3d,
    sliding_window_inferer_3d,
    unlabeled_transforms_3d,
    validation_transforms_3d,
)
from monai_ssl.bundle.conformance import check_metadata
from monai_ssl.data import synthetic_dataset
from monai_ssl.methods import DualNetwork3DObjective
from monai_ssl.networks import DualNetwork3D
from monai_ssl.networks.dual_3d import DualTrainForward

BUNDLE = "dual_network_3d"
TINY_NET = {"n_filters": 4, "resnet_layers": [1, 1, 1, 1]}


def tiny_volume_dir() -> str:
    """Synthetic 32^3 volumes: 4 labelled, 4 unlabelled, 2 validation, 2 test."""
    return synthetic_dataset("vol3d", n_labeled=4, n_unlabeled=4, n_validation=2, n_test=2, size=32)


def tiny_overrides(bundle_root: Path, **extra: Any) -> dict[str, Any]:
    """Overrides for a training run of seconds: tiny net, 32^3 crops and windows, fp32."""
    return {
        "bundle_root": str(bundle_root),
        "dataset_dir": tiny_volume_dir(),
        "crop_size": [32, 32, 32],
        "sw_roi_size": [32, 32, 32],
        "sw_stride": [16, 16, 16],
        "max_iterations": 8,
        "epoch_length": 8,
        "amp": False,
        **TINY_NET,
        **extra,
    }


# ------------------------------------------------------------------------------------- conformance
def test_bundle_files_and_metadata() -> None:
    root = REPO_ROOT / "bundles" / BUNDLE
    for rel in ["LICENSE", "docs/README.md", *(f"configs/{c}" for c in
                ["metadata.json", "train.json", "evaluate.json", "inference.json", "multi_gpu_train.json", "logging.conf"])]:
        assert (root / rel).is_file(), f"{BUNDLE}: {rel} missing"
    check_metadata(root / "configs" / "metadata.json")
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert len(meta["network_data_format"]["inputs"]["image"]["spatial_shape"]) == 3


def test_properties_are_complete(tmp_path: Path) -> None:
    for config, kind, data in (("train.json", "train", tiny_volume_dir()),
                               ("inference.json", "inference", tiny_volume_dir() + "/imagesTr")):
        wf = make_workflow(BUNDLE, [config], kind, bundle_root=str(tmp_path), dataset_dir=data, **TINY_NET)
        wf.initialize()
        assert wf.check_properties() == [], f"{BUNDLE}/{config}: missing properties"


def test_verify_net_in_out() -> None:
    verify_net_in_out(net_id="network_def", meta_file=config_path(BUNDLE, "metadata.json"),
                      config_file=config_path(BUNDLE, "inference.json"), n=2, device="cpu", **TINY_NET)


def test_torchscript_and_torch_export_match_eager(tmp_path: Path) -> None:
    parser = ConfigParser()
    parser.read_config(config_path(BUNDLE, "inference.json"))
    parser.update(TINY_NET)
    net = parser.get_parsed_content("network_def").eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(tmp_path / "model.pt"),
                meta_file=config_path(BUNDLE, "metadata.json"), config_file=config_path(BUNDLE, "inference.json"),
                **TINY_NET)
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    exported = torch.export.export(
        net, (torch.rand(2, 1, 32, 32, 32),), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=8)},)
    ).module()
    for batch in (1, 3):
        x = torch.rand(batch, 1, 32, 32, 32)
        with torch.no_grad():
            ref = net(x)
            torch.testing.assert_close(scripted(x), ref, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(exported(x), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ref.sum(dim=1), torch.ones(batch, 32, 32, 32))  # averaged softmax


# ------------------------------------------------------------------------------------- end to end
def test_train_lowers_the_loss_then_resume_evaluate_and_infer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    wf = make_workflow(BUNDLE, ["train.json"], **tiny_overrides(tmp_path, max_iterations=16, epoch_length=8,
                                                                 lr_step_size=12))
    wf.initialize()
    sup: list[float] = []
    terms: set[str] = set()

    def record(engine: Any) -> None:
        sup.append(float(engine.state.output["loss_sup_resnet"] + engine.state.output["loss_sup_vnet"]))
        terms.update(k for k in engine.state.output if k.startswith("loss_"))

    wf.trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    wf.run()
    wf.finalize()
    assert len(sup) == 16
    assert np.mean(sup[-4:]) < np.mean(sup[:4]), f"supervised loss did not fall: {sup}"
    assert {"loss_sup_resnet", "loss_sup_vnet", "loss_cr", "loss_consistency", "loss_kl", "loss_cps", "loss_efs",
            "loss_pgl"} <= terms
    # both optimisers stepped by their iteration-level schedulers: x0.1 after 12 of 16 iterations
    for name in ("optimizer", "optimizer_vnet"):
        assert wf.parser.get_parsed_content(name).param_groups[0]["lr"] == pytest.approx(0.001)
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    DualNetwork3D(**TINY_NET).load_state_dict(state, strict=True)  # bare state dict of the deployable network
    resume = torch.load(tmp_path / "runs" / "resume.pt", weights_only=True)
    assert resume["trainer"]["iteration"] == 16 and resume["lr_scheduler_vnet"]["last_epoch"] == 16
    assert (tmp_path / "runs" / "training_curves.png").is_file()

    # a rerun with a larger budget resumes from iteration 16 (schedulers included)
    more = make_workflow(BUNDLE, ["train.json"], **tiny_overrides(tmp_path, max_iterations=24, epoch_length=8,
                                                                   lr_step_size=12))
    more.initialize()
    seen: list[int] = []
    more.trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.iteration))
    more.run()
    assert seen == list(range(17, 25))
    assert torch.load(tmp_path / "runs" / "resume.pt", weights_only=True)["lr_scheduler"]["last_epoch"] == 24

    # evaluate: per-case Dice / Jaccard / HD95 / ASD in voxels and mm, CSV + JSON
    ev = make_workflow(BUNDLE, ["train.json", "evaluate.json"], **tiny_overrides(tmp_path))
    ev.initialize()
    ev.run()
    ev.finalize()
    summary = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())
    assert summary["n_cases"] == 2
    for metric in ("dice", "iou", "hd95", "asd", "hd95_mm", "asd_mm"):
        assert metric in summary["metrics"], metric
    assert (tmp_path / "eval" / "metrics_per_case.csv").read_text().count("\n") == 3

    # inference on a folder of NIfTI (non-identity affine, smaller than the window) and h5 volumes
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    affine = np.array([[0.0, 0.7, 0, 10], [0.8, 0, 0, -5], [0, 0, 1.5, 3], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(rng.random((40, 36, 20)).astype(np.float32), affine), inputs / "scan.nii.gz")
    with h5py.File(inputs / "case.h5", "w") as f:
        f["image"] = rng.random((24, 30, 34)).astype(np.float32)
        f["label"] = np.zeros((24, 30, 34), np.uint8)
        f["image"].attrs["spacing"] = [0.625, 0.625, 0.625]
    (inputs / "notes.txt").write_text("not a volume")
    inf = make_workflow(BUNDLE, ["inference.json"], "inference", bundle_root=str(tmp_path), dataset_dir=str(inputs),
                        sw_roi_size=[32, 32, 32], sw_stride=[16, 16, 16], **TINY_NET)
    inf.initialize()
    inf.run()
    inf.finalize()
    out = sorted(p.name for p in (tmp_path / "inference").iterdir())
    assert out == ["case_mask.nii.gz", "scan_mask.nii.gz"]
    scan = nib.load(tmp_path / "inference" / "scan_mask.nii.gz")
    assert scan.shape == (40, 36, 20)
    np.testing.assert_allclose(scan.affine, affine, atol=1e-6)
    assert set(np.unique(np.asarray(scan.dataobj))) <= {0, 1}
    case = nib.load(tmp_path / "inference" / "case_mask.nii.gz")
    assert case.shape == (24, 30, 34)
    np.testing.assert_allclose(np.diag(case.affine)[:3], [0.625] * 3)


def test_inference_presets_are_selectable_by_id(tmp_path: Path) -> None:
    for preset, roi in (("LA", (112, 112, 80)), ("Pancreas", (96, 96, 96)), ("BraTS", (96, 96, 96))):
        wf = make_workflow(BUNDLE, ["inference.json"], "inference", bundle_root=str(tmp_path),
                           dataset_dir=tiny_volume_dir() + "/imagesTr", sw_preset=preset, **TINY_NET)
        wf.initialize()
        assert tuple(wf.parser.get_parsed_content("inferer").roi_size) == roi
    # BraTS's poly learning rate, as the README documents it: an override of both schedulers
    poly = "$torch.optim.lr_scheduler.PolynomialLR(@{}, total_iters=@max_iterations, power=0.9)"
    wf = make_workflow(BUNDLE, ["train.json"], bundle_root=str(tmp_path), dataset_dir=tiny_volume_dir(),
                       lr_scheduler=poly.format("optimizer"), lr_scheduler_vnet=poly.format("optimizer_vnet"), **TINY_NET)
    wf.initialize()
    for name, opt in (("lr_scheduler", "optimizer"), ("lr_scheduler_vnet", "optimizer_vnet")):
        sched = wf.parser.get_parsed_content(name)
        assert isinstance(sched, torch.optim.lr_scheduler.PolynomialLR)
        assert sched.optimizer is wf.parser.get_parsed_content(opt)
    with pytest.raises(ValueError, match="unknown sliding-window preset"):
        sliding_window_inferer_3d("Liver")
    with pytest.raises(ValueError, match="both"):
        sliding_window_inferer_3d(roi_size=[32, 32, 32])


def test_missing_volume_in_datalist_is_named(tmp_path: Path) -> None:
    data_dir = dataset_with_missing_image(tiny_volume_dir(), tmp_path / "data", "imagesTr/not_there.nii.gz")
    wf = make_workflow(BUNDLE, ["train.json"], **tiny_overrides(tmp_path, dataset_dir=str(data_dir)))
    with pytest.raises(Exception) as info:
        wf.initialize()
        wf.run()
    chain = error_messages(info.value)
    assert any("not_there.nii.gz" in msg for msg in chain), chain


# ------------------------------------------------------------------------------------- 3D transforms
def _write_pair(folder: Path, image: np.ndarray, label: np.ndarray, kind: str, affine: np.ndarray | None = None) -> dict:
    affine = np.eye(4) if affine is None else affine
    if kind == "h5":
        path = folder / "pair.h5"
        with h5py.File(path, "w") as f:
            f["image"], f["label"] = image, label
        return {"image": str(path), "label": str(path)}
    nib.save(nib.Nifti1Image(image, affine), folder / "img.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / "lab.nii.gz")
    return {"image": str(folder / "img.nii.gz"), "label": str(folder / "lab.nii.gz")}


@pytest.mark.parametrize("kind", ["nifti", "h5"])
@pytest.mark.parametrize("crop_mode", ["random", "pos_neg"])
def test_training_chain_crops_image_and_label_alike(tmp_path: Path, kind: str, crop_mode: str) -> None:
    shape = (40, 36, 30)
    index = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)  # each voxel's value names its position
    label = ((index.astype(np.int64) % 7) == 0).astype(np.uint8) * 255  # 0/255: binarised to 0/1
    item = _write_pair(tmp_path, index, label, kind)
    chain = segmentation_transforms_3d(crop_size=(16, 16, 16), normalize=False, crop_mode=crop_mode, flip=True)
    for seed in range(4):
        chain.set_random_state(seed)
        out = chain(item)
        out = out[0] if isinstance(out, list) else out
        img, lab = out["image"].as_tensor(), out["label"].as_tensor()
        assert img.shape == lab.shape == (1, 16, 16, 16)
        positions = img.numpy().astype(np.int64)
        np.testing.assert_array_equal(lab.numpy(), ((positions % 7) == 0).astype(np.float32))


def test_training_chain_pads_small_volumes_and_normalises(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = (rng.random((12, 20, 8)) * 100 + 50).astype(np.float32)
    item = _write_pair(tmp_path, image, (image > 100).astype(np.uint8), "nifti")
    out = segmentation_transforms_3d(crop_size=(16, 24, 16))(item)
    assert out["image"].shape == out["label"].shape == (1, 16, 24, 16)
    whole = validation_transforms_3d()(item)
    assert whole["image"].shape == (1, 12, 20, 8)  # no crop, no pad
    assert abs(float(whole["image"].mean())) < 1e-4 and abs(float(whole["image"].std()) - 1) < 1e-2  # z-score
    u = unlabeled_transforms_3d(crop_size=(16, 16, 16))({"image": item["image"]})
    assert u["image"].shape == (1, 16, 16, 16) and "label" not in u
    assert inference_transforms_3d()({"image": item["image"]})["image"].shape == (1, 12, 20, 8)


def test_transform_errors_name_the_file(tmp_path: Path) -> None:
    item = _write_pair(tmp_path, np.zeros((10, 10, 10), np.float32), np.zeros((10, 10, 9), np.uint8), "nifti")
    with pytest.raises(Exception) as info:
        validation_transforms_3d()(item)
    chain = error_messages(info.value)
    assert any("img.nii.gz" in m and "spatial size mismatch" in m for m in chain), chain
    multi = _write_pair(tmp_path, np.zeros((10, 10, 10), np.float32), (np.arange(1000).reshape(10, 10, 10) % 3).astype(np.uint8), "nifti")
    with pytest.raises(Exception) as info:
        validation_transforms_3d()(multi)
    assert "more than two distinct values" in str(info.value.__cause__ or info.value)
    with pytest.raises(ValueError, match="crop_mode"):
        segmentation_transforms_3d(crop_mode="centre")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        find_volumes(str(tmp_path / "empty"))


# ------------------------------------------------------------------------------------- DDP design
class _Wrapper(nn.Module):
    """Stands in for DistributedDataParallel (a module holding ``.module``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> Any:
        return self.module(x)


def test_objective_goes_through_the_training_wrapper() -> None:
    torch.manual_seed(0)
    net = DualNetwork3D(**TINY_NET, dropout=0.0)
    view = DualTrainForward(net)
    x = torch.rand(2, 1, 16, 16, 16)
    for a, b in zip(view(x), net.forward_both(x)):
        torch.testing.assert_close(a, b)
    calls: list[int] = []
    wrapped = _Wrapper(view)
    wrapped.register_forward_hook(lambda *_: calls.append(1))
    labeled = {"image": x[:1], "label": (x[:1] > 0.5).float()}
    unlabeled = {"image": x[1:]}

    class _State:
        iteration = 1

    class _Engine:
        network = wrapped
        state = _State()

    out = DualNetwork3DObjective()(_Engine(), labeled, unlabeled)
    assert calls == [1], "the objective must call the (DDP) wrapper's forward exactly once"
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    assert all(p.grad is not None for p in net.parameters())

    _Engine.network = _Wrapper(net)  # a wrapped DualNetwork3D would not synchronise gradients
    with pytest.raises(TypeError, match="DualTrainForward"):
        DualNetwork3DObjective()(_Engine(), labeled, unlabeled)
    with pytest.raises(TypeError, match="DualNetwork3D"):
        DualTrainForward(nn.Linear(2, 2))  # type: ignore[arg-type]


def _torchrun(tmp_path: Path, name: str, extra: dict[str, Any]) -> dict[int, dict[str, torch.Tensor]]:
    """Train on 2 gloo processes; return each rank's final parameters."""
    out = tmp_path / name
    dump = {
        "finalize": [
            f"$torch.save({{k: v.detach().clone() for k, v in @network.named_parameters()}}, "
            f"'{out}/params_rank' + str(dist.get_rank()) + '.pt')",
            "$dist.is_initialized() and dist.destroy_process_group()",
        ],
        **extra,
    }
    out.mkdir()
    (out / "dump.json").write_text(json.dumps(dump))
    overrides = tiny_overrides(out, max_iterations=4, epoch_length=2, batch_size=1, unlabeled_batch_size=1)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run",
        "--config_file", f"['{config_path(BUNDLE, 'train.json')}','{config_path(BUNDLE, 'multi_gpu_train.json')}',"
        f"'{out / 'dump.json'}']",
        "--meta_file", config_path(BUNDLE, "metadata.json"),
        "--logging_file", config_path(BUNDLE, "logging.conf"),
        *(f"--{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in overrides.items()),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {r: torch.load(out / f"params_rank{r}.pt", weights_only=True) for r in (0, 1)}


@pytest.mark.slow
def test_torchrun_two_processes_keep_both_subnets_in_sync(tmp_path: Path) -> None:
    params = _torchrun(tmp_path, "ddp", {})
    assert {k.split(".")[0] for k in params[0]} == {"resnet", "vnet"}
    for k in params[0]:
        torch.testing.assert_close(params[0][k], params[1][k], rtol=0, atol=1e-6, msg=f"{k} differs across ranks")
    assert (tmp_path / "ddp" / "models" / "model.pt").is_file()
    resume = torch.load(tmp_path / "ddp" / "runs" / "resume.pt", weights_only=True)
    assert resume["trainer"]["iteration"] == 4

    # control: the same run without the DDP wrapper lets the ranks drift apart (each sees other data)
    apart = _torchrun(tmp_path, "no_ddp", {"train_network": "$monai_ssl.networks.DualTrainForward(@network)"})
    assert any(not torch.allclose(apart[0][k], apart[1][k], atol=1e-6) for k in apart[0] if k.startswith("resnet"))
    assert any(not torch.allclose(apart[0][k], apart[1][k], atol=1e-6) for k in apart[0] if k.startswith("vnet"))
