"""Ignite handlers for semi-supervised training: teachers, schedules, checkpoints."""

from .checkpoint import (
    BestModelSaver,
    ResumeCheckpoint,
    RNGState,
    TrainedModelLoader,
    atomic_torch_save,
    how_to_train,
    require_trained_model,
    train_command,
)
from .schedules import RampUp, linear_rampup, sigmoid_rampup
from .teachers import EMATeacher, freeze, make_teacher

__all__ = [
    "BestModelSaver",
    "EMATeacher",
    "RNGState",
    "RampUp",
    "ResumeCheckpoint",
    "TrainedModelLoader",
    "how_to_train",
    "require_trained_model",
    "atomic_torch_save",
    "freeze",
    "linear_rampup",
    "make_teacher",
    "sigmoid_rampup",
    "train_command",
]
