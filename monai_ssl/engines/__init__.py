"""Training engines and multi-stage pipelines."""

from .stages import APPGStage, StageArtifact, StaticTeacherWarmup, component_description, copy_weights, seed_stage, stage_seed
from .trainer import SKIPPED_STEPS_WARNING, Objective, SemiSupervisedTrainer, UnlabeledDataLoader, autocast_context

__all__ = [
    "APPGStage",
    "SKIPPED_STEPS_WARNING",
    "Objective",
    "SemiSupervisedTrainer",
    "StageArtifact",
    "StaticTeacherWarmup",
    "UnlabeledDataLoader",
    "autocast_context",
    "component_description",
    "copy_weights",
    "seed_stage",
    "stage_seed",
]
