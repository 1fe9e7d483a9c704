"""APPG: training-free pseudo-labels for the unlabelled images (methods spec §1.2, Eq.2-5; Eq.6 filter).

For every image: a :class:`~monai_ssl.foundation.interfaces.BoxProposer` gives up to ``top_k``
scored candidate boxes for the appearance prompts (Eq.4), a
:class:`~monai_ssl.foundation.interfaces.PromptableSegmenter` segments every candidate and
predicts its IoU (Eq.5), and ``candidate_policy`` makes the pseudo-label:

* ``"best_iou"``: the candidate mask with the highest predicted IoU (ties: the better-scored box);
* ``"top_box"``: the mask of the proposer's best box (the spec's default reading);
* ``"union"``: the union of all candidate masks (its ``predicted_iou`` is their mean);
* ``"rerank"`` (default): the candidate with the highest combined evidence (:func:`rerank_score`):
  the proposer's box score, LiteMedSAM's predicted IoU, and image evidence of the mask itself
  (:func:`mask_evidence`: darker, or for a "bright" prompt brighter, than a ring around it, its
  bounding box agrees with the prompt box, away from the image border). No truth is used at run
  time; the weights are :data:`DEFAULT_RERANK` (generic) unless a calibration
  (:mod:`monai_ssl.pseudo.calibration`, fitted on the split's labelled images only) gives others.

Failing loudly: with ``check_images`` (the split's labelled images and their masks),
:func:`run_appg` also pseudo-labels those images (into ``<out>/labelled_check``) and reports the
Dice of APPG's masks against their truth: the honest estimate of pseudo-label quality that needs
no unlabelled truth. Below ``min_check_dice`` a warning ("pseudo-labels disagree with the
labelled masks") goes to the log and into the report.

The pieces live in their own modules, re-exported here: :mod:`monai_ssl.pseudo.store` (the
output folder, its journal, manifest, lock and settings hash), :mod:`monai_ssl.pseudo.selection`
(per image: boxes, masks, evidence, the chosen pseudo-label and the Eq.6 validity),
:mod:`monai_ssl.pseudo.workers` (worker processes) and :mod:`monai_ssl.pseudo.report` (the
report against truth where it exists).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

# monai_ssl.data.datalist and monai_ssl.evaluation are imported where used: a worker process
# (see monai_ssl.pseudo.workers) imports the APPG modules without the rest of monai_ssl and MONAI
from monai_ssl.foundation.appearance import DEFAULT_PROMPTS, prompt_brightness
from monai_ssl.foundation.interfaces import BoxProposer, PromptableSegmenter
from monai_ssl.pseudo.report import appg_report, log_report, overlay_selection, prompt_notes
from monai_ssl.pseudo.selection import (
    CANDIDATE_POLICIES,
    DEFAULT_RERANK,
    INVALID_REASONS,
    OPTIONAL_RERANK,
    ChunkJob,
    count_records,
    mask_evidence,
    rerank_score,
)
from monai_ssl.pseudo.store import (
    JOURNAL_NAME,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    MASK_LAYOUT,
    case_entries,
    config_hash,
    read_gray8,
    read_json,
    resume_journal,
    store_lock,
    valid_pseudo_datalist,
)
from monai_ssl.pseudo.workers import default_workers, run_in_workers, tune_malloc_for_inference
from monai_ssl.utils import atomic_write, remove_stale_temps_in

__all__ = [
    "CANDIDATE_POLICIES",
    "CHECK_DIR",
    "DEFAULT_MIN_CHECK_DICE",
    "DEFAULT_RERANK",
    "INVALID_REASONS",
    "OPTIONAL_RERANK",
    "appg_report",
    "config_hash",
    "default_workers",
    "mask_evidence",
    "overlay_selection",
    "read_gray8",
    "rerank_score",
    "run_appg",
    "store_lock",
    "tune_malloc_for_inference",
    "valid_pseudo_datalist",
]

logger = logging.getLogger(__name__)

#: Folder (inside the store) of the labelled-image check run.
CHECK_DIR = "labelled_check"
#: Default ``min_check_dice``: below it the labelled-image check warns.
DEFAULT_MIN_CHECK_DICE = 0.5


def run_appg(
    images: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    proposer: BoxProposer,
    segmenter: PromptableSegmenter,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    top_k: int = 3,
    candidate_policy: str = "rerank",
    min_foreground: float = 0.01,
    config: Mapping[str, Any] | None = None,
    truth_lookup: Callable[[str], str | Path | None] | None = None,
    overlay_count: int = 16,
    encoder_batch_size: int = 8,
    progress: bool = True,
    rerank: Mapping[str, float] | None = None,
    workers: int = 1,
    threads_per_worker: int | None = None,
    check_images: Sequence[Mapping[str, Any]] | None = None,
    min_check_dice: float = DEFAULT_MIN_CHECK_DICE,
    notes: Sequence[str] = (),
) -> Path:
    """Make APPG pseudo-labels for ``images`` into ``out_dir``; returns the manifest path (see the module docstring).

    Args:
        images: datalist entries with an ``image`` path (``load_datalist(..., "unlabeled")``);
            ``case_id`` is taken from the entry or the file name.
        out_dir: output folder (created).
        proposer: candidate boxes for ``prompts``.
        segmenter: masks and predicted IoU for the boxes.
        prompts: appearance prompts (default: the paper's "dark oval", "dark round", "dark lobulated").
        top_k: candidate boxes per image.
        candidate_policy: one of :data:`CANDIDATE_POLICIES`.
        min_foreground: δ of Eq.6, a fraction of the image area.
        config: what else determines the result (proposer and segmenter settings, weights,
            precision); merged with the four arguments above into the manifest's ``config``, whose
            hash decides reuse.
        truth_lookup: case id -> truth mask path (or None) for the final report.
        overlay_count: overlays written by the final report.
        encoder_batch_size: images per ``segment_batch`` call (the segmenter's own encoder batch
            size applies inside it).
        progress: show a tqdm progress bar.
        rerank: weights of the ``"rerank"`` policy (:func:`rerank_score`; missing keys take
            :data:`DEFAULT_RERANK`; :data:`OPTIONAL_RERANK` keys are off unless given); part of the
            config hash when that policy is used.
        workers: processes that compute the images (1: this process; more: that many spawned
            worker processes, each with a pickled copy of ``proposer`` and ``segmenter``, which
            must therefore pickle). Not part of the config hash: the outputs are the same.
        threads_per_worker: torch CPU threads of each worker process (default: this process's
            ``torch.get_num_threads()`` divided by ``workers``, at least 1); unused with 1 worker.
        check_images: labelled datalist entries (``image`` and ``label`` paths): pseudo-labelled
            first with the same settings into ``<out_dir>/labelled_check`` (its own store) and
            compared with their masks; the Dice goes into the report (``labelled_check``) and the
            log, with a warning below ``min_check_dice``. Not part of the config hash.
        min_check_dice: the Dice over the check images below which APPG warns.
        notes: extra lines for the report's ``notes`` (e.g. what the calibration said).
    """
    if candidate_policy not in CANDIDATE_POLICIES:
        raise ValueError(f"candidate_policy must be one of {CANDIDATE_POLICIES}, got {candidate_policy!r}")
    if top_k < 1 or encoder_batch_size < 1:
        raise ValueError(f"top_k and encoder_batch_size must be >= 1, got {top_k} and {encoder_batch_size}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if threads_per_worker is not None and (isinstance(threads_per_worker, bool) or not isinstance(threads_per_worker, int) or threads_per_worker < 1):
        raise ValueError(f"threads_per_worker must be None or an int >= 1, got {threads_per_worker!r}")
    if not 0.0 <= min_foreground < 1.0:
        raise ValueError(f"min_foreground (δ) must lie in [0, 1), got {min_foreground}")
    if not prompts:
        raise ValueError("APPG needs at least one prompt")
    out_dir = Path(out_dir)
    settings: dict[str, Any] = {
        "prompts": list(prompts),
        "top_k": top_k,
        "candidate_policy": candidate_policy,
        "min_foreground": min_foreground,
    }
    if rerank is not None:
        unknown = sorted(set(rerank) - set(DEFAULT_RERANK) - set(OPTIONAL_RERANK))
        if unknown:
            raise ValueError(f"unknown rerank weights {unknown}; known: {sorted({**DEFAULT_RERANK, **OPTIONAL_RERANK})}")
    if candidate_policy == "rerank":
        settings["rerank"] = {**DEFAULT_RERANK, **(rerank or {})}
    clashes = sorted(set(settings) & set(config or {}))
    if clashes:
        raise ValueError(f"config keys {clashes} clash with run_appg's own arguments; pass those as arguments")
    settings.update(config or {})
    digest = config_hash(settings)
    entries = case_entries(images)
    notes = list(notes) + prompt_notes(proposer, prompts)
    brightness = {
        phrase: prompt_brightness(phrase, getattr(proposer, "default_brightness", "dark"))
        for prompt in prompts
        for phrase in [prompt, *(p.strip() for p in prompt.split(".") if p.strip())]
    }
    labelled_check = None
    if check_images:
        labelled_check = _labelled_check(
            check_images, out_dir / CHECK_DIR, min_check_dice,
            dict(proposer=proposer, segmenter=segmenter, prompts=prompts, top_k=top_k, candidate_policy=candidate_policy,
                 min_foreground=min_foreground, config=config, overlay_count=overlay_count,
                 encoder_batch_size=encoder_batch_size, progress=progress, rerank=rerank, workers=workers,
                 threads_per_worker=threads_per_worker),
        )
    with store_lock(out_dir):
        stale = remove_stale_temps_in(out_dir)  # left by a run killed mid-write
        if stale:
            logger.info("APPG: removed %d temporary file(s) a killed run left in %s", len(stale), out_dir)
        manifest_path = out_dir / MANIFEST_NAME
        existing = read_json(manifest_path)
        if (
            existing is not None
            and existing.get("complete") is True
            and existing.get("config_hash") == digest
            and [(r["case_id"], r["image"]) for r in existing.get("images", [])] == entries
        ):
            logger.info("APPG %s is complete for config %s: nothing to do", manifest_path, digest[:12])
            report_file = out_dir / "report" / "appg_report.json"
            previous = read_json(report_file)
            if previous is not None and (previous.get("labelled_check") != labelled_check or previous.get("notes") != notes):
                appg_report(manifest_path, truth_lookup, out_dir / "report", overlay_count, labelled_check, notes)
            return manifest_path

        out_dir.mkdir(parents=True, exist_ok=True)
        done = resume_journal(out_dir, digest, settings)
        manifest_path.unlink(missing_ok=True)  # rewritten, complete, at the end
        todo = [e for e in entries if e[0] not in done or done[e[0]]["image"] != e[1]]
        if done:
            logger.info("APPG resumes in %s: %d of %d images already done", out_dir, len(entries) - len(todo), len(entries))

        start = time.perf_counter()
        job = ChunkJob(out_dir, list(prompts), top_k, candidate_policy, min_foreground, settings.get("rerank"), brightness)
        used_workers, threads = 1, torch.get_num_threads()
        with open(out_dir / JOURNAL_NAME, "a", encoding="utf-8") as journal, tqdm(
            total=len(entries), initial=len(entries) - len(todo), desc="APPG", unit="img", disable=not progress
        ) as bar:

            def journalled(records: list[dict]) -> None:
                for record in records:
                    journal.write(json.dumps(record) + "\n")
                    journal.flush()
                    os.fsync(journal.fileno())
                    done[record["case_id"]] = record
                    bar.update(1)

            if workers > 1 and len(todo) > 1:
                # chunks small enough that every worker gets several (the last ones do not idle long)
                size = max(1, min(encoder_batch_size, len(todo) // (4 * workers)))
                chunks = [todo[first : first + size] for first in range(0, len(todo), size)]
                used_workers = min(workers, len(chunks))
                threads = threads_per_worker or max(1, torch.get_num_threads() // used_workers)
                run_in_workers(chunks, job, proposer, segmenter, used_workers, threads, journalled)
            else:
                for first in range(0, len(todo), encoder_batch_size):
                    journalled(job.run(todo[first : first + encoder_batch_size], proposer, segmenter))
        wall = time.perf_counter() - start

        records = [done[case_id] for case_id, _ in entries]
        image_seconds = sum(r["seconds"] for r in records)
        manifest = {
            "stage": "appg",
            "version": MANIFEST_VERSION,
            "complete": True,
            "config_hash": digest,
            "config": settings,
            "mask_layout": MASK_LAYOUT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "counts": count_records(records),
            "timing": {
                # per-image compute seconds (in whichever process made the image): images/s of one process
                "image_seconds": image_seconds,
                "images_per_second": len(records) / image_seconds if image_seconds > 0 else None,
                "computed_this_run": len(todo),
                # wall clock of this run's compute loop (worker start-up included): its throughput
                "wall_seconds_this_run": wall,
                "wall_images_per_second_this_run": len(todo) / wall if todo and wall > 0 else None,
                "workers_this_run": used_workers,
                "threads_per_process_this_run": threads,
            },
            "images": records,
        }
        atomic_write(manifest_path, json.dumps(manifest, indent=1) + "\n")
        if records:
            report = appg_report(
                manifest_path, truth_lookup=truth_lookup, out_dir=out_dir / "report", overlay_count=overlay_count,
                labelled_check=labelled_check, notes=notes,
            )
            log_report(report)
        return manifest_path


def _labelled_check(
    check_images: Sequence[Mapping[str, Any]], out_dir: Path, min_check_dice: float, run_kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """Run APPG on the labelled ``check_images`` into ``out_dir`` and summarise its Dice against their masks."""
    truth = {}
    for case_id, item in zip((c for c, _ in case_entries(check_images)), check_images):
        label = item.get("label")
        if not isinstance(label, (str, os.PathLike)):
            raise ValueError(f"APPG labelled check: case {case_id} ({item.get('image')}) has no 'label' mask path")
        truth[case_id] = Path(label)
    missing = [f"{c} ({p})" for c, p in truth.items() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"APPG labelled check: label masks not found: {missing}")
    images = [{k: v for k, v in item.items() if k != "label"} for item in check_images]
    logger.info("APPG labelled check: pseudo-labelling the %d labelled images to compare with their masks", len(images))
    manifest_path = run_appg(images, out_dir, truth_lookup=truth.get, **run_kwargs)
    report = read_json(out_dir / "report" / "appg_report.json") or appg_report(manifest_path, truth.get, out_dir / "report", 0)
    quality = report["truth"]
    dice_all = quality["all"]["dice"]["mean"]
    summary: dict[str, Any] = {
        "n": quality["all"]["n"],
        "store": str(out_dir),
        "dice_all": dice_all,
        "dice_valid": None if quality["valid"] is None else quality["valid"]["dice"]["mean"],
        "valid": report["counts"]["valid"],
        "min_check_dice": min_check_dice,
        "note": (
            "APPG run on the split's labelled images and compared with their masks: the estimate of pseudo-label "
            "quality that needs no unlabelled truth (in-sample for anything calibrated on these same images)"
        ),
        "warning": None,
    }
    dice_valid = "" if summary["dice_valid"] is None else f", Dice {summary['dice_valid']:.3f} over those"
    message = f"APPG labelled check: Dice {dice_all:.3f} over the {summary['n']} labelled images ({summary['valid']} valid{dice_valid})"
    if dice_all < min_check_dice:
        summary["warning"] = (
            f"pseudo-labels disagree with the labelled masks: Dice {dice_all:.3f} over the {summary['n']} labelled images is "
            f"below min_check_dice {min_check_dice}; check the prompts and the calibration (scripts/calibrate_appg.py) "
            "before training on these pseudo-labels"
        )
        logger.warning("APPG %s", summary["warning"])
    else:
        logger.info("%s", message)
    return summary
