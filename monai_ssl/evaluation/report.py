"""Per-case CSV and summary JSON reports, written atomically."""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_ssl.utils import atomic_write

from .metrics import EMPTY_CASE_POLICY, summarize

__all__ = ["write_report"]


def write_report(records: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, prefix: str = "metrics") -> dict:
    """Write ``<prefix>_per_case.csv`` and ``<prefix>_summary.json`` into ``out_dir``.

    The CSV has one row per record, ``case_id`` first and then every other key in
    first-appearance order (missing values left blank). The JSON holds the
    :func:`~monai_ssl.evaluation.metrics.summarize` output plus a ``policy`` text.

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
