"""Per-method objectives for :class:`monai_ssl.engines.SemiSupervisedTrainer`."""

from .mean_teacher import MeanTeacherObjective
from .supervised import SupervisedObjective

__all__ = ["MeanTeacherObjective", "SupervisedObjective"]
