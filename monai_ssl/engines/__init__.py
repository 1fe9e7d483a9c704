"""Training engines and multi-stage pipelines."""

from .stages import APPGStage, StageArtifact, StaticTeacherWarmup, component_description, copy_weights
from .trainer import Objective, SemiSupervisedTrainer, autocast_context

__all__ = [
    "APPGStage",
    "Objective",
    "SemiSupervisedTrainer",
    "StageArtifact",
    "StaticTeacherWarmup",
    "autocast_context",
    "component_description",
    "copy_weights",
]
