"""The APPG report: counts, pseudo-label quality against truth where it exists, speed, CSV, JSON and overlays."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_ssl.foundation.interfaces import BoxProposer
from monai_ssl.pseudo.selection import count_records
from monai_ssl.pseudo.store import load_complete_manifest, read_gray8, read_mask
from monai_ssl.utils import atomic_write

__all__ = ["appg_report", "log_report", "overlay_selection", "prompt_notes"]

#: one log channel for all of APPG (run, store, selection, workers, report)
logger = logging.getLogger("monai_ssl.pseudo.appg")

def log_report(report: Mapping[str, Any]) -> None:
    """One log line with the counts, the target-free images that got a mask, and the overlays drawn."""
    counts, truth = report["counts"], report["truth"]
    line = f"APPG report: {counts['valid']} of {counts['total']} images valid"
    if truth is not None:
        empty = truth["empty_truth"]
        line += (
            f"; Dice against truth {truth['all']['dice']['mean']:.3f} over the {truth['all']['n']} with truth; "
            f"{empty['n']} without a target, {empty['marked_valid']} of them marked valid"
        )
        if empty["cases_marked_valid"]:
            line += f" ({', '.join(empty['cases_marked_valid'][:10])}{', ...' if empty['marked_valid'] > 10 else ''})"
    line += f"; overlays: {report['overlays']['rule']}"
    logger.info("%s", line)


def prompt_notes(proposer: BoxProposer, prompts: Sequence[str]) -> list[str]:
    """How the proposer reads the prompts (logged; a warning for a defaulted brightness); raises for
    words outside an appearance proposer's vocabulary. Proposers without ``interpret`` (Grounding
    DINO reads free text) give no notes."""
    interpret = getattr(proposer, "interpret", None)
    if not callable(interpret):
        return []
    lines = [f"prompt {line}" for line in interpret(prompts)]
    for line in lines:
        (logger.warning if "no brightness word" in line else logger.info)("APPG %s", line)
    return lines


def _mean_std(records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Mean and population std of Dice and IoU over ``records`` (None when there are none)."""
    if not records:
        return None
    from monai_ssl.evaluation import summarize

    metrics = summarize(records)["metrics"]
    return {"n": len(records), **{k: {"mean": metrics[k]["mean"], "std": metrics[k]["std"]} for k in ("dice", "iou")}}


