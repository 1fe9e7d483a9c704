"""Image reading shared by the bundles and APPG: full-bit-depth 2D images, HDF5 volumes, and
errors that say why a file is not a readable image.

2D images (PNG/JPG/BMP/TIFF) go through PIL. 16-bit and 32-bit images (PIL modes ``I;16*``,
``I``, ``F``) are read with every bit: PIL's ``convert("L")`` would clip them to 0..255 (a
16-bit ultrasound with values 1000..5000 becomes a constant 255 image). The bundles' transform
chain then scales each image to [0, 1] by its own minimum and maximum (``ScaleIntensityd``);
code that needs 8 bits (APPG's proposer and LiteMedSAM, ``scripts/prepare_data.py``) uses
:func:`read_gray_uint8`, which applies the same min-max scaling to 0..255.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image
from monai.data import ImageReader
from monai.data.utils import is_supported_format
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

__all__ = [
    "H5VolumeReader",
    "pil_full_depth",
    "read_gray_uint8",
    "read_h5_volume",
    "scale_to_uint8",
    "unreadable_reason",
]

PathLike = str | Path

#: PIL modes with more than 8 bits per pixel (16-bit PNG/TIFF, 32-bit integer and float TIFF).
WIDE_PIL_MODES: tuple[str, ...] = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
#: PIL modes converted to 8-bit gray by :func:`pil_full_depth` (palette, 1-bit, gray + alpha).
_TO_GRAY_MODES: tuple[str, ...] = ("P", "PA", "1", "LA", "La")
#: PIL modes converted to RGB by :func:`pil_full_depth` (other colour spaces).
_TO_RGB_MODES: tuple[str, ...] = ("CMYK", "YCbCr", "LAB", "HSV")
#: File endings read through PIL.
_PIL_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")


def pil_full_depth(image: Image.Image) -> Image.Image:
    """PIL converter (for MONAI's ``PILReader``) that keeps every bit of the pixel values.

    16-bit images (``I;16``, ``I;16B``, ...) become 32-bit integer ``I`` images with the same
    values; ``I`` and ``F`` pass unchanged; palette/1-bit/gray+alpha images become 8-bit gray
    ``L``; CMYK/YCbCr/LAB/HSV become RGB; ``L``, ``RGB`` and ``RGBA`` pass unchanged (the
    transform chain turns RGB(A) into one luminance channel).
    """
    if image.mode.startswith("I;16"):
        # PIL's own I;16 -> I conversion is wrong for the big-endian variant; numpy reads every variant
        return Image.fromarray(np.asarray(image).astype(np.int32))
    if image.mode in _TO_GRAY_MODES:
        return image.convert("L")
    if image.mode in _TO_RGB_MODES:
        return image.convert("RGB")
    return image


def scale_to_uint8(array: np.ndarray, where: str = "image") -> np.ndarray:
    """Min-max scale ``array`` to uint8 0..255 (uint8 input is returned as is; a constant image gives zeros).

    The same per-image scaling as the bundles' ``ScaleIntensityd``, quantised to 8 bits, so that
    order is kept and no value saturates whatever the bit depth. Raises ``ValueError`` naming
    ``where`` when the array holds NaN or Inf.
    """
    if array.dtype == np.uint8:
        return array
    values = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{where}: {int((~np.isfinite(values)).sum())} non-finite value(s) (NaN/Inf)")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def read_gray_uint8(path: PathLike) -> np.ndarray:
    """A 2D image file as an ``(H, W)`` uint8 gray array in natural row order (row = y).

    8-bit images are converted by PIL's ``convert("L")`` (BT.601 luminance for RGB, exactly the
    stored values for gray); 16/32-bit and float images are read at full depth and min-max
    scaled by :func:`scale_to_uint8`. Raises ``OSError``/``ValueError`` naming the file.
    """
    with Image.open(path) as img:
        if img.mode in WIDE_PIL_MODES:
            return scale_to_uint8(np.asarray(pil_full_depth(img)), str(path))
        try:
            return np.asarray(img.convert("L"))
        except ValueError as err:
            raise ValueError(f"{path}: cannot convert PIL mode {img.mode!r} to gray: {err}") from err


def _message(error: BaseException) -> str:
    """``error``'s message on one line (its class name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def _innermost_message(error: BaseException | None) -> str:
    """The message of the deepest exception in ``error``'s ``raise ... from`` chain."""
    message = ""
    while error is not None:
        message = _message(error)
        error = error.__cause__
    return message


