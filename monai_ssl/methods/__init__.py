"""Per-method objectives for :class:`monai_ssl.engines.SemiSupervisedTrainer`."""

from .dual_network_3d import DualNetwork3DObjective
from .dual_teacher import DualTeacherObjective, SoftBCEDiceLoss
from .mean_teacher import MeanTeacherObjective
from .supervised import SupervisedObjective

__all__ = ["DualNetwork3DObjective", "DualTeacherObjective", "MeanTeacherObjective", "SoftBCEDiceLoss", "SupervisedObjective"]
