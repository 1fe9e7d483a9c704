"""The APPG store on disk: its layout, lock, settings hash, mask files, journal and manifest.

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

Concurrent runs: :func:`run_appg` holds :func:`store_lock` (an exclusive ``fcntl`` lock on
``<out_dir>/.appg.lock``) for its whole run, so two processes sharing a store (say two
benchmarks with different image lists) take turns instead of interleaving their journal and
manifest writes; the second reuses what the first journalled. A reader that needs the manifest
to describe *its* image list (the static-teacher warm-up) runs APPG and reads the manifest under
the same lock, which is re-entrant within a process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from monai_ssl.utils import atomic_path, atomic_write

__all__ = [
    "JOURNAL_NAME",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "MASK_DIR",
    "MASK_LAYOUT",
    "case_entries",
    "config_hash",
    "load_complete_manifest",
    "read_gray8",
    "read_journal",
    "read_json",
    "read_mask",
    "resume_journal",
    "store_lock",
    "valid_pseudo_datalist",
    "write_mask",
]

#: one log channel for all of APPG (run, store, selection, workers, report)
logger = logging.getLogger("monai_ssl.pseudo.appg")

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


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as a bool ``(H, W)`` array (nonzero = foreground)."""
    return read_gray8(path) > 0


def write_mask(path: Path, mask: np.ndarray) -> None:
    """Write a bool mask as a 0/255 8-bit PNG atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")


def case_entries(images: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
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


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is absent or unreadable."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return content if isinstance(content, dict) else None


def read_journal(path: Path) -> tuple[dict | None, list[dict]]:
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
    header, journal_records = read_journal(journal_path)
    manifest = read_json(manifest_path)
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


def resume_journal(out_dir: Path, digest: str, settings: Mapping[str, Any]) -> dict[str, dict]:
    """Records of the journal made with ``digest`` whose mask exists; rewrites the journal cleanly."""
    _discard_previous(out_dir, digest)
    journal_path = out_dir / JOURNAL_NAME
    header, records = read_journal(journal_path)
    done = {r["case_id"]: r for r in records if (out_dir / r["mask"]).is_file()} if header is not None else {}
    lines = [json.dumps({"appg_journal": MANIFEST_VERSION, "config_hash": digest, "config": settings})]
    lines += [json.dumps(r) for r in done.values()]
    atomic_write(journal_path, "\n".join(lines) + "\n")
    return done


def load_complete_manifest(manifest_path: str | Path) -> dict:
    """The manifest, after checking it exists and is complete."""
    manifest = read_json(Path(manifest_path))
    if manifest is None:
        raise FileNotFoundError(f"APPG manifest {manifest_path} is missing or not valid JSON; run APPG first")
    if manifest.get("complete") is not True:
        raise ValueError(f"APPG manifest {manifest_path} is not complete; rerun APPG to finish it")
    return manifest


def valid_pseudo_datalist(manifest_path: str | Path) -> list[dict[str, str]]:
    """``{"case_id", "image", "label"}`` for the valid images (Eq.6), label = absolute pseudo-label mask path.

    This is the training list of the static-teacher warm-up (methods spec §1.3).
    """
    manifest_path = Path(manifest_path)
    manifest = load_complete_manifest(manifest_path)
    root = manifest_path.parent.resolve()
    return [
        {"case_id": r["case_id"], "image": r["image"], "label": str(root / r["mask"])}
        for r in manifest["images"]
        if r["valid"]
    ]
