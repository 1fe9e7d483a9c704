"""Datalist files: loading with checks, atomic saving and seeded protocol splits.

A datalist is a decathlon-style JSON object with four list keys and some metadata::

    {
        "name": "busi",
        "protocol": {...},          # how the split was made (see make_protocol_split)
        "seed": 0,
        "dataset_dir_hint": "data/busi prepared by scripts/prepare_data.py busi",
        "created_by": "python scripts/make_datalist.py ...",
        "labeled":    [{"image": "images/benign_0001.png", "label": "labels/benign_0001.png"}, ...],
        "unlabeled":  [{"image": "images/benign_0002.png"}, ...],
        "validation": [...],
        "test":       [...]
    }

Paths are relative to a dataset directory given at load time, so one datalist works on
every machine where the data was prepared the same way.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_ssl.utils import atomic_write

__all__ = [
    "DatalistError",
    "case_id_from_path",
    "load_datalist",
    "make_protocol_split",
    "save_datalist",
    "scan_dataset_dir",
]

#: Keys whose entries must carry a ``label``.
_KEYS_NEEDING_LABELS: tuple[str, ...] = ("labeled", "validation")
#: Entry fields holding paths relative to the dataset directory.
_PATH_FIELDS: tuple[str, ...] = ("image", "label")
#: Multi-part suffixes stripped when deriving a case id from a file name.
_MULTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".tar.gz")
#: Image/label folder pairs recognised by :func:`scan_dataset_dir`.
_LAYOUTS: tuple[tuple[str, str], ...] = (("images", "labels"), ("imagesTr", "labelsTr"))
_IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".nii.gz", ".nii", ".h5", ".hdf5", ".npy", ".mha", ".nrrd")


class DatalistError(ValueError):
    """A datalist file is malformed, inconsistent with the dataset directory, or unusable."""


def case_id_from_path(path: str | Path) -> str:
    """Return the file name of ``path`` without its suffix (``.nii.gz`` counts as one suffix)."""
    name = Path(path).name
    for suffix in _MULTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def save_datalist(path: str | Path, datalist: Mapping[str, Any]) -> None:
    """Write ``datalist`` as JSON (indent 4) atomically: temp file in the same folder, then rename."""
    atomic_write(path, json.dumps(datalist, indent=4) + "\n")


def _resolve_entry_path(rel: Any, root: str, where: str, problems: list[str]) -> str | None:
    """Make ``rel`` absolute under ``root``; record a problem and return None when it is invalid."""
    if not isinstance(rel, str) or not rel:
        problems.append(f"{where}: expected a non-empty relative path string, got {rel!r}")
        return None
    if os.path.isabs(rel):
        problems.append(f"{where}: absolute path {rel!r} is not allowed (paths are relative to the dataset dir)")
        return None
    full = os.path.normpath(os.path.join(root, rel))
    if os.path.commonpath([root, full]) != root:
        problems.append(f"{where}: path {rel!r} escapes the dataset dir {root}")
        return None
    # then follow symbolic links: a link (the file's or a folder's on its way) may not lead out either
    real_root, real = os.path.realpath(root), os.path.realpath(full)
    if os.path.commonpath([real_root, real]) != real_root:
        problems.append(
            f"{where}: path {rel!r} leads out of the dataset dir {root} through a symbolic link (to {real}); "
            "copy the file into the dataset dir or point dataset_dir at the folder that holds it"
        )
        return None
    return full


def load_datalist(
    datalist_path: str | Path, dataset_dir: str | Path, key: str, check_files: bool = True
) -> list[dict]:
    """Load the ``key`` list of a datalist with every path made absolute under ``dataset_dir``.

    Every other field of an entry is kept; ``case_id`` (the image file name without suffix) is
    added when absent. Raises :class:`DatalistError` (naming the file, the key and every bad
    entry) for an unknown key, an absolute or escaping path, missing files (all of them are
    listed), entries without ``image`` (or without ``label`` under ``labeled``/``validation``),
    and an empty ``labeled`` or ``validation`` list. An empty ``unlabeled`` (or ``test``) list
    is returned as ``[]``. A path may not leave ``dataset_dir``, neither with ``..`` nor through
    a symbolic link: it is checked as written, then with every link resolved (links that stay
    inside the dataset dir, and a dataset dir that is itself a link, are fine). The returned
    paths are as written (``dataset_dir`` joined, ``..`` collapsed), links not resolved.
    """
    datalist_path = Path(datalist_path)
    try:
        with open(datalist_path, encoding="utf-8") as f:
            content = json.load(f)
    except FileNotFoundError as e:
        raise DatalistError(f"datalist file {datalist_path} does not exist") from e
    except json.JSONDecodeError as e:
        raise DatalistError(f"datalist file {datalist_path} is not valid JSON: {e}") from e
    if not isinstance(content, dict):
        raise DatalistError(f"datalist file {datalist_path}: top level must be a JSON object, got {type(content).__name__}")
    list_keys = [k for k, v in content.items() if isinstance(v, list)]
    if key not in list_keys:
        raise DatalistError(
            f"datalist file {datalist_path}: unknown key {key!r}; list keys in this file: {list_keys}"
        )
    entries = content[key]
    if not entries and key == "labeled":
        raise DatalistError(f"datalist file {datalist_path}: no labelled cases under key 'labeled' (the list is empty)")
    if not entries and key == "validation":
        raise DatalistError(
            f"datalist file {datalist_path}: no cases under key 'validation' (the list is empty); training selects "
            "and saves models/model.pt by validation Dice, so it needs at least one labelled validation case"
        )

    root = os.path.normpath(os.path.abspath(os.path.expanduser(str(dataset_dir))))
    hint = f" (expected: {content['dataset_dir_hint']})" if content.get("dataset_dir_hint") else ""
    if check_files and not os.path.isdir(root):
        raise DatalistError(f"datalist file {datalist_path}, key {key!r}: dataset dir {root} does not exist{hint}")

    problems: list[str] = []
    missing: list[str] = []
    out: list[dict] = []
    for i, entry in enumerate(entries):
        where = f"entry {i}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected an object, got {type(entry).__name__}")
            continue
        required = ("image", "label") if key in _KEYS_NEEDING_LABELS else ("image",)
        absent = [f for f in required if f not in entry]
        if absent:
            problems.append(f"{where} ({entry.get('image', '?')}): missing field(s) {absent}")
            continue
        item = dict(entry)
        n_problems = len(problems)
        for field in _PATH_FIELDS:
            if field not in entry:
                continue
            values = entry[field] if isinstance(entry[field], list) else [entry[field]]
            if not values:
                problems.append(f"{where} {field}: empty list of paths")
                continue
            resolved = [_resolve_entry_path(v, root, f"{where} {field}", problems) for v in values]
            if any(r is None for r in resolved):
                continue
            if check_files:
                missing.extend(r for r in resolved if not os.path.isfile(r))
            item[field] = resolved if isinstance(entry[field], list) else resolved[0]
        if len(problems) > n_problems:
            continue
        if "case_id" not in item:
            item["case_id"] = case_id_from_path(item["image"][0] if isinstance(item["image"], list) else item["image"])
        out.append(item)

    if problems:
        raise DatalistError(
            f"datalist file {datalist_path}, key {key!r}: {len(problems)} bad entr{'y' if len(problems) == 1 else 'ies'}:\n  "
            + "\n  ".join(problems)
        )
    if missing:
        raise DatalistError(
            f"datalist file {datalist_path}, key {key!r}: {len(missing)} file(s) missing under dataset dir {root}"
            f"{hint}:\n  " + "\n  ".join(missing)
        )
    return out


def scan_dataset_dir(dataset_dir: str | Path) -> list[dict[str, str]]:
    """List the image/label pairs of a prepared dataset dir, sorted by case id.

    Recognised layouts: ``images/<id>.*`` + ``labels/<id>.*`` (2D) and ``imagesTr/<id>.*`` +
    ``labelsTr/<id>.*`` (3D). Returns entries ``{"case_id", "image", "label"}`` with paths
    relative to ``dataset_dir``. Raises :class:`DatalistError` naming every image without a label.
    """
    dataset_dir = Path(dataset_dir)
    for image_folder, label_folder in _LAYOUTS:
        if (dataset_dir / image_folder).is_dir():
            break
    else:
        raise DatalistError(
            f"dataset dir {dataset_dir}: found none of the layouts "
            f"{[f'{a}/ + {b}/' for a, b in _LAYOUTS]} (prepare it with scripts/prepare_data.py)"
        )
    labels = {
        case_id_from_path(p): p.name
        for p in (dataset_dir / label_folder).glob("*")
        if p.is_file() and p.name.endswith(_IMAGE_SUFFIXES)
    }
    entries: list[dict[str, str]] = []
    unpaired: list[str] = []
    for p in sorted((dataset_dir / image_folder).glob("*")):
        if not (p.is_file() and p.name.endswith(_IMAGE_SUFFIXES)):
            continue
        cid = case_id_from_path(p)
        if cid not in labels:
            unpaired.append(f"{image_folder}/{p.name}")
            continue
        entries.append({"case_id": cid, "image": f"{image_folder}/{p.name}", "label": f"{label_folder}/{labels[cid]}"})
    if unpaired:
        raise DatalistError(
            f"dataset dir {dataset_dir}: {len(unpaired)} image(s) without a label in {label_folder}/:\n  "
            + "\n  ".join(unpaired)
        )
    if not entries:
        raise DatalistError(f"dataset dir {dataset_dir}: no images found in {image_folder}/")
    return sorted(entries, key=lambda e: e["case_id"])


def _largest_remainder(n: int, ratios: Sequence[float]) -> list[int]:
    """Split ``n`` items in proportion to ``ratios``: floor each share, then hand the leftover
    items one by one to the parts with the largest fractional remainders (ties: earlier part)."""
    total = float(sum(ratios))
    exact = [n * r / total for r in ratios]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _labeled_count(n_train: int, labeled_fraction: float | None, labeled_count: int | None) -> int:
    """Number of labelled cases: ``labeled_count``, or ``max(1, floor(fraction * n_train))``."""
    if (labeled_fraction is None) == (labeled_count is None):
        raise DatalistError("give exactly one of labeled_fraction and labeled_count")
    if labeled_count is not None:
        if not 1 <= labeled_count <= n_train:
            raise DatalistError(f"labeled_count={labeled_count} must be between 1 and the {n_train} training cases")
        return labeled_count
    assert labeled_fraction is not None
    if not 0.0 < labeled_fraction <= 1.0:
        raise DatalistError(f"labeled_fraction={labeled_fraction} must be in (0, 1]")
    # the small epsilon keeps e.g. 0.1 * 30 = 3.0000000000000004 -> 3 and 0.3 * 10 = 2.9999999999999996 -> 3
    return max(1, math.floor(labeled_fraction * n_train + 1e-9))


def _entry_for(key: str, entry: Mapping[str, str]) -> dict[str, str]:
    """The datalist record of one case: image and label, or only the image for unlabelled cases."""
    if key == "unlabeled":
        return {"image": entry["image"]}
    return {"image": entry["image"], "label": entry["label"]}


def make_protocol_split(
    entries: Sequence[Mapping[str, str]],
    *,
    name: str,
    seed: int = 0,
    split: Sequence[float] = (8, 1, 1),
    labeled_fraction: float | None = None,
    labeled_count: int | None = None,
    train_ids: Sequence[str] | None = None,
    test_ids: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    dataset_dir_hint: str = "",
    created_by: str = "",
) -> dict[str, Any]:
    """Build a seeded semi-supervised protocol datalist from image/label ``entries``.

    ``entries`` are mappings with ``image`` and ``label`` (relative paths) and optionally
    ``case_id`` (default: image file name without suffix). They are sorted by case id and then
    shuffled with ``numpy.random.default_rng(seed)``, so the result depends only on the set of
    cases and the seed.

    Without ID lists the shuffled cases are cut into train/validation/test in the ratio ``split``
    (largest-remainder rounding: floor each part, leftovers to the largest fractional parts;
    647 cases with 8:1:1 give 517/65/65). With ``train_ids``/``test_ids`` (e.g. the community
    LA 80/20 lists) the test set is ``test_ids``, and the validation set is
    ``max(1, floor(val_fraction * len(train_ids)))`` cases carved from the train list after the
    labelled ones; the labelled count is computed on the whole train list so that 10 % of the
    community's 80 train volumes is 8.

    The labelled cases are the first ``max(1, floor(labeled_fraction * n_train))`` (or
    ``labeled_count``) cases of the shuffled train set: floor reproduces the published BUSI
    counts 12/51/103 for 2.5/10/20 % of 517, and with a fixed seed smaller labelled sets are
    subsets of larger ones. The remaining train cases are unlabelled (listed without label).
    """
    pool: dict[str, dict[str, str]] = {}
    for e in entries:
        cid = e.get("case_id") or case_id_from_path(e["image"])
        if cid in pool:
            raise DatalistError(f"duplicate case id {cid!r}: {pool[cid]['image']} and {e['image']}")
        if "label" not in e:
            raise DatalistError(f"case {cid!r} ({e['image']}) has no label; every case needs one for a protocol split")
        pool[cid] = dict(e)
    rng = np.random.default_rng(seed)

    if train_ids is None and test_ids is None:
        ratios = [float(x) for x in split]
        if len(ratios) != 3 or any(r < 0 for r in ratios) or ratios[0] <= 0:
            raise DatalistError(f"split must be three non-negative ratios train:val:test with train > 0, got {split}")
        ids = [sorted(pool)[i] for i in rng.permutation(len(pool))]
        n_train, n_val, n_test = _largest_remainder(len(ids), ratios)
        train, val, test = ids[:n_train], ids[n_train : n_train + n_val], ids[n_train + n_val :]
        n_lab = _labeled_count(n_train, labeled_fraction, labeled_count)
        labeled, unlabeled = train[:n_lab], train[n_lab:]
        split_desc = ":".join(f"{r:g}" for r in ratios)
        split_rule = (
            "cases sorted by id, shuffled with numpy default_rng(seed), cut into train/validation/test by "
            "largest-remainder rounding of the ratios"
        )
    elif train_ids is not None and test_ids is not None:
        unknown = [i for i in list(train_ids) + list(test_ids) if i not in pool]
        if unknown:
            raise DatalistError(
                f"{len(unknown)} id(s) of the train/test lists not found among the {len(pool)} cases: {unknown}"
            )
        overlap = sorted(set(train_ids) & set(test_ids))
        if overlap:
            raise DatalistError(f"ids in both the train and the test list: {overlap}")
        if len(set(train_ids)) != len(train_ids) or len(set(test_ids)) != len(test_ids):
            raise DatalistError("the train or test list contains duplicate ids")
        n_list = len(train_ids)
        n_lab = _labeled_count(n_list, labeled_fraction, labeled_count)
        n_val = max(1, math.floor(val_fraction * n_list + 1e-9))
        if n_lab + n_val > n_list:
            raise DatalistError(
                f"{n_lab} labelled + {n_val} validation cases exceed the {n_list} ids of the train list"
            )
        shuffled = [sorted(train_ids)[i] for i in rng.permutation(n_list)]
        labeled, val, unlabeled = shuffled[:n_lab], shuffled[n_lab : n_lab + n_val], shuffled[n_lab + n_val :]
        test = sorted(test_ids)
        n_train = n_list
        split_desc = f"train/test id lists ({n_list}/{len(test_ids)})"
        split_rule = (
            "test = the test list; train list sorted, shuffled with numpy default_rng(seed): first the labelled "
            f"cases, then max(1, floor({val_fraction:g} * n_train_list)) validation cases, the rest unlabelled"
        )
    else:
        raise DatalistError("give both train_ids and test_ids, or neither")

    protocol: dict[str, Any] = {
        "split": split_desc,
        "split_rule": split_rule,
        "labeled_fraction": labeled_fraction,
        "labeled_count": n_lab,
        "labeled_rule": (
            f"labeled_count={labeled_count} given" if labeled_count is not None
            else "max(1, floor(labeled_fraction * n_train)); the first cases of the shuffled train set"
        ),
        "counts": {
            "total": len(labeled) + len(unlabeled) + len(val) + len(test),
            "train": n_train,
            "labeled": len(labeled),
            "unlabeled": len(unlabeled),
            "validation": len(val),
            "test": len(test),
        },
    }
    if train_ids is not None:
        protocol["val_fraction"] = val_fraction
    return {
        "name": name,
        "protocol": protocol,
        "seed": seed,
        "dataset_dir_hint": dataset_dir_hint,
        "created_by": created_by,
        "labeled": [_entry_for("labeled", pool[i]) for i in labeled],
        "unlabeled": [_entry_for("unlabeled", pool[i]) for i in unlabeled],
        "validation": [_entry_for("validation", pool[i]) for i in val],
        "test": [_entry_for("test", pool[i]) for i in test],
    }
