"""Inference helpers: sliding-window presets, dual-network window averaging, and the folder
runner that skips bad files and reports them."""

from .runner import SkipFailedCases, SkippedCasesExit, run_inference
from .sliding_window import (
    SLIDING_WINDOW_PRESETS,
    SlidingWindowPreset,
    dual_sliding_window_inference,
    make_sliding_window_inferer,
    naive_sliding_window,
    stride_to_overlap,
)

__all__ = [
    "SLIDING_WINDOW_PRESETS",
    "SkipFailedCases",
    "SkippedCasesExit",
    "SlidingWindowPreset",
    "dual_sliding_window_inference",
    "make_sliding_window_inferer",
    "naive_sliding_window",
    "run_inference",
    "stride_to_overlap",
]
