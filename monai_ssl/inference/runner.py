"""Inference over a folder that keeps going past bad files, then says what it skipped.

Every inference bundle (2D and 3D) wraps its map-style ``dataset`` in :class:`SkipFailedCases`
and runs its evaluator with :func:`run_inference`::

    "dataloader": {"_target_": "DataLoader", "dataset": "$monai_ssl.inference.SkipFailedCases(@dataset)", ...},
    "run": ["$monai_ssl.inference.run_inference(@evaluator)"]

A case whose loading or preprocessing fails (an empty, truncated or non-image file, an RGB
mask, an image below the minimum size, ...) is skipped with a warning naming the file and the
reason; every other image is processed. When the run ends, :func:`run_inference` raises
:class:`SkippedCasesExit` (a ``SystemExit``) whose message lists every skipped file, so
``python -m monai.bundle run`` prints that summary and exits with status 1.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset, IterableDataset, get_worker_info

from monai_ssl.data.transforms import CaseError

__all__ = ["SkipFailedCases", "SkippedCasesExit", "run_inference"]

logger = logging.getLogger(__name__)


class SkippedCasesExit(SystemExit):
    """Inference finished but skipped some files; the message (exit status 1) lists them."""

    def __init__(self, failures: Sequence[tuple[str, str]], total: int) -> None:
        self.failures = list(failures)
        lines = [
            f"inference skipped {len(self.failures)} of {total} image(s) (no mask written for them; "
            f"{total - len(self.failures)} processed):"
        ]
        lines += [f"  {_named(name, reason)}" for name, reason in self.failures]
        super().__init__("\n".join(lines))


def _named(name: str, reason: str) -> str:
    """``reason``, prefixed with ``name`` unless it already names it."""
    return reason if name in reason else f"{name}: {reason}"


def _case_label(item: Any, index: int) -> str:
    """The file (or case id) a datalist item stands for, for messages."""
    if isinstance(item, Mapping):
        for key in ("image", "case_id"):
            if item.get(key) is not None:
                return str(item[key])
    return f"item {index}"


def _reason(error: BaseException) -> str:
    """The most specific message of ``error``'s cause chain: the first :class:`CaseError` (it names
    the case and the problem), else the innermost exception (MONAI wraps transform errors in
    ``RuntimeError("applying transform ...")``)."""
    innermost = error
    current: BaseException | None = error
    while current is not None:
        if isinstance(current, CaseError):
            return str(current)
        innermost = current
        current = current.__cause__ or current.__context__
    return " ".join(str(innermost).split()) or type(innermost).__name__


class SkipFailedCases(IterableDataset):
    """Iterate a map-style dataset, skipping (with a warning) every case whose transform fails.

    ``failures`` lists ``(file, reason)`` of the skipped cases of the last pass and
    ``n_processed`` counts the cases yielded. The raw datalist items (``dataset.data``) name the
    files; a dataset without ``data`` is named by index. Use with ``num_workers=0``: each worker
    would keep its own list of failures, so worker processes are refused.

    Args:
        dataset: a map-style dataset (e.g. ``monai.data.Dataset(find_images(folder), transform)``).
    """

    def __init__(self, dataset: Dataset) -> None:
        super().__init__()
        self.dataset = dataset
        self.failures: list[tuple[str, str]] = []
        self.n_processed = 0

    def __iter__(self) -> Iterator[Any]:
        """Yield each case that loads; record and warn about each one that does not."""
        if get_worker_info() is not None:
            raise RuntimeError("SkipFailedCases needs the DataLoader's num_workers=0 (failures are recorded in-process)")
        self.failures, self.n_processed = [], 0
        items = getattr(self.dataset, "data", None)
        for index in range(len(self.dataset)):  # type: ignore[arg-type]
            try:
                case = self.dataset[index]
            except Exception as err:  # noqa: BLE001 - a bad case is skipped and reported, not fatal
                name = _case_label(items[index] if items is not None else None, index)
                reason = _reason(err)
                logger.warning("inference: skipping %s", _named(name, reason))
                self.failures.append((name, reason))
                continue
            self.n_processed += 1
            yield case

    @property
    def total(self) -> int:
        """Number of cases in the wrapped dataset."""
        return len(self.dataset)  # type: ignore[arg-type]


def run_inference(evaluator: Any, output_dir: str | os.PathLike | None = None) -> None:
    """Run ``evaluator`` over its :class:`SkipFailedCases` loader, log how many masks it wrote to
    ``output_dir`` (when given), then raise :class:`SkippedCasesExit` listing the skipped files
    (exit status 1 under ``monai.bundle run``) when any was skipped."""
    cases = getattr(getattr(evaluator, "data_loader", None), "dataset", None)
    if not isinstance(cases, SkipFailedCases):
        raise TypeError(
            "run_inference needs the evaluator's data loader to iterate a SkipFailedCases dataset "
            f"(got {type(cases).__name__}); wrap the config's dataset: \"$monai_ssl.inference.SkipFailedCases(@dataset)\""
        )
    evaluator.run()
    logger.info("inference: %d of %d image(s) processed", cases.n_processed, cases.total)
    if output_dir is not None:
        from monai_ssl.evaluation.report import log_written_masks

        log_written_masks(output_dir, evaluator)
    if cases.failures:
        raise SkippedCasesExit(cases.failures, cases.total)
