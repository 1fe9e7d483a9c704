"""Evaluation: per-case segmentation metrics, reports, overlays, training curves and handlers."""

from .handlers import CaseReportHandler, MetricsLogger
from .metrics import EMPTY_CASE_POLICY, EMPTY_CASES, case_metrics, summarize
from .overlay import save_overlay, select_slice
from .plots import plot_training_curves, read_metrics_log
from .report import write_report

__all__ = [
    "EMPTY_CASES",
    "EMPTY_CASE_POLICY",
    "CaseReportHandler",
    "MetricsLogger",
    "case_metrics",
    "plot_training_curves",
    "read_metrics_log",
    "save_overlay",
    "select_slice",
    "summarize",
    "write_report",
]