def appg_report(
    manifest_path: str | Path,
    truth_lookup: Callable[[str], str | Path | None] | None = None,
    out_dir: str | Path | None = None,
    overlay_count: int = 16,
    labelled_check: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """Counts, pseudo-label quality against truth masks where they exist, speed; CSV, JSON and overlays.

    ``truth_lookup`` maps a case id to its truth mask path; a ``None`` or a path that does not
    exist means no truth for that case. Pseudo-label Dice/IoU (``case_metrics``: an empty truth and
    an empty pseudo-label give 1) are summarised over all images with truth and over the valid
    ones; ``truth.empty_truth`` counts the images whose truth is empty (no target) and how many
    of them APPG still marked valid (an invented mask), ``truth.target_missed`` those with a
    target but no valid mask. Writes into ``out_dir`` (default ``<manifest folder>/report``):
    ``appg_per_case.csv`` and ``appg_summary.json`` (:func:`~monai_ssl.evaluation.write_report`),
    ``appg_report.json`` (the returned dict) and ``overlays/<case_id>.png`` (truth green,
    pseudo-label red) for the images :func:`overlay_selection` picks: all of them when there are
    at most ``overlay_count``, else a seeded sample of valid and invalid ones; ``overlays`` in the
    report names them and the rule. ``labelled_check`` (from :func:`run_appg`'s ``check_images``)
    and ``notes`` are copied into the report; ``warnings`` collects the check's warning.
    """
    from monai_ssl.evaluation import case_metrics, save_overlay, write_report

    manifest_path = Path(manifest_path)
    manifest = load_complete_manifest(manifest_path)
    records = manifest["images"]
    if not records:
        raise ValueError(f"APPG manifest {manifest_path} lists no images")
    out_dir = manifest_path.parent / "report" if out_dir is None else Path(out_dir)
    rows: list[dict[str, Any]] = []
    truths: dict[str, np.ndarray] = {}
    for record in records:
        case_id = record["case_id"]
        row: dict[str, Any] = {
            "case_id": case_id,
            "valid": record["valid"],
            "reason": record["reason"],
            "n_candidates": len(record["candidates"]),
            "chosen": ";".join(str(i) for i in record["chosen"]),
            "predicted_iou": record["predicted_iou"],
            "foreground_fraction": record["foreground_fraction"],
        }
        truth_path = truth_lookup(case_id) if truth_lookup is not None else None
        if truth_path is not None and Path(truth_path).is_file():
            truth = read_mask(truth_path)
            pred = read_mask(manifest_path.parent / record["mask"])
            if truth.shape != pred.shape:
                raise ValueError(f"APPG case {case_id}: truth {truth_path} is {truth.shape}, pseudo-label is {pred.shape}")
            truths[case_id] = truth
            metrics = case_metrics(pred, truth)
            row.update({k: metrics[k] for k in ("dice", "iou", "accuracy", "hd95", "asd", "empty_case")})
            row["truth_fraction"] = float(truth.mean())
        rows.append(row)
    write_report(rows, out_dir, prefix="appg")

    with_truth = [r for r in rows if "dice" in r]
    seconds = sum(r["seconds"] for r in records)
    empty_truth = [r for r in with_truth if r["truth_fraction"] == 0.0]
    summary: dict[str, Any] = {
        "manifest": str(manifest_path),
        "config_hash": manifest["config_hash"],
        "counts": count_records(records),
        "images_per_second": len(records) / seconds if seconds > 0 else None,
        "truth": None
        if not with_truth
        else {
            "all": _mean_std(with_truth),
            "valid": _mean_std([r for r in with_truth if r["valid"]]),
            "with_truth": len(with_truth),
            "empty_truth": {
                "n": len(empty_truth),
                "marked_valid": sum(1 for r in empty_truth if r["valid"]),
                "cases_marked_valid": [r["case_id"] for r in empty_truth if r["valid"]],
            },
            "target_missed": sum(1 for r in with_truth if r["truth_fraction"] > 0.0 and not r["valid"]),
        },
    }
    chosen, rule = overlay_selection(records, overlay_count)
    summary["overlays"] = {"rule": rule, "cases": [records[i]["case_id"] for i in chosen], "folder": str(out_dir / "overlays")}
    overlay_dir = out_dir / "overlays"
    if overlay_dir.is_dir():  # only this report's overlays, so the folder matches "overlays.cases"
        keep = {f"{records[i]['case_id']}.png" for i in chosen}
        for stale in overlay_dir.glob("*.png"):
            if stale.name not in keep:
                stale.unlink()
    for i in chosen:
        record, row = records[i], rows[i]
        case_id = record["case_id"]
        pred = read_mask(manifest_path.parent / record["mask"])
        truth = truths.get(case_id, np.zeros_like(pred))
        title = f"{case_id} {'valid' if record['valid'] else record['reason']}"
        if "dice" in row:
            title += f" dice={row['dice']:.2f}"
            if row["truth_fraction"] == 0.0 and record["valid"]:
                title += " (no target: invented mask)"
        save_overlay(read_gray8(record["image"]), truth, pred, overlay_dir / f"{case_id}.png", title, xy_order=False)
    summary["labelled_check"] = None if labelled_check is None else dict(labelled_check)
    summary["notes"] = list(notes)
    summary["warnings"] = [w for w in [(labelled_check or {}).get("warning")] if w]
    atomic_write(out_dir / "appg_report.json", json.dumps(summary, indent=2) + "\n")
    return summary


def overlay_selection(records: Sequence[Mapping[str, Any]], count: int, seed: int = 0) -> tuple[list[int], str]:
    """Which records get an overlay, and the rule in words.

    All of them when there are at most ``count``; else a sample drawn with
    ``numpy.random.default_rng(seed)``: ``count // 2`` invalid images (fewer when there are fewer)
    and valid ones for the rest, so that both kinds can be inspected. Indices in record order.
    """
    n = len(records)
    if count <= 0:
        return [], "none (overlay count 0)"
    if n <= count:
        return list(range(n)), f"all {n} images (overlay count {count})"
    valid = [i for i, r in enumerate(records) if r["valid"]]
    invalid = [i for i, r in enumerate(records) if not r["valid"]]
    n_invalid = min(len(invalid), count // 2)
    n_valid = min(len(valid), count - n_invalid)
    n_invalid = min(len(invalid), count - n_valid)
    rng = np.random.default_rng(seed)
    picked = sorted(
        [int(i) for i in rng.choice(valid, n_valid, replace=False)] + [int(i) for i in rng.choice(invalid, n_invalid, replace=False)]
    ) if (n_valid or n_invalid) else []
    rule = (
        f"a seeded sample (numpy default_rng({seed})) of {n_valid} of the {len(valid)} valid and {n_invalid} of the "
        f"{len(invalid)} invalid images (overlay count {count} < {n} images)"
    )
    return picked, rule
