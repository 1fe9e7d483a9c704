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

Eq.6 validity: ``valid = foreground_fraction > min_foreground`` (δ, default 0.01); an image
without any box is invalid (reason ``"no_box"``), one whose mask covers δ of the image or less is
invalid (reason ``"below_delta"``). Every image gets a mask file, empty when invalid.

Output folder::

    masks/<case_id>.png     0/255 8-bit PNG, same size and pixel layout as the source image
    journal.jsonl           a header line (config + hash), then one JSON line per finished image
    manifest.json           written last, with "complete": true
    report/                 appg_per_case.csv, appg_summary.json, appg_report.json, overlays/

Pixel layout: images are read with PIL as 8-bit grayscale arrays in natural row order (row = y),
and masks are written the same way, so a mask PNG opens aligned with its image in any viewer.
MONAI's PIL reader (the bundle pipeline) loads PNGs transposed, indexed ``[x, y]``; it loads the
image and its pseudo-label mask the same way, so they stay aligned there too. Boxes in the
manifest are inclusive pixel indices ``x0, y0, x1, y1`` (x = column).

Resuming and reuse: the run's settings (``config`` plus prompts, ``top_k``, policy and δ) are
hashed. Each finished image is appended to the journal (flushed and fsynced) after its mask is
written atomically, so a killed run continues with the images not yet in the journal (a partial
last line is ignored). A complete manifest with the same hash and the same image list makes
:func:`run_appg` return at once; with the same hash and another image list, journalled images are
reused and only the others computed. A different hash discards the previous results (journal,
manifest and the masks they list) and recomputes into the same folder, with a warning: the folder
always holds the results of exactly one configuration.

Worker processes: with ``workers > 1`` the images are split into chunks that ``workers``
processes (``spawn`` start method, ``threads_per_worker`` torch threads each) propose, segment
and choose masks for, each with its own unpickled copy of the proposer and segmenter
(precision wrappers such as ``AutocastSegmenter`` included, so they run exactly as in-process).
The parent process stays the only writer of the store (masks, journal, manifest, report): a
worker sends each chunk's masks back as PNG bytes, and the parent writes and journals them as
they come back, so resuming works as with one process. Workers die with the parent (Linux
``PR_SET_PDEATHSIG``, and a check before each image), so a killed run leaves no process behind
that computes or writes into a store a restarted run is using. The outputs do
not depend on ``workers``, which is therefore not part of the config hash. On this project's
2-core CPU, 2 workers x 1 thread beat 1 process x 2 intra-op threads (the models' kernels do not
scale well over 2 threads). Worker processes return freed memory to the system lazily (glibc
``mallopt``: no ``mmap`` for large blocks, a high trim threshold): re-faulting the encoder's
32 MiB activations on every call cost about a fifth of its time.

Concurrent runs: :func:`run_appg` holds :func:`store_lock` (an exclusive ``fcntl`` lock on
``<out_dir>/.appg.lock``) for its whole run, so two processes sharing a store (say two
benchmarks with different image lists) take turns instead of interleaving their journal and
manifest writes; the second reuses what the first journalled. A reader that needs the manifest
to describe *its* image list (the static-teacher warm-up) runs APPG and reads the manifest under
the same lock, which is re-entrant within a process.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import queue
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

# monai_ssl.data.datalist and monai_ssl.evaluation are imported where used: a worker process
# (see _WORKER_BOOTSTRAP) imports this module without the rest of monai_ssl and MONAI
from monai_ssl.foundation.appearance import DEFAULT_PROMPTS, BoxProposal, box_iou, prompt_brightness
from monai_ssl.foundation.interfaces import BoxProposer, PromptableSegmenter
from monai_ssl.foundation.litemedsam import BoxSegmentation
from monai_ssl.utils import atomic_path, atomic_write, remove_stale_temps_in

__all__ = [
    "CANDIDATE_POLICIES",
    "DEFAULT_RERANK",
    "INVALID_REASONS",
    "OPTIONAL_RERANK",
    "appg_report",
    "config_hash",
    "overlay_selection",
    "mask_evidence",
    "read_gray8",
    "rerank_score",
    "run_appg",
    "default_workers",
    "store_lock",
    "tune_malloc_for_inference",
    "valid_pseudo_datalist",
]

logger = logging.getLogger(__name__)

