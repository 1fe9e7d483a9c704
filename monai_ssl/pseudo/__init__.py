"""Pseudo-label machinery: uncertainty-entropy weighted fusion of teachers (UEWF)."""

from .fusion import binary_entropy, region_entropy, uewf

__all__ = ["binary_entropy", "region_entropy", "uewf"]