def unreadable_reason(path: PathLike, error: BaseException | None = None) -> str:
    """Why ``path`` could not be read as an image, in a few words (for error messages).

    Checks existence and size first, then asks the format's own library (PIL for PNG/JPG/BMP/
    TIFF, nibabel for NIfTI, h5py for HDF5) for its message, else falls back to the innermost
    message of ``error``. MONAI's "cannot find a suitable reader ... install the reader
    libraries" is replaced by what the reader actually said.
    """
    p = Path(path)
    if not p.exists():
        return "the file does not exist"
    if p.is_dir():
        return "it is a folder, not a file"
    size = p.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    name = p.name.lower()
    try:
        if name.endswith(_PIL_SUFFIXES):
            with Image.open(p) as img:
                img.load()
        elif name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            np.asanyarray(nib.load(str(p)).dataobj)
        elif name.endswith((".h5", ".hdf5")):
            with h5py.File(p, "r"):
                pass
        else:
            return _innermost_message(error) or "no reader could read it"
    except Exception as err:  # noqa: BLE001 - any reader failure is the reason we report
        return f"{_message(err)} (file size {size} bytes)"
    return _innermost_message(error) or "the reader failed"


def _geometry_from_attrs(attrs_list: Sequence[h5py.AttributeManager], ndim: int, where: str) -> np.ndarray:
    """Affine from an ``affine`` (4x4) or ``spacing`` (ndim values) attribute, else identity.

    The first attribute set that has either key wins (the dataset's own attributes first,
    then the file's).
    """
    affine = np.eye(4, dtype=np.float64)
    for attrs in attrs_list:
        if "affine" in attrs:
            value = np.asarray(attrs["affine"], dtype=np.float64)
            if value.shape != (4, 4):
                raise ValueError(f"{where}: attribute 'affine' must be 4x4, got shape {value.shape}")
            return value
        if "spacing" in attrs:
            spacing = np.asarray(attrs["spacing"], dtype=np.float64).ravel()
            if spacing.size != ndim or ndim > 3 or np.any(spacing <= 0):
                raise ValueError(f"{where}: attribute 'spacing' must be {ndim} positive values, got {spacing.tolist()}")
            affine[np.arange(ndim), np.arange(ndim)] = spacing
            return affine
    return affine


def read_h5_volume(path: PathLike, dataset: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Read ``dataset`` of an HDF5 file as stored (LA community files: (W, H, D)) and its affine.

    The affine is identity (1 mm spacing) unless the dataset or the file has an ``affine`` or
    ``spacing`` attribute. Raises ``FileNotFoundError``/``KeyError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HDF5 file {path} does not exist")
    with h5py.File(path, "r") as f:
        if dataset not in f:
            raise KeyError(f"HDF5 file {path} has no dataset {dataset!r}; it has {sorted(f.keys())}")
        node = f[dataset]
        if not isinstance(node, h5py.Dataset):
            raise KeyError(f"HDF5 file {path}: {dataset!r} is a group, not a dataset")
        array = np.asarray(node[()])
        affine = _geometry_from_attrs([node.attrs, f.attrs], array.ndim, f"HDF5 file {path} dataset {dataset!r}")
    return array, affine


class H5VolumeReader(ImageReader):
    """Read one dataset of ``.h5``/``.hdf5`` files, e.g. the community LA ``mri_norm2.h5``.

    Use as ``LoadImaged(keys="image", reader=H5VolumeReader(dataset="image"))`` and
    ``LoadImaged(keys="label", reader=H5VolumeReader(dataset="label"))``. Arrays are returned
    in the stored axis order (the community stores (W, H, D), matching NIfTI's x, y, z) without
    a channel dim; the affine is identity (spacing 1) unless an ``affine``/``spacing``
    attribute is present. Several files are stacked as channels.
    """

    def __init__(self, dataset: str = "image") -> None:
        super().__init__()
        self.dataset = dataset

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Return True when every file name ends with ``.h5`` or ``.hdf5``."""
        return is_supported_format(filename, ["h5", "hdf5"])

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        """Read the configured dataset (or ``kwargs['dataset']``) of each file: ``[(array, affine), ...]``."""
        dataset = kwargs.get("dataset", self.dataset)
        return [read_h5_volume(name, dataset) for name in ensure_tuple(data)]

    def get_data(self, img: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, dict]:
        """Return the array (stacked on a new first axis for several files) and its meta dict."""
        arrays = [a for a, _ in img]
        affine = img[0][1]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"H5VolumeReader: cannot stack files of different shapes {sorted(shapes)}")
        meta: dict = {
            MetaKeys.AFFINE: affine.copy(),
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(arrays[0].shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if len(arrays) == 1 else 0,
        }
        return (arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=0)), meta
