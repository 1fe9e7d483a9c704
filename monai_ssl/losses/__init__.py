"""Method losses: AURCL reverse contrastive loss (dual_teacher) and the dual-network 3D terms (``losses.dual_3d``)."""

from . import dual_3d
from .contrastive import AURCLoss

__all__ = ["AURCLoss", "dual_3d"]
