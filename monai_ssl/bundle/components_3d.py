"""Transform chains and helpers shared by the 3D bundle configs (``dual_network_3d``).

Volumes are read as stored (NIfTI through nibabel, ``.h5``/``.hdf5`` through
:class:`~monai_ssl.data.readers.H5VolumeReader`: ``image`` and ``label`` datasets of the same
file), made channel-first, checked (errors name the case), optionally z-score normalised (the
UA-MT / MCF ``mri_norm2.h5`` preprocessing that the authors' code trains on), labels binarised,
padded to the crop size and cropped at random (the *same* crop for image and label), the
authors' only augmentation; flips are optional. Validation / inference chains do not crop: the
sliding-window inferer pads volumes smaller than its window and crops the output back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import SlidingWindowInferer
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    NormalizeIntensityd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandSpatialCropd,
    SpatialPadd,
)

from monai_ssl.data.readers import H5VolumeReader
from monai_ssl.data.transforms import BinarizeLabeld, LoadImageCased, ValidateCased
from monai_ssl.inference.sliding_window import SlidingWindowPreset, make_sliding_window_inferer

__all__ = [
    "VOLUME_SUFFIXES",
    "CROP_MODES",
    "find_volumes",
    "inference_transforms_3d",
    "segmentation_transforms_3d",
    "sliding_window_inferer_3d",
    "unlabeled_transforms_3d",
    "validation_transforms_3d",
]

#: File endings that the 3D bundles read.
VOLUME_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".h5", ".hdf5")
#: ``"random"``: uniform random crop (``RandSpatialCropd``, the authors' ``RandomCrop``);
#: ``"pos_neg"``: centre on foreground / background with equal odds (``RandCropByPosNegLabeld``).
CROP_MODES: tuple[str, ...] = ("random", "pos_neg")


def _triple(size: int | Sequence[int], name: str) -> tuple[int, int, int]:
    if isinstance(size, int):
        return (size, size, size)
    if len(size) != 3 or any(int(s) < 1 for s in size):
        raise ValueError(f"{name} needs 3 positive sizes, got {list(size)}")
    return (int(size[0]), int(size[1]), int(size[2]))


def _load(keys: Sequence[str]) -> list:
    """One loader per key: an h5 file gives its ``image`` / ``label`` dataset, NIfTI is read by nibabel;
    an unreadable file raises an error naming it (:class:`~monai_ssl.data.transforms.LoadImageCased`)."""
    loaders = []
    for k in keys:
        loader = LoadImageCased(keys=k, image_only=True)  # MONAI's readers, picked by file suffix
        loader.register(H5VolumeReader(dataset="label" if k == "label" else "image"))
        loaders.append(loader)
    return loaders


def _base(keys: Sequence[str], label_key: str | None, normalize: bool) -> list:
    """Load, channel first, check (naming the case), binarise the label, z-score the image."""
    keys = list(keys)
    transforms: list = [
        *_load(keys),
        EnsureChannelFirstd(keys=keys, channel_dim="no_channel"),
        ValidateCased(keys=keys, binary_label=label_key is not None, check_finite=True),
    ]
    if label_key is not None:
        transforms.append(BinarizeLabeld(keys=label_key))
    if normalize:
        transforms.append(NormalizeIntensityd(keys=keys[0]))
    transforms.append(EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True))
    return transforms


def _crop(keys: Sequence[str], label_key: str | None, crop_size: tuple[int, int, int], crop_mode: str,
          flip: bool) -> list:
    if crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {crop_mode!r}")
    keys = list(keys)
    transforms: list = [SpatialPadd(keys=keys, spatial_size=crop_size, mode="constant")]
    if crop_mode == "pos_neg" and label_key is not None:
        transforms.append(RandCropByPosNegLabeld(keys=keys, label_key=label_key, spatial_size=crop_size, pos=1, neg=1,
                                                 num_samples=1, allow_smaller=False))
    else:
        transforms.append(RandSpatialCropd(keys=keys, roi_size=crop_size, random_size=False))
    if flip:
        transforms += [RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
    return transforms


def segmentation_transforms_3d(
    crop_size: int | Sequence[int] = (112, 112, 80),
    normalize: bool = True,
    crop_mode: str = "random",
    flip: bool = False,
    keys: Sequence[str] = ("image", "label"),
) -> Compose:
    """Labelled training chain: load, check, binarise, z-score, pad to ``crop_size``, one shared random crop.

    Args:
        crop_size: crop per spatial axis (LA 112x112x80; Pancreas / BraTS 96^3); each must be
            divisible by 16 for the dual network.
        normalize: z-score the image over the volume (as the authors' preprocessing).
        crop_mode: ``"random"`` (the authors' ``RandomCrop``) or ``"pos_neg"``.
        flip: add random flips along each axis (not in the authors' code).
        keys: image and label keys.
    """
    crop = _triple(crop_size, "crop_size")
    return Compose(_base(keys, keys[1], normalize) + _crop(keys, keys[1], crop, crop_mode, flip))


def unlabeled_transforms_3d(
    crop_size: int | Sequence[int] = (112, 112, 80), normalize: bool = True, flip: bool = False, key: str = "image"
) -> Compose:
    """Image-only chain for the unlabelled stream: as :func:`segmentation_transforms_3d`, uniform random crop."""
    crop = _triple(crop_size, "crop_size")
    return Compose(_base([key], None, normalize) + _crop([key], None, crop, "random", flip))


def validation_transforms_3d(normalize: bool = True, keys: Sequence[str] = ("image", "label")) -> Compose:
    """Whole-volume chain for validation / evaluation: load, check, binarise, z-score; no crop."""
    return Compose(_base(keys, keys[1], normalize))


def inference_transforms_3d(normalize: bool = True, key: str = "image") -> Compose:
    """Whole-volume image chain for inference; no spatial change, so outputs keep the input's grid and affine."""
    return Compose(_base([key], None, normalize))


def sliding_window_inferer_3d(
    preset: str = "LA",
    roi_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    sw_batch_size: int = 4,
    progress: bool = False,
) -> SlidingWindowInferer:
    """The authors' sliding window by preset id (``"LA"``, ``"Pancreas"``, ``"BraTS"``), or an explicit window.

    ``roi_size`` and ``stride`` (both or neither) replace the preset's window and stride.
    """
    if (roi_size is None) != (stride is None):
        raise ValueError("give both roi_size and stride, or neither (to use the preset)")
    spec: str | SlidingWindowPreset = preset
    if roi_size is not None and stride is not None:
        spec = SlidingWindowPreset(tuple(int(r) for r in roi_size), tuple(int(s) for s in stride))
    return make_sliding_window_inferer(spec, sw_batch_size=sw_batch_size, progress=progress)


def find_volumes(folder: str, suffixes: Sequence[str] = VOLUME_SUFFIXES) -> list[dict[str, str]]:
    """List ``{"image": path}`` for every NIfTI / h5 volume in ``folder`` (sorted); error if there is none."""
    from monai_ssl.bundle.components import find_images

    return find_images(folder, suffixes)