CANDIDATE_POLICIES: tuple[str, ...] = ("best_iou", "top_box", "union", "rerank")
#: Generic weights of the ``"rerank"`` policy (see :func:`rerank_score`), chosen without looking at
#: any masks: every piece of evidence counts once (weight 1 on its log: a plain product of the
#: evidence), the contrast scale and border penalty as the proposer's generic defaults.
#: :func:`monai_ssl.pseudo.calibration.calibrate` fits them on the split's labelled images. (Earlier
#: versions used score 0.5, predicted_iou 2, contrast_scale 0.3, box_agreement 2, border 4, chosen
#: on the truth of about 120 unlabelled BUSI images: label leakage.)
DEFAULT_RERANK: dict[str, float] = {
    "score": 1.0,  # weight of log(proposer box score)
    "predicted_iou": 1.0,  # weight of log(LiteMedSAM predicted IoU)
    "contrast": 1.0,  # weight of log(1 - exp(-contrast / contrast_scale))
    "contrast_scale": 0.2,  # mask contrast (ring vs inside, signed by the prompt's brightness) giving 1 - 1/e
    "box_agreement": 1.0,  # weight of log(IoU of the mask's bounding box with the prompt box)
    "border": 2.0,  # penalty per unit of the mask outline's fraction on the image border
}
#: Optional ``"rerank"`` weights, off unless given (and only then part of the config hash):
#: ``valid_bonus`` is added to the rank of candidates whose mask covers more than δ (Eq.6), trading
#: pseudo-label Dice for more valid images (development subset: bonus 0.5 gave 84 % valid at Dice
#: 0.70 against 78 % at 0.74 without it).
OPTIONAL_RERANK: dict[str, float] = {"valid_bonus": 0.0}
INVALID_REASONS: tuple[str, ...] = ("no_box", "below_delta")
#: Folder (inside the store) of the labelled-image check run.
CHECK_DIR = "labelled_check"
#: Default ``min_check_dice``: below it the labelled-image check warns.
DEFAULT_MIN_CHECK_DICE = 0.5
MANIFEST_NAME = "manifest.json"
JOURNAL_NAME = "journal.jsonl"
LOCK_NAME = ".appg.lock"
#: store lock file -> [open handle, nesting depth] for the locks this process holds
_HELD_LOCKS: dict[Path, list[Any]] = {}
MASK_DIR = "masks"
MANIFEST_VERSION = 1
MASK_LAYOUT = (
    "0/255 8-bit PNG, same size and pixel layout as the source image (natural row order: row = y); "
    "MONAI's PIL reader loads both transposed ([x, y]), so they stay aligned"
)


@contextlib.contextmanager
def store_lock(out_dir: str | Path) -> Iterator[None]:
    """Hold the exclusive lock of the APPG store ``out_dir`` (re-entrant within this process).

    Another process asking for it waits (a log line says so). Where ``fcntl`` does not exist
    (Windows) this is a no-op: do not share a store between concurrent runs there.
    """
    path = (Path(out_dir) / LOCK_NAME).resolve()
    held = _HELD_LOCKS.get(path)
    if held is not None:
        held[1] += 1
        try:
            yield
        finally:
            held[1] -= 1
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("APPG store %s is in use by another process: waiting for it", path.parent)
            fcntl.flock(handle, fcntl.LOCK_EX)
        _HELD_LOCKS[path] = [handle, 1]
        try:
            yield
        finally:
            del _HELD_LOCKS[path]
            fcntl.flock(handle, fcntl.LOCK_UN)


def config_hash(settings: Mapping[str, Any]) -> str:
    """SHA-256 of ``settings`` as canonical JSON (sorted keys; non-JSON values by ``str``)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_gray8(path: str | Path) -> np.ndarray:
    """An image file as a ``(H, W)`` uint8 grayscale array in natural row order: 8-bit images
    through PIL ``convert("L")``, 16/32-bit and float ones min-max scaled to 0..255
    (:func:`monai_ssl.data.readers.read_gray_uint8`, never clipped)."""
    from monai_ssl.data.readers import read_gray_uint8

    return read_gray_uint8(path)


def _read_mask(path: str | Path) -> np.ndarray:
    """A mask file as a bool ``(H, W)`` array (nonzero = foreground)."""
    return read_gray8(path) > 0


def _write_mask(path: Path, mask: np.ndarray) -> None:
    """Write a bool mask as a 0/255 8-bit PNG atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")


