"""Bad input through the bundles' own transform chain: every error names the case and the problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from PIL import Image

from bundle_utils import REPO_ROOT, config_path, error_messages, make_workflow, tiny_overrides
from monai_ssl.bundle import find_images, inference_transforms_2d, segmentation_transforms_2d, unlabeled_transforms_2d
from monai_ssl.data import synthetic_dataset
from monai_ssl.data.transforms import MIN_IMAGE_SIZE_2D
from monai_ssl.pseudo.appg import read_gray8


def _error_chain(exc: BaseException) -> str:
    return "\n".join(error_messages(exc))


def _pair(tmp_path: Path, image: np.ndarray, mask: np.ndarray, name: str = "case7") -> dict[str, str]:
    img_path, lab_path = tmp_path / f"{name}.png", tmp_path / f"{name}_mask.png"
    Image.fromarray(image).save(img_path)
    Image.fromarray(mask).save(lab_path)
    return {"image": str(img_path), "label": str(lab_path)}


def _fails_with(case: dict[str, str], *needles: str) -> None:
    with pytest.raises(Exception) as info:
        segmentation_transforms_2d(64)(case)
    text = _error_chain(info.value)
    for needle in needles:
        assert needle in text, f"{needle!r} not in error:\n{text}"


def test_good_pair_passes(tmp_path: Path) -> None:
    mask = np.zeros((50, 60), np.uint8)
    mask[10:20, 10:30] = 255
    out = segmentation_transforms_2d(64)(_pair(tmp_path, np.full((50, 60), 90, np.uint8), mask))
    assert tuple(out["image"].shape) == (1, 64, 64) and set(np.unique(out["label"].numpy())) == {0.0, 1.0}


def test_size_mismatch_is_named(tmp_path: Path) -> None:
    _fails_with(_pair(tmp_path, np.zeros((50, 60), np.uint8), np.zeros((40, 60), np.uint8)), "case7", "(60, 50)", "(60, 40)")


def test_mask_with_more_than_two_values_is_named(tmp_path: Path) -> None:
    mask = np.zeros((50, 60), np.uint8)
    mask[:10], mask[10:20] = 128, 255
    _fails_with(_pair(tmp_path, np.zeros((50, 60), np.uint8), mask), "case7", "128")


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    case = _pair(tmp_path, np.zeros((50, 60), np.uint8), np.zeros((50, 60), np.uint8))
    Path(case["image"]).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    _fails_with(case, "case7.png")


def test_nan_intensities_are_named(tmp_path: Path) -> None:
    image = np.ones((50, 60), np.float32)
    image[3, 4] = np.nan
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "nan_case.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((50, 60), np.uint8), np.eye(4)), tmp_path / "nan_case_mask.nii.gz")
    case = {"image": str(tmp_path / "nan_case.nii.gz"), "label": str(tmp_path / "nan_case_mask.nii.gz")}
    _fails_with(case, "nan_case", "NaN")


def test_inference_folder_without_images_is_named(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        find_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_images(tmp_path / "missing")


# ------------------------------------------------------------------- bit depth (16/32-bit, float)
def _ramp(low: float, high: float, dtype: type, shape: tuple[int, int] = (32, 48)) -> np.ndarray:
    """A left-to-right intensity ramp from ``low`` to ``high`` (distinct values per column)."""
    return np.tile(np.linspace(low, high, shape[1]), (shape[0], 1)).astype(dtype)


@pytest.mark.parametrize(("suffix", "dtype", "high"), [(".png", np.uint16, 5000), (".tif", np.int32, 70000)])
def test_high_bit_depth_image_keeps_its_intensities(tmp_path: Path, suffix: str, dtype: type, high: int) -> None:
    # PIL's convert("L") clips every value above 255: a 1000..5000 image became a constant 255 image
    image = _ramp(1000, high, dtype)
    Image.fromarray(image).save(tmp_path / f"deep{suffix}")
    mask = np.zeros(image.shape, np.uint8)
    mask[5:15, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / "deep_mask.png")
    case = {"image": str(tmp_path / f"deep{suffix}"), "label": str(tmp_path / "deep_mask.png")}
    for out in (segmentation_transforms_2d((48, 32))(case), inference_transforms_2d((48, 32))({"image": case["image"]})):
        pixels = out["image"][0].numpy()  # [x, y]: x = column
        assert pixels.shape == (48, 32) and pixels.std() > 0.2, "image loaded as (nearly) constant"
        np.testing.assert_allclose(pixels, ((image.T - 1000.0) / (high - 1000.0)), atol=1e-5)  # order and scale kept


@pytest.mark.parametrize(("suffix", "dtype"), [(".png", np.uint16), (".tif", np.int32), (".tif", np.float32)])
def test_appg_reads_high_bit_depth_images_without_clipping(tmp_path: Path, suffix: str, dtype: type) -> None:
    image = _ramp(1000, 5000, dtype)
    Image.fromarray(image).save(tmp_path / f"deep{suffix}")
    gray = read_gray8(tmp_path / f"deep{suffix}")
    assert gray.dtype == np.uint8 and gray.shape == image.shape
    assert gray.min() == 0 and gray.max() == 255 and np.all(np.diff(gray[0].astype(int)) >= 0)
    assert len(np.unique(gray)) == image.shape[1]  # every column keeps its own value


# ----------------------------------------------------------------------- unreadable image files
def _broken_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, the reason its error must give)."""
    good = tmp_path / "good.png"
    Image.fromarray(np.full((40, 40), 100, np.uint8)).save(good)
    files = {
        "empty": (tmp_path / "empty.png", b"", "empty (0 bytes)"),
        "truncated": (tmp_path / "truncated.png", good.read_bytes()[:60], "truncated"),
        "text": (tmp_path / "notes.png", b"these are my notes, not an image\n", "cannot identify image file"),
        "nifti": (tmp_path / "scan.nii.gz", b"not gzip", "not a gzip file"),
    }
    for path, content, _ in files.values():
        path.write_bytes(content)
    return {k: (p, reason) for k, (p, _, reason) in files.items()}


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "nifti"])
def test_unreadable_file_error_names_it_and_says_why(tmp_path: Path, kind: str) -> None:
    path, reason = _broken_files(tmp_path)[kind]
    mask = tmp_path / "mask.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(mask)
    chains = {
        "training": lambda: segmentation_transforms_2d(64)({"image": str(path), "label": str(mask), "case_id": "c1"}),
        "unlabelled": lambda: unlabeled_transforms_2d(64)({"image": str(path)}),
        "inference": lambda: inference_transforms_2d(64)({"image": str(path)}),
    }
    for chain, run in chains.items():
        with pytest.raises(Exception) as info:
            run()
        text = _error_chain(info.value)
        assert f"file {path} is not a readable image" in text and reason in text, f"{chain}:\n{text}"
        shown = "".join(traceback.format_exception(info.value))  # what a user sees
        assert "install the reader libraries" not in shown, f"{chain}:\n{shown}"


