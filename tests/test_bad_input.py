"""Bad input through the bundles' own transform chain: every error names the case and the problem."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from bundle_utils import error_messages
from monai_ssl.bundle import find_images, segmentation_transforms_2d


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
