"""Bad input through the bundles' own transform chain: every error names the case and the problem."""

from __future__ import annotations

import traceback
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from bundle_utils import error_messages
from monai_ssl.bundle import find_images, inference_transforms_2d, segmentation_transforms_2d, unlabeled_transforms_2d
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
    assert "rgbmask_case" in text and "'label' has 3 channels" in text and "single-channel" in text, text


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