# ------------------------------------------------------------------------------ masks and sizes
def test_rgb_mask_is_named_at_load(tmp_path: Path) -> None:
    rgb = np.zeros((50, 60, 3), np.uint8)
    rgb[10:20, 10:30] = 255
    case = _pair(tmp_path, np.full((50, 60), 90, np.uint8), rgb, name="rgbmask_case")
    with pytest.raises(Exception) as info:
        segmentation_transforms_2d(64)(dict(case, case_id="rgbmask_case"))
    text = _error_chain(info.value)
    assert "rgbmask_case" in text and f"'label' ({case['label']}) has 3 channels" in text and "single-channel" in text, text


@pytest.mark.parametrize("shape", [(50, 1), (1, 50), (12, 80)])
def test_tiny_image_is_refused_at_load_in_training_and_inference(tmp_path: Path, shape: tuple[int, int]) -> None:
    assert min(shape) < MIN_IMAGE_SIZE_2D
    case = _pair(tmp_path, np.full(shape, 90, np.uint8), np.zeros(shape, np.uint8), name="sliver")
    for run in (lambda: segmentation_transforms_2d(64)(case), lambda: inference_transforms_2d(64)({"image": case["image"]})):
        with pytest.raises(Exception) as info:
            run()
        text = _error_chain(info.value)
        assert "sliver.png" in text and f"at least {MIN_IMAGE_SIZE_2D} px" in text, text
    ok = _pair(tmp_path, np.full((MIN_IMAGE_SIZE_2D, MIN_IMAGE_SIZE_2D), 90, np.uint8),
               np.zeros((MIN_IMAGE_SIZE_2D, MIN_IMAGE_SIZE_2D), np.uint8), name="smallest")
    assert tuple(segmentation_transforms_2d(64)(ok)["image"].shape) == (1, 64, 64)


# --------------------------------------------------------- inference over a folder with a bad file
def test_inference_skips_a_bad_file_processes_the_rest_and_exits_nonzero(tmp_path: Path) -> None:
    from monai_ssl.networks import ResNetUNet

    torch.manual_seed(0)
    (tmp_path / "models").mkdir()
    torch.save(ResNetUNet(spatial_dims=2, in_channels=1, out_channels=1, backbone="resnet18").state_dict(),
               tmp_path / "models" / "model.pt")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "a_broken.png").write_bytes(b"")  # sorts first: the old run aborted before any mask
    for name, value in (("b_scan", 80), ("c_scan", 160)):
        Image.fromarray(_ramp(0, value, np.uint8, (40, 50))).save(inputs / f"{name}.png")
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", config_path("supervised", "inference.json"),
        "--meta_file", config_path("supervised", "metadata.json"),
        "--logging_file", config_path("supervised", "logging.conf"),
        f"--bundle_root={tmp_path}", f"--dataset_dir={inputs}", "--spatial_size=64", "--encoder=resnet18",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert sorted(p.name for p in (tmp_path / "inference").iterdir()) == ["b_scan_mask.png", "c_scan_mask.png"], output
    summary = result.stderr.strip().splitlines()[-2:]  # the last lines: the summary, not a traceback
    assert summary[0].startswith("inference skipped 1 of 3 image(s)"), output
    assert str(inputs / "a_broken.png") in summary[1] and "empty (0 bytes)" in summary[1], output
    assert "Traceback" not in result.stderr, output


