"""Transform chains and helpers shared by the 2D bundle configs.

One place for the preprocessing of every 2D bundle, so that training, validation, evaluation
and inference see identical inputs. Arrays follow MONAI's ``[x, y]`` index order for every
format, and masks are written back by MONAI's writers in the same convention.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import PILReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    MapTransform,
    Resized,
    SaveImaged,
    ScaleIntensityd,
)

from monai_ssl.data.readers import pil_full_depth
from monai_ssl.data.augment import augmentation_2d
from monai_ssl.data.transforms import (
    MIN_IMAGE_SIZE_2D,
    BinarizeLabeld,
    LoadImageCased,
    SqueezeSpatiald,
    ToGrayscaled,
    ValidateCased,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "find_images",
    "inference_transforms_2d",
    "loss_terms",
    "SaveMaskd",
    "resolve_bundle_root",
    "segmentation_transforms_2d",
    "unlabeled_transforms_2d",
]

#: File endings that the inference bundles accept.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz", ".dcm")


def resolve_bundle_root(name: str) -> str:
    """Absolute bundle folder: ``bundles/<name>`` from the repository root, else the current folder."""
    candidate = Path("bundles") / name
    return str(candidate.resolve() if candidate.is_dir() else Path(".").resolve())


def _loader(keys: Sequence[str]) -> LoadImageCased:
    # MONAI's readers and their [x, y] index order for every format (PNG/JPG through PIL, NIfTI
    # through nibabel, DICOM through ITK), so all formats reach the network alike; 16/32-bit
    # images keep every bit (pil_full_depth), and a file that cannot be read raises an error
    # naming it and saying why
    return LoadImageCased(keys=keys, reader=[PILReader(converter=pil_full_depth)], image_only=True)


def _chain_2d(
    keys: Sequence[str], label_key: str | None, spatial_size: int | Sequence[int], augment: bool
) -> Compose:
    """Load, check (naming the case on error), scale to [0, 1], resize, optionally augment.

    Every image and mask must be at least :data:`~monai_ssl.data.transforms.MIN_IMAGE_SIZE_2D`
    pixels a side (checked at load, so training and inference refuse the same files).
    """
    keys = list(keys)
    image_key = keys[0]
    modes = ["bilinear" if k != label_key else "nearest" for k in keys]
    transforms: list = [
        _loader(keys),
        EnsureChannelFirstd(keys=keys),
        SqueezeSpatiald(keys=keys),
        ToGrayscaled(keys=image_key),
        ValidateCased(
            keys=keys,
            binary_label=label_key is not None,
            label_keys=[label_key] if label_key is not None else [],
            check_finite=True,
            min_spatial_size=(MIN_IMAGE_SIZE_2D, MIN_IMAGE_SIZE_2D),
            min_size_hint=f"the 2D bundles need at least {MIN_IMAGE_SIZE_2D} px a side (MIN_IMAGE_SIZE_2D): "
            "is this a thumbnail, a 1-D profile or a broken export?",
        ),
    ]
    if label_key is not None:
        transforms.append(BinarizeLabeld(keys=label_key))
    transforms += [ScaleIntensityd(keys=image_key), Resized(keys=keys, spatial_size=_pair(spatial_size), mode=modes)]
    if augment:
        transforms += augmentation_2d(keys, label_key)
    transforms.append(EnsureTyped(keys=keys, dtype=torch.float32))
    return Compose(transforms)


def segmentation_transforms_2d(
    spatial_size: int | Sequence[int] = 224, augment: bool = False, keys: Sequence[str] = ("image", "label")
) -> Compose:
    """Load an image + binary mask pair, check it, scale to [0, 1] and resize to ``spatial_size``.

    Checks (with errors naming the case): image and mask of the same size, at most two mask
    values, finite intensities. ``augment`` adds the shared 2D augmentation
    (:func:`monai_ssl.data.augment.augmentation_2d`: flips, small rotation and zoom, intensity jitter).
    """
    return _chain_2d(keys, keys[1], spatial_size, augment)


def unlabeled_transforms_2d(spatial_size: int | Sequence[int] = 224, augment: bool = False, key: str = "image") -> Compose:
    """Image-only version of :func:`segmentation_transforms_2d` for the unlabelled stream."""
    return _chain_2d([key], None, spatial_size, augment)


def inference_transforms_2d(spatial_size: int | Sequence[int] = 224, key: str = "image") -> Compose:
    """Preprocessing for inference: the training chain without augmentation; its metadata lets
    ``Invertd`` restore each output to its image's original size."""
    return _chain_2d([key], None, spatial_size, augment=False)


class SaveMaskd(MapTransform):
    """Write each predicted mask next to its input's name, in a format that suits the input.

    NIfTI inputs give ``<name>_mask.nii.gz`` (uint8 0/1, the input's affine); every other input
    (PNG/JPG/BMP/TIFF/DICOM) gives ``<name>_mask.png`` (8-bit 0/255). With
    ``output_ext`` set, every mask uses that format instead.
    """

    def __init__(self, output_dir: str, keys: str = "pred", output_ext: str = "auto") -> None:
        super().__init__(keys)
        self.output_ext = output_ext
        common = dict(keys=keys, output_dir=output_dir, output_postfix="mask", output_dtype="uint8", resample=False,
                      separate_folder=False, print_log=False)
        self.png = SaveImaged(output_ext=".png", scale=255, **common)
        self.nifti = SaveImaged(output_ext=".nii.gz", **common)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Save every key of ``data`` and return ``data`` unchanged."""
        for key in self.key_iterator(dict(data)):
            meta = getattr(data[key], "meta", {})
            source = str(meta.get("filename_or_obj", ""))
            ext = self.output_ext if self.output_ext != "auto" else (".nii.gz" if source.endswith((".nii", ".nii.gz")) else ".png")
            if ext not in (".png", ".nii.gz"):
                raise ValueError(f"output_ext must be 'auto', '.png' or '.nii.gz', got {ext!r}")
            if ext == ".png":
                meta["original_channel_dim"] = 0  # the mask is (1, *spatial), whatever the input's layout was
            data = (self.png if ext == ".png" else self.nifti)(data)
        return dict(data)


def find_images(folder: str | os.PathLike, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[dict[str, str]]:
    """List ``{"image": path}`` for every image file in ``folder`` (sorted); error if there is none."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.name.lower().endswith(tuple(suffixes)))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(suffixes)}) found in {root}")
    return [{"image": str(p)} for p in files]


def loss_terms(output: Any) -> dict[str, float]:
    """``output_transform`` for StatsHandler/TensorBoard: the total loss and every ``loss_*`` term."""
    if isinstance(output, list):
        output = output[0]
    if not isinstance(output, Mapping):
        raise TypeError(f"expected the trainer output dict, got {type(output).__name__}")
    return {k: float(v) for k, v in output.items() if k == "loss" or str(k).startswith("loss_")}


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    if len(size) != 2:
        raise ValueError(f"2D spatial_size needs 2 entries, got {list(size)}")
    return (int(size[0]), int(size[1]))
