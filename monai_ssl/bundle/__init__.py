"""Building blocks that the bundle configs share (transform chains, paths, loss-term logging, model
cards, coercion of command-line settings)."""

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
from .model_card import ModelCard, ModelCardWriter
from .components_3d import (
    VOLUME_SUFFIXES,
    find_volumes,
    inference_transforms_3d,
    segmentation_transforms_3d,
    sliding_window_inferer_3d,
    unlabeled_transforms_3d,
    validation_transforms_3d,
)
from .settings import as_bool, as_float, as_int, as_prompts, as_size, as_weights, log_settings

__all__ = [
    "IMAGE_SUFFIXES",
    "ModelCard",
    "ModelCardWriter",
    "SaveMaskd",
    "find_images",
    "inference_transforms_2d",
    "loss_terms",
    "resolve_bundle_root",
    "segmentation_transforms_2d",
    "unlabeled_transforms_2d",
    "VOLUME_SUFFIXES",
    "find_volumes",
    "inference_transforms_3d",
    "segmentation_transforms_3d",
    "sliding_window_inferer_3d",
    "unlabeled_transforms_3d",
    "validation_transforms_3d",
    "as_bool",
    "as_float",
    "as_int",
    "as_prompts",
    "as_size",
    "as_weights",
    "log_settings",
]
