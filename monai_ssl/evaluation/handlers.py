"""Ignite handlers: a JSON-lines training metrics logger and a per-case evaluation report."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events

from monai_ssl.handlers.checkpoint import is_rank0
from monai_ssl.utils import atomic_write, remove_stale_temps

from .metrics import _to_numpy, case_metrics
from .overlay import save_overlay
from .report import write_report

__all__ = ["CaseReportHandler", "MetricsLogger"]

logger = logging.getLogger(__name__)


def _scalar(v: Any) -> float | None:
    """``v`` as a float if it is a number or a one-element numeric tensor/array, else ``None``."""
    if isinstance(v, (torch.Tensor, np.ndarray)):
        if (v.size if isinstance(v, np.ndarray) else v.numel()) != 1:
            return None
        v = v.item()
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    return float(v)


class MetricsLogger:
    """Append training loss terms and validation metrics to a JSON-lines file.

    Every ``log_every`` trainer iterations one line ``{"epoch", "iteration", <scalars>}``
    is appended with every scalar entry of ``output_transform(trainer.state.output)``:
    a dict such as ``{"loss": ..., "loss_sup": ..., "loss_cons": ...}`` (tensors or
    floats; non-scalar entries like images are ignored), a list of such dicts (MONAI
    decollated output; the first is used), or a bare scalar (logged as ``loss``). After
    each evaluator run one line with the trainer's epoch/iteration and the scalar
    ``evaluator.state.metrics`` prefixed ``val_`` (unless already prefixed) is appended.

    The file is opened in append mode for every line, so it survives a crash. When the trainer
    starts its first epoch of a run (after a resume checkpoint was loaded), the lines of this
    logger's ``stage`` beyond the trainer's iteration are dropped (atomically), together with a
    line cut short by a kill: they came from a killed run past its last checkpoint and are
    logged again, so a resumed run keeps one line per iteration/validation, and a run started
    afresh in the same folder starts a fresh log. Only rank 0 writes.

    Args:
        log_path: the ``.jsonl`` file (parent folders are created).
        output_transform: maps the trainer's ``state.output`` to the loss dict.
        log_every: log every this many iterations (global iteration count).
        stage: a name written into every line as ``"stage"`` (e.g. ``"stwp"`` for a warm-up
            trainer logging into the same file); the lines of other stages are never dropped.
            ``None``: no ``stage`` key (lines without one belong to this logger).
    """

    def __init__(
        self,
        log_path: str | os.PathLike,
        output_transform: Callable[[Any], Any] = lambda out: out,
        log_every: int = 10,
        stage: str | None = None,
    ) -> None:
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.log_path = Path(log_path)
        self.output_transform = output_transform
        self.log_every = log_every
        self.stage = stage
        self._trainer: Engine | None = None
        self._trim_pending = False

    def attach(self, trainer: Engine, evaluator: Engine | None = None) -> None:
        """Log loss terms on ``trainer`` iterations and, if given, ``evaluator`` metrics on completion."""
        self._trainer = trainer
        trainer.add_event_handler(Events.STARTED, self._arm_trim)
        trainer.add_event_handler(Events.EPOCH_STARTED, self._trim_once)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=self.log_every), self.log_iteration)
        if evaluator is not None:
            evaluator.add_event_handler(Events.COMPLETED, self.log_validation)

    def _arm_trim(self, engine: Engine) -> None:
        self._trim_pending = True

    def _trim_once(self, engine: Engine) -> None:
        # EPOCH_STARTED comes after every STARTED handler, so a resume checkpoint is loaded by now
        if self._trim_pending:
            self._trim_pending = False
            self.drop_lines_after(engine.state.iteration)

    def drop_lines_after(self, iteration: int) -> int:
        """Remove this stage's lines with an iteration above ``iteration`` (and unreadable lines); return how many.

        The file is rewritten atomically, and only when something is removed (rank 0 only).
        """
        if not is_rank0() or not self.log_path.is_file():
            return 0
        remove_stale_temps(self.log_path)
        kept, dropped = [], 0
        for line in self.log_path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                record = json.loads(line)
                ours = record.get("stage") == self.stage
                keep = line.endswith("\n") and not (ours and int(record["iteration"]) > iteration)
            except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
                keep = False  # cut short by a kill mid-write
            if keep:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            atomic_write(self.log_path, "".join(kept))
            logger.info("%s: dropped %d lines past iteration %d (a run killed after its last checkpoint)", self.log_path, dropped, iteration)
        return dropped

    def log_iteration(self, engine: Engine) -> None:
        """Append the scalar terms of ``engine.state.output``."""
        out = self.output_transform(engine.state.output)
        if isinstance(out, (list, tuple)):
            if not out:
                return
            out = out[0]
        items = out.items() if isinstance(out, Mapping) else [("loss", out)]
        terms = {str(k): s for k, v in items if (s := _scalar(v)) is not None}
        if terms:
            self._append(engine, terms)

    def log_validation(self, evaluator: Engine) -> None:
        """Append the evaluator's scalar metrics, prefixed ``val_``, at the trainer's epoch/iteration."""
        if self._trainer is None:
            raise RuntimeError("MetricsLogger.attach(trainer, evaluator) must be called first")
        metrics = {
            (k if k.startswith("val_") else f"val_{k}"): s
            for k, v in evaluator.state.metrics.items()
            if (s := _scalar(v)) is not None
        }
        if metrics:
            self._append(self._trainer, metrics)

    def _append(self, trainer: Engine, values: dict[str, float]) -> None:
        """Write one line (rank 0 only), flushed and fsynced."""
        if not is_rank0():  # not idist.get_rank(): its first call is a collective, which would hang DDP here
            return
        stage = {} if self.stage is None else {"stage": self.stage}
        line = json.dumps({**stage, "epoch": trainer.state.epoch, "iteration": trainer.state.iteration, **values})
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def _case_stem(filename: Any) -> str:
    """File name without folders and extension (``.nii.gz`` counts as one extension)."""
    name = Path(str(filename)).name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem


class _Cases:
    """Per-case records with unique ``case_id`` values, each source file counted once."""

    def __init__(self) -> None:
        self.entries: list[tuple[str | None, dict[str, Any]]] = []
        self._sources: set[str] = set()
        self._ids: set[str] = set()

    def add(self, source: str | None, record: dict[str, Any]) -> dict[str, Any] | None:
        """Add ``record`` (``case_id`` suffixed ``_2``, ``_3``... if taken); ``None`` if ``source`` was seen."""
        if source is not None:
            if source in self._sources:
                logger.warning("case %s evaluated more than once; counted once", source)
                return None
            self._sources.add(source)
        base, k = record["case_id"], 1
        while record["case_id"] in self._ids:
            k += 1
            record["case_id"] = f"{base}_{k}"
        self._ids.add(record["case_id"])
        self.entries.append((source, record))
        return record


class CaseReportHandler:
    """Per-case metrics, overlays and a report for a MONAI ``SupervisedEvaluator``.

    On every iteration it reads ``engine.state.output`` (a list of per-case dicts, i.e. the
    evaluator's decollated, post-processed output) and computes
    :func:`~monai_ssl.evaluation.metrics.case_metrics` of ``pred_key`` against ``label_key``,
    both binarised at ``threshold`` (``value >= threshold`` is foreground, as
    ``AsDiscrete``). The case id is the stem of the image's ``filename_or_obj`` meta
    (``.nii.gz`` stripped), else ``case_<index>``; repeated ids get a ``_2``, ``_3``... suffix
    and a file seen twice (e.g. padding by a distributed sampler) is counted once. When the
    image meta has ``spacing_key`` its spatial entries give the spacing for the ``_mm``
    metrics: a value with one entry per spatial axis is used as is, an 8-entry NIfTI
    ``pixdim`` (qfac first) contributes entries ``1..ndim``.

    The first ``overlay_count`` cases get ``output_dir/overlays/<case_id>.png``. On
    completion the records are written with
    :func:`~monai_ssl.evaluation.report.write_report` to ``output_dir`` and a one-line
    summary is logged; the summary is also kept in :attr:`summary`. Records reset when the
    engine starts. Under ``torch.distributed`` records are gathered to rank 0 and only rank 0
    writes overlays and the report. ``split`` (the datalist key evaluated, e.g. ``"test"``) names
    the figures in the log line and the summary JSON.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        overlay_count: int = 8,
        spacing_key: str | None = "pixdim",
        threshold: float = 0.5,
        prefix: str = "metrics",
        image_key: str = "image",
        label_key: str = "label",
        pred_key: str = "pred",
        split: str | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.split = split
        self.overlay_count = overlay_count
        self.spacing_key = spacing_key
        self.threshold = threshold
        self.prefix = prefix
        self.image_key = image_key
        self.label_key = label_key
        self.pred_key = pred_key
        self.summary: dict | None = None
        self._cases = _Cases()
        self._n_cases = 0
        self._n_overlays = 0

    def attach(self, engine: Engine) -> None:
        """Register reset (STARTED), per-case metrics (ITERATION_COMPLETED) and report (COMPLETED)."""
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the records of a previous run."""
        self.summary = None
        self._cases = _Cases()
        self._n_cases = 0
        self._n_overlays = 0

    def _spacing(self, image: Any, ndim: int) -> list[float] | None:
        """Spatial spacing from the image meta's ``spacing_key``, or ``None`` if absent."""
        meta = getattr(image, "meta", None)
        if self.spacing_key is None or not meta or self.spacing_key not in meta:
            return None
        values = _to_numpy(meta[self.spacing_key]).astype(float).ravel()
        if values.size == ndim:
            return values.tolist()
        if values.size == 8:
            return values[1 : 1 + ndim].tolist()
        raise ValueError(
            f"meta[{self.spacing_key!r}] has {values.size} entries; expected {ndim} or a NIfTI pixdim of 8"
        )

    def _channel_mask(self, x: Any, key: str) -> np.ndarray:
        """A ``(1, *spatial)`` tensor/array as a ``(*spatial)`` bool mask (``>= threshold``)."""
        arr = _to_numpy(x)
        if arr.ndim not in (3, 4) or arr.shape[0] != 1:
            raise ValueError(f"{key!r} must be (1, *spatial) with 2 or 3 spatial dims, got shape {arr.shape}")
        return arr[0] >= self.threshold

    def iteration_completed(self, engine: Engine) -> None:
        """Compute metrics (and overlays) for every case of the current batch."""
        output = engine.state.output
        if isinstance(output, Mapping) or not isinstance(output, (list, tuple)):
            raise TypeError(
                "CaseReportHandler expects engine.state.output to be a list of per-case dicts "
                f"(a decollated evaluator output), got {type(output).__name__}"
            )
        rank, world = idist.get_rank(), idist.get_world_size()
        for item in output:
            missing = [k for k in (self.image_key, self.label_key, self.pred_key) if k not in item]
            if missing:
                raise KeyError(f"evaluator output lacks {missing}; has {sorted(item)}")
            image = item[self.image_key]
            label, pred = (self._channel_mask(item[k], k) for k in (self.label_key, self.pred_key))
            filename = getattr(image, "meta", {}).get("filename_or_obj") or None
            self._n_cases += 1
            if filename is not None:
                case_id = _case_stem(filename)
            elif world > 1:
                case_id = f"case_r{rank}_{self._n_cases:04d}"
            else:
                case_id = f"case_{self._n_cases:04d}"
            record = {"case_id": case_id, **case_metrics(pred, label, self._spacing(image, label.ndim))}
            entry = self._cases.add(None if filename is None else str(filename), record)
            if entry is None or rank != 0 or self._n_overlays >= self.overlay_count:
                continue
            self._n_overlays += 1
            save_overlay(
                image, label, pred, self.output_dir / "overlays" / f"{entry['case_id']}.png",
                title=f"{entry['case_id']}  dice={entry['dice']:.3f}",
            )

    def completed(self, engine: Engine) -> None:
        """Gather records to rank 0, write the report there and log a one-line summary."""
        entries = self._cases.entries
        gathered = idist.all_gather(entries) if idist.get_world_size() > 1 else [entries]
        if idist.get_rank() != 0:
            return
        merged = _Cases()
        for rank_entries in gathered:
            for source, record in rank_entries:
                merged.add(source, dict(record))
        records = [record for _, record in merged.entries]
        if not records:
            logger.warning("CaseReportHandler: no cases were evaluated; no report written")
            return
        self.summary = write_report(records, self.output_dir, self.prefix, split=self.split)
        m = self.summary["metrics"]
        logger.info(
            "%s%d cases: Dice %.4f ± %.4f, IoU %.4f ± %.4f, HD95 %.2f ± %.2f px; empty cases %s -> %s",
            f"{self.split} split, " if self.split else "", self.summary["n_cases"], m["dice"]["mean"], m["dice"]["std"], m["iou"]["mean"], m["iou"]["std"],
            m["hd95"]["mean"], m["hd95"]["std"], self.summary["empty_cases"], self.output_dir,
        )

