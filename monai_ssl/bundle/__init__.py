"""Building blocks that the bundle configs share (transform chains, paths, loss-term logging)."""

from .components import (
    IMAGE_SUFFIXES,
    SaveMaskd,
    find_images,
    inference_transforms_2d,
    loss_terms,
    resolve_bundle_root,
    segmentation_transforms_2d,
    unlabeled_transforms_2d,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "SaveMaskd",
    "find_images",
    "inference_transforms_2d",
    "loss_terms",
    "resolve_bundle_root",
    "segmentation_transforms_2d",
    "unlabeled_transforms_2d",
]
