"""Training-curve plots from the JSON-lines metrics log written by ``MetricsLogger``."""

from __future__ import annotations

import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from monai_ssl.utils import atomic_write

__all__ = ["plot_training_curves", "read_metrics_log", "training_curves_figure"]

logger = logging.getLogger(__name__)

_AXIS_KEYS = ("epoch", "iteration")


def read_metrics_log(log_path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSON-lines metrics log (one dict per line; blank lines ignored).

    A malformed *last* line (a run killed mid-write) is skipped with a warning;
    a malformed line elsewhere raises ``ValueError`` naming the line number.
    """
    lines = Path(log_path).read_text(encoding="utf-8").splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    records = []
    for pos, (lineno, line) in enumerate(numbered):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            if pos == len(numbered) - 1:
                logger.warning("skipping truncated last line %d of %s", lineno, log_path)
                continue
            raise ValueError(f"{log_path}:{lineno}: not valid JSON ({err})") from err
        if not isinstance(rec, dict):
            raise ValueError(f"{log_path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def _is_number(v: Any) -> bool:
    """True for JSON numbers (int/float), excluding bools."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _series(log_path: str | os.PathLike) -> dict[str, dict[float, float]]:
    """Every numeric key of a metrics log as ``{key: {iteration: value}}`` (the latest line wins)."""
    series: dict[str, dict[float, float]] = {}
    for n, rec in enumerate(read_metrics_log(log_path), start=1):
        if not _is_number(rec.get("iteration")):
            raise ValueError(f"{log_path}: record {n} has no numeric 'iteration': {rec}")
        for key, v in rec.items():
            if key not in _AXIS_KEYS and _is_number(v):
                series.setdefault(key, {})[rec["iteration"]] = float(v)
    return series


def _y_label(keys: list[str], is_val: bool) -> str:
    """The y-axis label of a panel: what its curves measure."""
    if is_val:
        return "Dice" if all("dice" in k.lower() for k in keys) else "validation metric"
    return "loss" if all(k.startswith("loss") for k in keys) else "loss / training scalar"


def plot_training_curves(
    log_path: str | os.PathLike, out_png: str | os.PathLike, warmup_log: str | os.PathLike | None = None
) -> None:
    """Draw :func:`training_curves_figure` of the logs into a PNG, written atomically."""
    fig = training_curves_figure(log_path, warmup_log)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(out_png, buf.getvalue())


def training_curves_figure(log_path: str | os.PathLike, warmup_log: str | os.PathLike | None = None) -> Figure:
    """A figure of every numeric key of a metrics log against ``iteration``.

    Keys starting with ``val_`` go on a "validation" panel, all others (losses and
    other training scalars) on a "training" panel (log y-scale when all its values are
    positive); ``epoch``/``iteration`` are not plotted. If an iteration appears more than
    once (a resumed run), the latest line wins. ``warmup_log`` is the metrics log of a
    warm-up stage trained before the main run (dual_teacher's static teacher,
    :class:`~monai_ssl.engines.StaticTeacherWarmup`): when given and present, its losses get
    a first panel of their own, against the warm-up's own iterations; a missing file (a
    static teacher trained before the stage logged its loss) is noted in the log and skipped.
    Every panel labels its axes. Uses the Agg canvas (no display needed).

    Raises:
        ValueError: if a line lacks ``iteration`` or the log has no numeric series.
    """
    series = _series(log_path)
    if not series:
        raise ValueError(f"{log_path}: no numeric series to plot")
    warmup: dict[str, dict[float, float]] = {}
    if warmup_log is not None:
        if Path(warmup_log).is_file():
            warmup = {k: v for k, v in _series(warmup_log).items() if not k.startswith("val_")}
        else:
            logger.info("no warm-up metrics log at %s: the curves show the main training run only", warmup_log)

    panels = [("warm-up (static teacher)", sorted(warmup), warmup, False)] if warmup else []
    panels += [
        (title, sorted(k for k in series if k.startswith("val_") == is_val), series, is_val)
        for title, is_val in (("training", False), ("validation", True))
    ]
    panels = [panel for panel in panels if panel[1]]
    fig = Figure(figsize=(8, 3.2 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (title, keys, data, is_val) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        for key in keys:
            xs = sorted(data[key])
            ys = [data[key][x] for x in xs]
            ax.plot(xs, ys, label=key, marker="o" if len(xs) <= 50 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("warm-up iteration" if data is warmup else "iteration")
        ax.set_ylabel(_y_label(keys, is_val))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        if not is_val and all(y > 0 for k in keys for y in data[k].values() if math.isfinite(y)):
            ax.set_yscale("log")
            ax.set_ylabel(_y_label(keys, is_val) + " (log scale)")
    return fig
