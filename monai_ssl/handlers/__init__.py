"""Ignite handlers for semi-supervised training: teachers, schedules, checkpoints."""

from .checkpoint import BestModelSaver, ResumeCheckpoint, RNGState, atomic_torch_save
from .schedules import RampUp, linear_rampup, sigmoid_rampup
from .teachers import EMATeacher, freeze, make_teacher

__all__ = [
    "BestModelSaver",
    "EMATeacher",
    "RNGState",
    "RampUp",
    "ResumeCheckpoint",
    "atomic_torch_save",
    "freeze",
    "linear_rampup",
    "make_teacher",
    "sigmoid_rampup",
]
