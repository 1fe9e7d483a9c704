"""MONAI image readers for formats MONAI does not read natively."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from monai.data import ImageReader
from monai.data.utils import is_supported_format
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

__all__ = ["H5VolumeReader", "read_h5_volume"]

PathLike = str | Path


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
