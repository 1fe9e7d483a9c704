"""Pseudo-label machinery: APPG (:mod:`.appg`, with :mod:`.store`, :mod:`.selection`,
:mod:`.workers`, :mod:`.report`), its calibration (:mod:`.calibration`) and the
uncertainty-entropy weighted fusion of teachers (UEWF, :mod:`.fusion`)."""

from .fusion import binary_entropy, region_entropy, uewf

__all__ = ["binary_entropy", "region_entropy", "uewf"]
