"""The 3D sub-commands of scripts/prepare_data.py (NIH Pancreas-CT, BraTS 2019) on tiny synthetic volumes."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prep() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_script_prepare_data_3d", REPO / "scripts" / "prepare_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)


def _pancreas_case(src: Path, n: int, box: tuple[slice, slice, slice], shape=(90, 80, 70)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    ct = rng.uniform(-1000, 1000, shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[box] = 1
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    affine[:3, 3] = [-100, 50, 20]
    _save(src / "images" / f"PANCREAS_{n:04d}.nii.gz", ct, affine)
    _save(src / "labels" / f"label{n:04d}.nii.gz", label, affine)
    return ct, label


def test_pancreas_clips_scales_and_crops_with_margin(tmp_path: Path, prep: ModuleType) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    ct, _ = _pancreas_case(src, 1, (slice(40, 50), slice(30, 36), slice(10, 20)))
    _pancreas_case(src, 2, (slice(0, 5), slice(70, 80), slice(60, 70)))  # touches the borders: margin clipped
    assert prep.main(["pancreas", "--src", str(src), "--out", str(out)]) == 0

    img = nib.load(out / "imagesTr" / "pancreas_0001.nii.gz")
    lab = nib.load(out / "labelsTr" / "pancreas_0001.nii.gz")
    assert img.shape == lab.shape == (10 + 50, 6 + 50, 10 + 25 + 10)  # z: 10 - 25 < 0 is clipped to 0
    data = np.asarray(img.dataobj)
    assert img.get_data_dtype() == np.float32 and 0.0 <= data.min() and data.max() <= 1.0
    expected = (np.clip(ct[15:75, 5:61, 0:45].astype(np.float32), -120, 240) + 120) / 360
    np.testing.assert_allclose(data, expected, atol=1e-6)
    assert int(np.asarray(lab.dataobj).sum()) == 10 * 6 * 10
    # the crop keeps world coordinates: voxel (0, 0, 0) of the crop is voxel (15, 5, 0) of the source
    np.testing.assert_allclose(img.affine[:3, 3], [-100 + 15 * 0.8, 50 + 5 * 0.8, 20])
    edge = nib.load(out / "imagesTr" / "pancreas_0002.nii.gz")
    assert edge.shape == (5 + 25, 10 + 25, 10 + 25)

    # a rerun skips finished cases; an empty label is an error naming the file
    assert prep.main(["pancreas", "--src", str(src), "--out", str(out)]) == 0
    _save(src / "images" / "PANCREAS_0003.nii.gz", ct, np.eye(4))
    _save(src / "labels" / "label0003.nii.gz", np.zeros(ct.shape, np.uint8), np.eye(4))
    with pytest.raises(prep.PrepareError, match="label0003.nii.gz.*empty"):
        prep.prepare_pancreas(src, out)


def test_pancreas_reports_unpaired_images(tmp_path: Path, prep: ModuleType) -> None:
    src = tmp_path / "src"
    _pancreas_case(src, 1, (slice(40, 50), slice(30, 36), slice(10, 20)), shape=(60, 60, 30))
    _save(src / "images" / "PANCREAS_0007.nii.gz", np.zeros((60, 60, 30), np.int16), np.eye(4))
    with pytest.raises(prep.PrepareError, match="PANCREAS_0007"):
        prep.prepare_pancreas(src, tmp_path / "out")


def _brats_case(src: Path, case: str, seg_values=(1, 2, 4)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(len(case))
    shape = (48, 52, 40)
    image = np.zeros(shape, np.float32)
    image[8:40, 10:44, 5:35] = rng.uniform(100, 500, (32, 34, 30))  # the "brain"
    seg = np.zeros(shape, np.uint8)
    for i, v in enumerate(seg_values):
        seg[20 + 3 * i : 23 + 3 * i, 20:28, 15:20] = v
    folder = src / "HGG" / case
    for modality in ("flair", "t1", "t1ce", "t2"):
        scale = 1.0 if modality == "flair" else 2.0
        _save(folder / f"{case}_{modality}.nii.gz", image * scale, np.eye(4))
    _save(folder / f"{case}_seg.nii.gz", seg, np.eye(4))
    return image, seg


def test_brats_whole_tumour_modality_and_brain_crop(tmp_path: Path, prep: ModuleType) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    image, seg = _brats_case(src, "BraTS19_TEST_1_1")
    assert prep.main(["brats", "--src", str(src), "--out", str(out), "--modality", "flair"]) == 0
    img = nib.load(out / "imagesTr" / "BraTS19_TEST_1_1.nii.gz")
    lab = np.asarray(nib.load(out / "labelsTr" / "BraTS19_TEST_1_1.nii.gz").dataobj)
    assert img.shape == lab.shape == (32, 34, 30)  # the brain's bounding box
    assert set(np.unique(lab)) == {0, 1} and int(lab.sum()) == int((seg > 0).sum())  # labels 1, 2, 4 -> 1
    data = np.asarray(img.dataobj)
    assert abs(float(data.mean())) < 1e-4 and abs(float(data.std()) - 1.0) < 1e-3  # z-score over the brain
    np.testing.assert_allclose(img.affine[:3, 3], [8, 10, 5])

    full = tmp_path / "full"
    assert prep.main(["brats", "--src", str(src), "--out", str(full), "--modality", "t2", "--no-crop"]) == 0
    t2 = nib.load(full / "imagesTr" / "BraTS19_TEST_1_1.nii.gz")
    assert t2.shape == (48, 52, 40) and float(np.asarray(t2.dataobj)[0, 0, 0]) == 0.0


def test_brats_missing_modality_is_named(tmp_path: Path, prep: ModuleType) -> None:
    src = tmp_path / "src"
    _brats_case(src, "BraTS19_TEST_2_1")
    (src / "HGG" / "BraTS19_TEST_2_1" / "BraTS19_TEST_2_1_t1ce.nii.gz").unlink()
    with pytest.raises(prep.PrepareError, match="BraTS19_TEST_2_1_t1ce"):
        prep.prepare_brats(src, tmp_path / "out", modality="t1ce")
    assert prep.main(["brats", "--src", str(src), "--out", str(tmp_path / "o2"), "--modality", "t1ce"]) == 1
