"""Per-case CSV and summary JSON reports (written atomically), and the inference run's last line."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_ssl.utils import atomic_write

from .metrics import EMPTY_CASE_POLICY, summarize

__all__ = ["log_written_masks", "write_report"]

logger = logging.getLogger(__name__)

#: Names of the masks the inference bundles write (``monai_ssl.bundle.SaveMaskd``).
MASK_SUFFIXES = ("_mask.png", "_mask.nii.gz")


def write_report(
    records: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, prefix: str = "metrics", split: str | None = None
) -> dict:
    """Write ``<prefix>_per_case.csv`` and ``<prefix>_summary.json`` into ``out_dir``.

    The CSV has one row per record, ``case_id`` first and then every other key in
    first-appearance order (missing values left blank). The JSON holds the
    :func:`~monai_ssl.evaluation.metrics.summarize` output plus a ``policy`` text and, when
    given, the ``split`` (datalist key) the cases came from.

    Returns:
        The summary dict as written to the JSON file.

    Raises:
        ValueError: if a record lacks ``case_id``, case ids repeat, or ``summarize`` fails.
    """
    ids = []
    for i, rec in enumerate(records):
        if "case_id" not in rec:
            raise ValueError(f"record #{i} has no 'case_id'")
        ids.append(str(rec["case_id"]))
    duplicates = sorted(c for c, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise ValueError(f"duplicate case_id(s) in report: {duplicates}")

    summary = summarize(records)
    if split is not None:
        summary = {"split": split, **summary}
    summary["policy"] = EMPTY_CASE_POLICY

    columns = ["case_id"]
    for rec in records:
        columns.extend(k for k in rec if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)

    out_dir = Path(out_dir)
    atomic_write(out_dir / f"{prefix}_per_case.csv", buf.getvalue())
    atomic_write(out_dir / f"{prefix}_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def log_written_masks(output_dir: str | os.PathLike, evaluator: Any) -> int:
    """Log, as the inference run's last line, how many masks it wrote and where; return the count.

    Counts the mask files (``*_mask.png``, ``*_mask.nii.gz``) in ``output_dir`` written since
    ``evaluator`` (the inference ``SupervisedEvaluator``, after ``run()``) started, so masks left
    there by an earlier run are not counted. Call it after the evaluator's run, e.g. as the last
    entry of an inference config's ``run`` list.
    """
    folder = Path(output_dir)
    times = getattr(getattr(evaluator, "state", None), "times", None) or {}
    duration = times.get("COMPLETED") or 0.0
    since = time.time() - float(duration) - 2.0  # a margin for file systems with coarse time stamps
    written = (
        sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(MASK_SUFFIXES) and p.stat().st_mtime >= since)
        if folder.is_dir()
        else []
    )
    logger.info("inference wrote %d mask%s to %s", len(written), "" if len(written) == 1 else "s", folder.resolve())
    return len(written)
