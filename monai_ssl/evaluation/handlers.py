"""Ignite handlers: a JSON-lines training metrics logger and a per-case evaluation report."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events

from .metrics import _to_numpy, case_metrics
from .overlay import save_overlay
from .report import write_report

__all__ = ["CaseReportHandler", "MetricsLogger"]

logger = logging.getLogger(__name__)


def _scalar(v: Any) -> float | None:
    """``v`` as a float if it is a number or a one-element tensor/array (not a bool), else ``None``."""
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    if isinstance(v, (torch.Tensor, np.ndarray)) and v.size == 1 if isinstance(v, np.ndarray) else (
        isinstance(v, torch.Tensor) and v.numel() == 1 and not v.dtype == torch.bool
    ):
        return float(v.item())
    return None
