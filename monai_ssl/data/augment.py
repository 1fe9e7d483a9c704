"""The standard 2D training augmentation that every 2D bundle shares (SSL4MIS-style, ultrasound-aware).

Spatial (image and mask together): a left-right flip, a small rotation and scaling. Ultrasound
has its probe at the top, so there is no up-down flip and no 90-degree rotation. Intensity (image
only): gamma, contrast scaling and a brightness shift, mild enough that a lesion's brightness
relative to its surroundings, which the appearance prompts rely on, is kept.

Each transform's probability and range is a module constant, so a results table can name them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.transforms import (
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Transform,
)

__all__ = ["AUGMENTATION_SETTINGS", "augmentation_2d"]

#: name -> (probability, range) of each augmentation; ranges are +- unless stated
AUGMENTATION_SETTINGS: dict[str, tuple[float, object]] = {
    "flip_left_right": (0.5, None),
    "rotate_degrees_and_scale": (0.5, (15.0, 0.1)),  # one affine: rotation +- 15 degrees, zoom 1 +- 0.1
    "gamma": (0.3, (0.7, 1.5)),
    "contrast_scale": (0.3, 0.1),  # intensities x (1 +- 0.1)
    "brightness_shift": (0.3, 0.05),  # intensities + U(-0.05, 0.05) on [0, 1]
}


def augmentation_2d(keys: Sequence[str], label_key: str | None) -> list[Transform]:
    """The random transforms for ``keys`` (image first); the mask (``label_key``) follows the
    spatial ones with nearest-neighbour interpolation and skips the intensity ones."""
    keys = list(keys)
    image_key = keys[0]
    modes = ["nearest" if k == label_key else "bilinear" for k in keys]
    s = AUGMENTATION_SETTINGS
    return [
        RandFlipd(keys=keys, prob=s["flip_left_right"][0], spatial_axis=0),
        RandAffined(
            keys=keys,
            prob=s["rotate_degrees_and_scale"][0],
            rotate_range=math.radians(s["rotate_degrees_and_scale"][1][0]),  # type: ignore[index]
            scale_range=s["rotate_degrees_and_scale"][1][1],  # type: ignore[index]
            mode=modes,
            padding_mode="zeros",
        ),
        RandAdjustContrastd(keys=image_key, prob=s["gamma"][0], gamma=s["gamma"][1]),  # type: ignore[arg-type]
        RandScaleIntensityd(keys=image_key, prob=s["contrast_scale"][0], factors=s["contrast_scale"][1]),  # type: ignore[arg-type]
        RandShiftIntensityd(keys=image_key, prob=s["brightness_shift"][0], offsets=s["brightness_shift"][1]),  # type: ignore[arg-type]
    ]
