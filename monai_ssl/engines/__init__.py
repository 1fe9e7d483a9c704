"""Training engines."""

from .trainer import Objective, SemiSupervisedTrainer, autocast_context

__all__ = ["Objective", "SemiSupervisedTrainer", "autocast_context"]
