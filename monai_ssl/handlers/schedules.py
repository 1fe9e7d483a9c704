"""Weight ramp-up schedules for unsupervised loss terms, usable from bundle JSON."""

from __future__ import annotations

import math

__all__ = ["sigmoid_rampup", "linear_rampup", "RampUp"]


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """Laine & Aila's sigmoid ramp ``exp(-5 (1 - t)^2)``, ``t = clip(current / length, 0, 1)``."""
    if rampup_length <= 0:
        return 1.0
    t = min(max(current, 0.0), rampup_length) / rampup_length
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def linear_rampup(current: float, rampup_length: float) -> float:
    """Linear ramp from 0 to 1 over ``rampup_length``."""
    if rampup_length <= 0:
        return 1.0
    return float(min(max(current, 0.0), rampup_length) / rampup_length)


class RampUp:
    """A loss weight ``max_weight * ramp(step / length)``; call it with the global iteration.

    Args:
        max_weight: the weight reached at the end of the ramp.
        rampup_length: ramp length in iterations (0 = constant weight).
        kind: ``"sigmoid"`` (mean teacher) or ``"linear"``.
    """

    _RAMPS = {"sigmoid": sigmoid_rampup, "linear": linear_rampup}

    def __init__(self, max_weight: float, rampup_length: float = 0, kind: str = "sigmoid") -> None:
        if kind not in self._RAMPS:
            raise ValueError(f"ramp kind must be one of {sorted(self._RAMPS)}, got {kind!r}")
        self.max_weight = max_weight
        self.rampup_length = rampup_length
        self.ramp = self._RAMPS[kind]

    def __call__(self, step: float) -> float:
        return self.max_weight * self.ramp(step, self.rampup_length)
