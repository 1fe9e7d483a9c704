"""Evaluation: per-case segmentation metrics, reports, overlays, training curves and handlers."""

from .handlers import CaseReportHandler, MetricsLogger
from .metrics import EMPTY_CASE_POLICY, EMPTY_CASES, PolicyMeanDice, case_metrics, summarize
from .overlay import save_overlay, select_slice
from .plots import plot_training_curves, read_metrics_log, training_curves_figure
from .report import log_written_masks, write_report

__all__ = [
    "EMPTY_CASES",
    "EMPTY_CASE_POLICY",
    "CaseReportHandler",
    "MetricsLogger",
    "PolicyMeanDice",
    "case_metrics",
    "log_written_masks",
    "plot_training_curves",
    "read_metrics_log",
    "save_overlay",
    "select_slice",
    "summarize",
    "training_curves_figure",
    "write_report",
]