def test_3d_inference_uses_the_same_skip_and_report(tmp_path: Path) -> None:
    from monai_ssl.inference import SkippedCasesExit
    from monai_ssl.networks import DualNetwork3D

    tiny = {"n_filters": 4, "resnet_layers": [1, 1, 1, 1]}
    torch.manual_seed(0)
    (tmp_path / "models").mkdir()
    torch.save(DualNetwork3D(in_channels=1, num_classes=2, **tiny).state_dict(), tmp_path / "models" / "model.pt")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((32, 32, 24)).astype(np.float32), np.eye(4)),
             inputs / "good.nii.gz")
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b truncated")
    wf = make_workflow("dual_network_3d", ["inference.json"], "inference", bundle_root=str(tmp_path),
                       dataset_dir=str(inputs), sw_roi_size=[32, 32, 32], sw_stride=[16, 16, 16], **tiny)
    wf.initialize()
    with pytest.raises(SkippedCasesExit) as info:
        wf.run()
    assert [name for name, _ in info.value.failures] == [str(inputs / "broken.nii.gz")]
    assert "not a readable image" in info.value.failures[0][1]
    assert sorted(p.name for p in (tmp_path / "inference").iterdir()) == ["good_mask.nii.gz"]


# ------------------------------------------------------------------------- empty datalist lists
def _datalist_with(dataset_dir: str, dest: Path, **lists: list) -> Path:
    """A copy of ``dataset_dir``'s datalist with some lists replaced (e.g. ``unlabeled=[]``)."""
    content = json.loads(Path(dataset_dir, "datalist.json").read_text())
    content.update(lists)
    dest.write_text(json.dumps(content))
    return dest


def _tiny_3d(bundle_root: Path) -> dict[str, Any]:
    """dual_network_3d overrides for a run of seconds (as tests/test_bundle_dual_network_3d.py)."""
    return {
        "bundle_root": str(bundle_root),
        "dataset_dir": synthetic_dataset("vol3d", n_labeled=4, n_unlabeled=4, n_validation=2, n_test=2, size=32),
        "crop_size": [32, 32, 32], "sw_roi_size": [32, 32, 32], "sw_stride": [16, 16, 16],
        "max_iterations": 2, "epoch_length": 2, "amp": False, "n_filters": 4, "resnet_layers": [1, 1, 1, 1],
    }


@pytest.mark.parametrize("bundle", ["mean_teacher", "dual_teacher", "dual_network_3d"])
def test_empty_unlabelled_list_trains_supervised_with_a_warning(bundle: str, tmp_path: Path) -> None:
    overrides = _tiny_3d(tmp_path) if bundle == "dual_network_3d" else tiny_overrides(tmp_path, epoch_length=2)
    overrides["datalist"] = str(_datalist_with(overrides["dataset_dir"], tmp_path / "datalist.json", unlabeled=[]))
    if bundle == "dual_teacher":
        overrides["appg_dir"] = str(tmp_path / "appg")  # not the tests' shared store
    wf = make_workflow(bundle, ["train.json"], **overrides)
    wf.initialize()
    unlabelled_batches: list[bool] = []
    with pytest.warns(UserWarning, match="no unlabelled data"):
        trainer = wf.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: unlabelled_batches.append(trainer.unlabeled_data_loader is not None))
    wf.run()
    assert unlabelled_batches and not any(unlabelled_batches)
    assert (tmp_path / "models" / "model.pt").is_file()
    if bundle == "dual_teacher":  # APPG had nothing to label: skipped, no pseudo-label store, no static teacher
        assert not (tmp_path / "appg").exists() and not (tmp_path / "models" / "static_teacher.pt").exists()


def test_empty_validation_list_is_an_error_at_start_naming_the_datalist(tmp_path: Path) -> None:
    overrides = tiny_overrides(tmp_path)
    datalist = _datalist_with(overrides["dataset_dir"], tmp_path / "no_val.json", validation=[])
    wf = make_workflow("supervised", ["train.json"], **{**overrides, "datalist": str(datalist)})
    iterations: list[int] = []
    with pytest.raises(Exception) as info:
        wf.initialize()
        wf.parser.get_parsed_content("train#trainer").add_event_handler(
            Events.ITERATION_COMPLETED, lambda e: iterations.append(e.state.iteration))
        wf.run()
    text = _error_chain(info.value)
    assert str(datalist) in text and "'validation'" in text and "empty" in text, text
    assert iterations == [] and not (tmp_path / "models" / "model.pt").exists()
