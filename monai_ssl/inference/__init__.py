"""Inference helpers: sliding-window presets and dual-network window averaging."""

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
    "SlidingWindowPreset",
    "dual_sliding_window_inference",
    "make_sliding_window_inferer",
    "naive_sliding_window",
    "stride_to_overlap",
]