def _case_entries(images: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """``(case_id, image path)`` of each datalist entry; duplicate case ids are an error (they share a mask file)."""
    from monai_ssl.data.datalist import case_id_from_path

    entries: list[tuple[str, str]] = []
    for i, item in enumerate(images):
        image = item.get("image")
        if not isinstance(image, (str, os.PathLike)):
            raise ValueError(f"APPG image entry {i} needs one 'image' path, got {image!r}")
        entries.append((str(item.get("case_id") or case_id_from_path(image)), str(image)))
    seen: dict[str, str] = {}
    duplicates = []
    for case_id, image in entries:
        if case_id in seen:
            duplicates.append(f"{case_id} ({seen[case_id]} and {image})")
        seen[case_id] = image
    if duplicates:
        raise ValueError(f"APPG needs unique case ids (one mask file each); duplicated: {duplicates}")
    return entries


def _read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is absent or unreadable."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return content if isinstance(content, dict) else None


def _read_journal(path: Path) -> tuple[dict | None, list[dict]]:
    """Header and records of a journal; a partial last line (killed mid-write) is dropped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None, []
    parsed: list[dict] = []
    for number, line in enumerate(lines, start=1):
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"APPG journal {path}: line {number} is not valid JSON ({err}); delete the file to start over") from err
    if not parsed:
        return None, []
    return parsed[0], parsed[1:]


def _discard_previous(out_dir: Path, digest: str) -> None:
    """Remove the journal, manifest and masks of results made with another config hash."""
    manifest_path, journal_path = out_dir / MANIFEST_NAME, out_dir / JOURNAL_NAME
    header, journal_records = _read_journal(journal_path)
    manifest = _read_json(manifest_path)
    if (header is not None and "appg_journal" not in header) or (manifest is not None and manifest.get("stage") != "appg"):
        raise ValueError(f"{out_dir} holds a journal.jsonl or manifest.json that APPG did not write; choose another output folder")
    stale = []
    if header is not None and header.get("config_hash") != digest:
        stale.append((journal_path, journal_records, header.get("config_hash")))
    if manifest is not None and manifest.get("config_hash") != digest:
        stale.append((manifest_path, manifest.get("images", []), manifest.get("config_hash")))
    for path, records, old in stale:
        logger.warning("APPG %s was made with config hash %s, not %s: discarding it and its masks", path, old, digest)
        for record in records:
            mask = out_dir / MASK_DIR / f"{record.get('case_id')}.png"
            mask.unlink(missing_ok=True)
        path.unlink(missing_ok=True)


def _resume(out_dir: Path, digest: str, settings: Mapping[str, Any]) -> dict[str, dict]:
    """Records of the journal made with ``digest`` whose mask exists; rewrites the journal cleanly."""
    _discard_previous(out_dir, digest)
    journal_path = out_dir / JOURNAL_NAME
    header, records = _read_journal(journal_path)
    done = {r["case_id"]: r for r in records if (out_dir / r["mask"]).is_file()} if header is not None else {}
    lines = [json.dumps({"appg_journal": MANIFEST_VERSION, "config_hash": digest, "config": settings})]
    lines += [json.dumps(r) for r in done.values()]
    atomic_write(journal_path, "\n".join(lines) + "\n")
    return done


def mask_evidence(
    image: np.ndarray, mask: np.ndarray, box: Sequence[int], work_size: int = 128, brightness: str = "dark"
) -> dict[str, float]:
    """Image evidence for one candidate mask (no truth): is it a blob of the asked ``brightness``
    ("dark": darker than its surroundings, "bright": brighter) that agrees with its box?

    Computed on a copy whose longest side is at most ``work_size`` (speed). Returns
    ``contrast`` (mean of the robustly [0, 1]-scaled, lightly smoothed image in a ring around the
    mask minus its mean inside the mask, negated for "bright"; ring width a quarter of the mask's
    equivalent radius),
    ``box_agreement`` (IoU of the mask's bounding box with the prompt box), ``border`` (fraction
    of the mask's outline on the image border) and ``area_fraction``. An empty mask gives zeros
    (border 1).
    """
    if brightness not in ("dark", "bright"):
        raise ValueError(f"brightness must be 'dark' or 'bright', got {brightness!r}")
    gray = np.asarray(image, dtype=np.float64)
    if gray.ndim == 3:
        gray = gray.mean(axis=-1)
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return {"contrast": 0.0, "box_agreement": 0.0, "border": 1.0, "area_fraction": 0.0}
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    mask_box = (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))
    agreement = box_iou(mask_box, tuple(int(v) for v in box))
    step = max(1, int(np.ceil(max(gray.shape) / work_size)))
    small, small_mask = gray[::step, ::step], mask[::step, ::step]
    lo, hi = np.percentile(small, [1.0, 99.0])
    small = ndimage.gaussian_filter(np.clip((small - lo) / max(hi - lo, 1e-12), 0.0, 1.0), 1.0)
    contrast, border = 0.0, 1.0
    if small_mask.any():
        radius = np.sqrt(small_mask.sum() / np.pi)
        ring = ndimage.binary_dilation(small_mask, iterations=max(2, int(round(0.25 * radius)))) & ~small_mask
        contrast = float(small[ring].mean() - small[small_mask].mean()) if ring.any() else 0.0
        if brightness == "bright":
            contrast = -contrast
        edge = small_mask & ~ndimage.binary_erosion(small_mask)
        on_border = edge[0, :].sum() + edge[-1, :].sum() + edge[1:-1, 0].sum() + edge[1:-1, -1].sum()
        border = float(on_border / max(1, edge.sum()))
    return {"contrast": contrast, "box_agreement": float(agreement), "border": border, "area_fraction": float(mask.mean())}


def rerank_score(
    box_score: float, predicted_iou: float, evidence: Mapping[str, float], weights: Mapping[str, float] | None = None
) -> float:
    """Log-evidence of one candidate for the ``"rerank"`` policy (higher is better).

    ``w_score * log(box_score) + w_iou * log(predicted_iou) + w_contrast * log(1 - exp(-contrast /
    contrast_scale)) + w_agreement * log(box_agreement) - w_border * border``, with the weights of
    ``weights`` (keys of :data:`DEFAULT_RERANK`; missing keys take the defaults) and ``evidence``
    from :func:`mask_evidence` (its contrast already signed by the prompt's brightness). A mask
    without the asked contrast or an empty one scores very low but finitely, so ties still resolve.
    """
    w = {**DEFAULT_RERANK, **(weights or {})}
    floor = 1e-6
    contrast = 1.0 - np.exp(-max(float(evidence["contrast"]), floor) / w["contrast_scale"])
    return float(
        w["score"] * np.log(max(box_score, floor))
        + w["predicted_iou"] * np.log(max(predicted_iou, floor))
        + w["contrast"] * np.log(max(contrast, floor))
        + w["box_agreement"] * np.log(max(float(evidence["box_agreement"]), floor))
        - w["border"] * float(evidence["border"])
    )


def _choose(
    seg: BoxSegmentation,
    policy: str,
    ranks: Sequence[float] | None = None,
) -> tuple[np.ndarray, list[int], float]:
    """The pseudo-label mask, the chosen candidate indices and the predicted IoU under ``policy``.

    ``ranks`` (one :func:`rerank_score` per candidate) is needed by ``"rerank"``; ties go to the
    earlier (better-scored) box.
    """
    iou = np.asarray(seg.iou, dtype=np.float64)
    if policy == "union":
        return np.any(seg.masks, axis=0), list(range(len(iou))), float(iou.mean())
    if policy == "rerank":
        if ranks is None or len(ranks) != len(iou):
            raise ValueError("the rerank policy needs one rank per candidate")
        index = int(np.argmax(np.asarray(ranks, dtype=np.float64)))
    else:
        index = int(np.argmax(iou)) if policy == "best_iou" else 0
    return np.asarray(seg.masks[index], dtype=bool), [index], float(iou[index])


def _counts(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Total, valid and invalid-by-reason counts."""
    valid = sum(1 for r in records if r["valid"])
    invalid = {reason: sum(1 for r in records if r["reason"] == reason) for reason in INVALID_REASONS}
    return {"total": len(records), "valid": valid, "invalid": invalid}


def _process_chunk(
    chunk: Sequence[tuple[str, str]],
    out_dir: Path,
    proposer: BoxProposer,
    segmenter: PromptableSegmenter,
    prompts: Sequence[str],
    top_k: int,
    policy: str,
    min_foreground: float,
    rerank: Mapping[str, float] | None = None,
    brightness: Mapping[str, str] | None = None,
) -> list[dict]:
    """Propose, segment (one ``segment_batch`` call for the chunk), choose, write masks; records in chunk order.

    ``brightness`` maps a candidate's prompt to the brightness its mask evidence is measured for
    (default: :func:`~monai_ssl.foundation.appearance.prompt_brightness` with "dark").
    """
    images, proposals, seconds = [], [], []
    for case_id, image_path in chunk:
        start = time.perf_counter()
        try:
            image = read_gray8(image_path)
        except (OSError, ValueError) as err:
            raise RuntimeError(f"APPG case {case_id}: cannot read image {image_path}: {err}") from err
        found: list[BoxProposal] = list(proposer.propose(image, prompts, top_k))[:top_k]
        images.append(image)
        proposals.append(found)
        seconds.append(time.perf_counter() - start)

    with_boxes = [i for i, found in enumerate(proposals) if found]
    segmentations: dict[int, BoxSegmentation] = {}
    if with_boxes:
        start = time.perf_counter()
        results = segmenter.segment_batch(
            [images[i] for i in with_boxes], [np.array([p.box for p in proposals[i]], dtype=np.float32) for i in with_boxes]
        )
        share = (time.perf_counter() - start) / len(with_boxes)
        if len(results) != len(with_boxes):
            raise RuntimeError(f"segmenter {type(segmenter).__name__} returned {len(results)} results for {len(with_boxes)} images")
        for i, seg in zip(with_boxes, results):
            expected = (len(proposals[i]), *images[i].shape)
            if np.shape(seg.masks) != expected or np.shape(seg.iou) != (len(proposals[i]),):
                raise RuntimeError(
                    f"APPG case {chunk[i][0]}: segmenter {type(segmenter).__name__} returned masks {np.shape(seg.masks)} "
                    f"and IoU {np.shape(seg.iou)}, expected {expected} and ({len(proposals[i])},)"
                )
            segmentations[i] = seg
            seconds[i] += share

    records = []
    for i, (case_id, image_path) in enumerate(chunk):
        start = time.perf_counter()
        candidates = [
            {"box": list(p.box), "score": float(p.score), "prompt": p.prompt, "predicted_iou": None, "foreground_fraction": None}
            for p in proposals[i]
        ]
        if i in segmentations:
            seg = segmentations[i]
            ranks = []
            for candidate, mask, iou in zip(candidates, seg.masks, seg.iou):
                candidate["predicted_iou"] = float(iou)
                candidate["foreground_fraction"] = float(np.mean(mask))
                if policy == "rerank":
                    wanted = (brightness or {}).get(candidate["prompt"]) or prompt_brightness(candidate["prompt"])
                    evidence = mask_evidence(images[i], mask, candidate["box"], brightness=wanted)
                    candidate["evidence"] = {k: evidence[k] for k in ("contrast", "box_agreement", "border")}
                    candidate["rank"] = rerank_score(candidate["score"], float(iou), evidence, rerank)
                    if candidate["foreground_fraction"] > min_foreground:
                        candidate["rank"] += float((rerank or {}).get("valid_bonus", 0.0))
                    ranks.append(candidate["rank"])
            mask, chosen, predicted_iou = _choose(seg, policy, ranks if policy == "rerank" else None)
        else:
            mask, chosen, predicted_iou = np.zeros(images[i].shape, dtype=bool), [], None
        fraction = float(np.mean(mask))
        valid = bool(candidates) and fraction > min_foreground
        reason = "ok" if valid else ("no_box" if not candidates else "below_delta")
        mask_rel = f"{MASK_DIR}/{case_id}.png"
        _write_mask(out_dir / mask_rel, mask)
        records.append(
            {
                "case_id": case_id,
                "image": image_path,
                "mask": mask_rel,
                "height": int(images[i].shape[0]),
                "width": int(images[i].shape[1]),
                "candidates": candidates,
                "chosen": chosen,
                "predicted_iou": predicted_iou,
                "foreground_fraction": fraction,
                "valid": valid,
                "reason": reason,
                "seconds": seconds[i] + time.perf_counter() - start,
            }
        )
    return records


@dataclass(frozen=True)
class _ChunkJob:
    """The per-run settings of :func:`_process_chunk` (everything but the chunk and the models); pickles."""

    out_dir: Path
    prompts: list[str]
    top_k: int
    policy: str
    min_foreground: float
    rerank: Mapping[str, float] | None
    brightness: Mapping[str, str] | None = None

    def run(self, chunk: Sequence[tuple[str, str]], proposer: BoxProposer, segmenter: PromptableSegmenter) -> list[dict]:
        """:func:`_process_chunk` of ``chunk`` with these settings."""
        return _process_chunk(
            chunk, self.out_dir, proposer, segmenter, self.prompts, self.top_k, self.policy, self.min_foreground, self.rerank,
            self.brightness,
        )


def default_workers(device: str | torch.device = "cpu") -> int:
    """APPG worker processes to use by default: 1 on a GPU (one process keeps it busy), else one
    per CPU core up to 4 (each then gets ``torch.get_num_threads() // workers`` threads)."""
    return 1 if torch.device(device).type == "cuda" else min(4, os.cpu_count() or 1)


def tune_malloc_for_inference() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the system at once.

    ``mallopt(M_MMAP_MAX, 0)`` (large blocks come from the heap, not from fresh ``mmap`` pages)
    and ``mallopt(M_TRIM_THRESHOLD, 1 GiB)``. PyTorch's CPU tensors are plain ``malloc`` blocks,
    so without this every activation above glibc's mmap threshold (LiteMedSAM's encoder makes
    32 MiB ones at 256 x 256) is mapped, page-faulted and unmapped on every call: about a fifth
    of the encoder's time on this project's CPU. Process-wide and irreversible, so call it only in
    processes that do inference (APPG's workers, ``scripts/run_appg.py``). Returns False where
    ``mallopt`` does not exist (not glibc) or refuses; nothing changes then.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # this process's own symbols, libc's among them (no ldconfig subprocess)
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))


#: What a worker process runs (``exec``, the target of a spawned process). ``import monai_ssl``
#: imports every sub-package and MONAI (about 7 s of CPU here), while a worker needs only this
#: module, the foundation models and what the pickled proposer and segmenter import: so unless the
#: parent's main module has imported it already, ``monai_ssl`` is registered as a bare package
#: (its ``__init__`` not run) and its sub-modules are imported on demand as usual (about 3 s).
_WORKER_BOOTSTRAP = """
import sys, types
if "monai_ssl" not in sys.modules:
    package = types.ModuleType("monai_ssl", "monai_ssl without its __init__ (an APPG worker process)")
    package.__path__ = [PACKAGE_DIR]
    package.__file__ = PACKAGE_DIR + "/__init__.py"
    sys.modules["monai_ssl"] = package
from monai_ssl.pseudo.appg import _worker_main
_worker_main(*WORKER_ARGS)
"""

#: seconds a worker waits for a task before checking that its parent still lives
_WORKER_POLL_SECONDS = 5.0

#: ``prctl`` option (Linux ``<sys/prctl.h>``): the signal a process gets when its parent dies
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker die with its parent: on Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (the
    kernel kills it when the parent's process, strictly the thread that started it, ends, even by
    SIGKILL); then exit at once if the parent is gone already (it died before the ``prctl``).
    Elsewhere only the checks of :func:`_exit_if_orphaned` between images apply."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                logger.warning("APPG worker: prctl(PR_SET_PDEATHSIG) failed (errno %d)", ctypes.get_errno())
        except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
            pass
    _exit_if_orphaned(parent_pid)


def _exit_if_orphaned(parent_pid: int) -> None:
    """End this worker process now (no cleanup, nothing more sent or written) when the process that
    started it is gone: a dead parent's children are re-parented, so ``os.getppid()`` changes."""
    if os.getppid() != parent_pid:
        os._exit(1)


class _ParentCheckedProposer:
    """A worker's view of the proposer: checks before each image that the parent still lives."""

    def __init__(self, proposer: BoxProposer, parent_pid: int) -> None:
        self.proposer, self.parent_pid = proposer, parent_pid

    def propose(self, image: np.ndarray, prompts: Sequence[str], top_k: int) -> Sequence[BoxProposal]:
        """The wrapped proposer's boxes for ``image``, unless the parent is gone (then exit)."""
        _exit_if_orphaned(self.parent_pid)
        return self.proposer.propose(image, prompts, top_k)


def _staged_masks(staging: Path, records: Sequence[Mapping[str, Any]]) -> dict[str, bytes]:
    """The PNG bytes of each record's mask that a worker wrote under ``staging`` (its own folder,
    outside the store); the files are removed, so it holds at most one chunk's masks at a time."""
    masks = {}
    for record in records:
        path = staging / record["mask"]
        masks[record["mask"]] = path.read_bytes()
        path.unlink()
    return masks


def _worker_error(err: BaseException, chunk: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """Message (naming the case ids) and traceback text of an exception raised in a worker."""
    message = str(err)
    if not message.startswith("APPG case"):
        message = f"APPG case {', '.join(case_id for case_id, _ in chunk)}: {type(err).__name__}: {err}"
    return message, "".join(traceback.format_exception(err))


def _worker_main(
    index: int,
    payload: bytes,
    threads: int,
    tasks: Any,
    results: Any,
    parent_pid: int,
    staging: str,
) -> None:
    """Body of an APPG worker process: unpickle the job and models, then run chunks until told to stop.

    Messages on ``results``: ``("ok", index, number, (records, masks))`` per chunk (``masks``: the
    PNG bytes of each record's mask, by its relative path; the parent writes them into the store,
    which a worker never touches), ``("error", index, number, (message, traceback))`` for a failed
    chunk (the worker then stops) and ``("init_error", index, None, (message, traceback))`` when the
    models cannot be restored. Ctrl-C is left to the parent, which terminates the workers. A worker
    dies with its parent (:func:`_die_with_parent`) and checks before each task and image that the
    parent still lives, so a killed run leaves no worker computing for nobody. ``staging`` is this
    worker's own folder (outside the store) for the masks of the chunk it is computing.
    """
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the parent loaded these models already and said once how (e.g. the timm stand-in warning)
    logging.getLogger("monai_ssl.foundation").setLevel(logging.ERROR)
    try:
        tune_malloc_for_inference()
        torch.set_num_threads(threads)
        job, proposer, segmenter = pickle.loads(payload)
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises
        results.put(("init_error", index, None, (f"{type(err).__name__}: {err}", "".join(traceback.format_exception(err)))))
        return
    del payload
    proposer = _ParentCheckedProposer(proposer, parent_pid)
    job = replace(job, out_dir=Path(staging))
    while True:
        try:
            task = tasks.get(timeout=_WORKER_POLL_SECONDS)
        except queue.Empty:
            _exit_if_orphaned(parent_pid)
            continue
        _exit_if_orphaned(parent_pid)
        if task is None:
            return
        number, chunk = task
        try:
            records = job.run(chunk, proposer, segmenter)
            masks = _staged_masks(Path(staging), records)
        except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises
            results.put(("error", index, number, _worker_error(err, chunk)))
            return
        _exit_if_orphaned(parent_pid)
        results.put(("ok", index, number, (records, masks)))


def _run_in_workers(
    chunks: Sequence[Sequence[tuple[str, str]]],
    job: _ChunkJob,
    proposer: BoxProposer,
    segmenter: PromptableSegmenter,
    workers: int,
    threads: int,
    consume: Callable[[list[dict]], None],
) -> None:
    """Compute ``chunks`` in ``workers`` spawned processes; as each chunk finishes, this process
    writes its masks into ``job.out_dir`` and ``consume`` gets its records. A worker's error is
    raised here as a RuntimeError naming the case ids; on any error or interrupt the workers are
    terminated and joined (no orphans); workers die with this process if it is killed."""
    try:
        payload = pickle.dumps((job, proposer, segmenter), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as err:
        raise ValueError(
            f"APPG with workers={workers} sends the proposer ({type(proposer).__name__}) and segmenter "
            f"({type(segmenter).__name__}) to worker processes, but they do not pickle ({type(err).__name__}: {err}); "
            "use workers=1"
        ) from err
    context = multiprocessing.get_context("spawn")  # fork after torch's thread pool has run can hang
    tasks, results = context.Queue(), context.Queue()
    for number, chunk in enumerate(chunks):
        tasks.put((number, list(chunk)))
    for _ in range(workers):
        tasks.put(None)
    package = Path(__file__).resolve().parents[1]
    staging = Path(tempfile.mkdtemp(prefix="appg-workers-"))  # the workers' masks before this process writes them
    processes = [
        context.Process(
            target=exec,
            args=(
                _WORKER_BOOTSTRAP,
                {
                    "__name__": "__appg_worker__",
                    "PACKAGE_DIR": str(package),
                    "WORKER_ARGS": (i, payload, threads, tasks, results, os.getpid(), str(staging / str(i))),
                },
            ),
            name=f"appg-worker-{i}",
            daemon=True,
        )
        for i in range(workers)
    ]
    del payload
    finished = False
    try:
        for process in processes:
            process.start()
        remaining = len(chunks)
        while remaining:
            try:
                kind, index, _, content = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead or all(p.exitcode == 0 for p in processes):
                    codes = ", ".join(f"{p.name} exit code {p.exitcode}" for p in processes)
                    raise RuntimeError(f"APPG worker process ended without finishing its images ({codes})") from None
                continue
            if kind == "ok":
                records, masks = content
                for relative, data in masks.items():  # this process is the store's only writer
                    atomic_write(job.out_dir / relative, data)
                consume(records)
                remaining -= 1
            elif kind == "init_error":
                message, trace = content
                raise RuntimeError(f"APPG worker {index} could not restore the proposer and segmenter: {message}") from RuntimeError(trace)
            else:
                message, trace = content
                raise RuntimeError(message) from RuntimeError(f"worker {index} traceback:\n{trace}")
        finished = True
    finally:
        for process in processes:
            if process.pid is None:
                continue
            if not finished and process.is_alive():
                process.terminate()
            process.join(timeout=30.0)
            if process.is_alive():  # pragma: no cover - a worker stuck in a system call
                process.kill()
                process.join()
        for q in (tasks, results):
            q.close()
            q.cancel_join_thread()
        shutil.rmtree(staging, ignore_errors=True)


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
    entries = _case_entries(images)
    notes = list(notes) + _prompt_notes(proposer, prompts)
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
        existing = _read_json(manifest_path)
        if (
            existing is not None
            and existing.get("complete") is True
            and existing.get("config_hash") == digest
            and [(r["case_id"], r["image"]) for r in existing.get("images", [])] == entries
        ):
            logger.info("APPG %s is complete for config %s: nothing to do", manifest_path, digest[:12])
            report_file = out_dir / "report" / "appg_report.json"
            previous = _read_json(report_file)
            if previous is not None and (previous.get("labelled_check") != labelled_check or previous.get("notes") != notes):
                appg_report(manifest_path, truth_lookup, out_dir / "report", overlay_count, labelled_check, notes)
            return manifest_path

        out_dir.mkdir(parents=True, exist_ok=True)
        done = _resume(out_dir, digest, settings)
        manifest_path.unlink(missing_ok=True)  # rewritten, complete, at the end
        todo = [e for e in entries if e[0] not in done or done[e[0]]["image"] != e[1]]
        if done:
            logger.info("APPG resumes in %s: %d of %d images already done", out_dir, len(entries) - len(todo), len(entries))

        start = time.perf_counter()
        job = _ChunkJob(out_dir, list(prompts), top_k, candidate_policy, min_foreground, settings.get("rerank"), brightness)
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
                _run_in_workers(chunks, job, proposer, segmenter, used_workers, threads, journalled)
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
            "counts": _counts(records),
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
            _log_report(report)
        return manifest_path


def _log_report(report: Mapping[str, Any]) -> None:
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


def _prompt_notes(proposer: BoxProposer, prompts: Sequence[str]) -> list[str]:
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


def _labelled_check(
    check_images: Sequence[Mapping[str, Any]], out_dir: Path, min_check_dice: float, run_kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """Run APPG on the labelled ``check_images`` into ``out_dir`` and summarise its Dice against their masks."""
    truth = {}
    for case_id, item in zip((c for c, _ in _case_entries(check_images)), check_images):
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
    report = _read_json(out_dir / "report" / "appg_report.json") or appg_report(manifest_path, truth.get, out_dir / "report", 0)
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


def _load_complete_manifest(manifest_path: str | Path) -> dict:
    """The manifest, after checking it exists and is complete."""
    manifest = _read_json(Path(manifest_path))
    if manifest is None:
        raise FileNotFoundError(f"APPG manifest {manifest_path} is missing or not valid JSON; run APPG first")
    if manifest.get("complete") is not True:
        raise ValueError(f"APPG manifest {manifest_path} is not complete; rerun APPG to finish it")
    return manifest


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
    manifest = _load_complete_manifest(manifest_path)
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
            truth = _read_mask(truth_path)
            pred = _read_mask(manifest_path.parent / record["mask"])
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
        "counts": _counts(records),
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
        pred = _read_mask(manifest_path.parent / record["mask"])
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


def valid_pseudo_datalist(manifest_path: str | Path) -> list[dict[str, str]]:
    """``{"case_id", "image", "label"}`` for the valid images (Eq.6), label = absolute pseudo-label mask path.

    This is the training list of the static-teacher warm-up (methods spec §1.3).
    """
    manifest_path = Path(manifest_path)
    manifest = _load_complete_manifest(manifest_path)
    root = manifest_path.parent.resolve()
    return [
        {"case_id": r["case_id"], "image": r["image"], "label": str(root / r["mask"])}
        for r in manifest["images"]
        if r["valid"]
    ]
