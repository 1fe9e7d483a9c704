#!/usr/bin/env python
"""Make a seeded semi-supervised protocol datalist from a prepared dataset dir.

The split logic is ``monai_ssl.data.make_protocol_split`` (see its docstring for the rules):
train/validation/test by ``--split`` ratios (largest-remainder rounding), or by community ID
lists (``--train-list``/``--test-list``; validation = ``floor(--val-fraction * n_train_list)``
cases carved from the train list); labelled = ``max(1, floor(fraction * n_train))`` (BUSI
517 train: 2.5/10/20 % -> 12/51/103) or ``--labeled-count``; the rest of train is unlabelled.

``--group-regex`` splits by subject instead of by image: a group id (patient, fetus, volume) is
parsed from each image file name (the regex's named group ``group``, else its first group, else
the whole match; a file it does not match is an error naming it); the sorted group ids are
shuffled with ``numpy.random.default_rng(seed)`` and laid end to end; each whole group goes to
the part (train, validation, test, with the case counts of ``--split`` by largest-remainder
rounding) in which its middle case falls, so one subject's images never straddle train,
validation and test and the parts hold about their share of the cases. The labelled cases are
then the first of the train cases shuffled with the same generator. ``--unlabeled-count N`` keeps
only the first N unlabelled cases (of the shuffled order; the others are left out of the datalist).

Examples::

    python scripts/make_datalist.py --dataset-dir data/busi --name busi --split 8:1:1 \\
        --labeled-fraction 0.1 --seed 0 --out datalists/busi_10pct.json
    python scripts/make_datalist.py --dataset-dir data/ddti --name ddti --split 8:1:1 --labeled-fraction 0.1 \
        --group-regex '^(?P<group>\\d+)_' --unlabeled-count 200 --out datalists/ddti_10pct_by_patient.json
    python scripts/make_datalist.py --dataset-dir data/la --name la --train-list ../shared/data/la_heart/train.list \\
        --test-list ../shared/data/la_heart/test.list --id-format 'la_{}' --labeled-fraction 0.1 --out datalists/la_10pct.json
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from monai_ssl.data.datalist import (  # noqa: E402
    DatalistError,
    _entry_for,
    _labeled_count,
    _largest_remainder,
    make_protocol_split,
    save_datalist,
    scan_dataset_dir,
)


def group_of(entries: Sequence[Mapping[str, str]], pattern: str) -> dict[str, str]:
    """Case id -> group id parsed from the image file name by ``pattern`` (see the module docstring)."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise DatalistError(f"--group-regex {pattern!r} is not a valid regular expression: {e}") from e
    groups, unmatched = {}, []
    for e in entries:
        name = Path(e["image"]).name
        match = regex.search(name)
        if match is None:
            unmatched.append(e["image"])
            continue
        group = match.group("group") if "group" in regex.groupindex else (match.group(1) if regex.groups else match.group(0))
        groups[e["case_id"]] = group
    if unmatched:
        raise DatalistError(f"--group-regex {pattern!r} matches no group id in {len(unmatched)} file name(s): {unmatched[:10]}")
    return groups


def group_protocol_split(
    entries: Sequence[Mapping[str, str]],
    groups: Mapping[str, str],
    *,
    name: str,
    seed: int,
    split: Sequence[float],
    labeled_fraction: float | None,
    labeled_count: int | None,
    group_regex: str,
    dataset_dir_hint: str,
    created_by: str,
) -> dict[str, Any]:
    """A protocol datalist split by group (see the module docstring); same layout as ``make_protocol_split``."""
    ratios = [float(x) for x in split]
    if len(ratios) != 3 or any(r < 0 for r in ratios) or ratios[0] <= 0:
        raise DatalistError(f"split must be three non-negative ratios train:val:test with train > 0, got {split}")
    pool = {e["case_id"]: e for e in entries}
    members: dict[str, list[str]] = {}
    for case_id in sorted(pool):
        members.setdefault(groups[case_id], []).append(case_id)
    rng = np.random.default_rng(seed)
    order = [sorted(members)[i] for i in rng.permutation(len(members))]
    targets = _largest_remainder(len(pool), ratios)
    bounds = np.cumsum(targets)  # a group goes to the part its middle case falls in
    parts: list[list[str]] = [[], [], []]
    placed = 0
    for group in order:
        middle = placed + len(members[group]) / 2.0
        parts[min(2, int(np.searchsorted(bounds, middle, side="left")))].extend(members[group])
        placed += len(members[group])
    train, val, test = parts
    if not train:
        raise DatalistError("the group split left no training cases")
    train = [sorted(train)[i] for i in rng.permutation(len(train))]
    n_lab = _labeled_count(len(train), labeled_fraction, labeled_count)
    labeled, unlabeled = train[:n_lab], train[n_lab:]
    group_sets = [{groups[c] for c in p} for p in (train, val, test)]
    return {
        "name": name,
        "protocol": {
            "split": ":".join(f"{r:g}" for r in ratios) + " by group",
            "split_rule": (
                f"group id = --group-regex {group_regex!r} on the image file name; sorted group ids shuffled with numpy "
                "default_rng(seed) and laid end to end; each whole group to the part (largest-remainder case counts) its "
                "middle case falls in; train cases shuffled with the same generator, the first labelled"
            ),
            "labeled_fraction": labeled_fraction,
            "labeled_count": n_lab,
            "labeled_rule": (
                f"labeled_count={labeled_count} given" if labeled_count is not None
                else "max(1, floor(labeled_fraction * n_train)); the first cases of the shuffled train set"
            ),
            "counts": {
                "total": len(pool),
                "train": len(train),
                "labeled": len(labeled),
                "unlabeled": len(unlabeled),
                "validation": len(val),
                "test": len(test),
                "groups": {"train": len(group_sets[0]), "validation": len(group_sets[1]), "test": len(group_sets[2])},
            },
        },
        "seed": seed,
        "dataset_dir_hint": dataset_dir_hint,
        "created_by": created_by,
        "labeled": [_entry_for("labeled", pool[i]) for i in labeled],
        "unlabeled": [_entry_for("unlabeled", pool[i]) for i in unlabeled],
        "validation": [_entry_for("validation", pool[i]) for i in val],
        "test": [_entry_for("test", pool[i]) for i in test],
    }


def cap_unlabeled(datalist: dict[str, Any], count: int) -> dict[str, Any]:
    """Keep the first ``count`` unlabelled cases; the protocol records the cap and how many were left out."""
    if count < 0:
        raise DatalistError(f"--unlabeled-count must be >= 0, got {count}")
    available = len(datalist["unlabeled"])
    datalist["unlabeled"] = datalist["unlabeled"][:count]
    counts = datalist["protocol"]["counts"]
    counts["unlabeled"] = len(datalist["unlabeled"])
    counts["unlabeled_left_out"] = available - counts["unlabeled"]
    counts["total"] -= counts["unlabeled_left_out"]
    counts["train"] -= counts["unlabeled_left_out"]
    datalist["protocol"]["unlabeled_rule"] = f"the first {count} unlabelled cases of the shuffled train set (--unlabeled-count)"
    return datalist


def _read_ids(path: Path, id_format: str) -> list[str]:
    """Non-empty, non-comment lines of an ID list file, each formatted with ``id_format``."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise DatalistError(f"cannot read ID list {path}: {e}") from e
    ids = [id_format.format(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not ids:
        raise DatalistError(f"ID list {path} is empty")
    return ids


def _parse_split(text: str) -> tuple[float, float, float]:
    """Parse ``train:val:test`` ratios such as ``8:1:1``."""
    parts = text.split(":")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"--split must look like 8:1:1, got {text!r}")
    return values  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the CLI."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset-dir", type=Path, required=True, help="prepared dataset dir (images/+labels/ or imagesTr/+labelsTr/)")
    p.add_argument("--name", required=True, help="dataset name recorded in the datalist")
    p.add_argument("--out", type=Path, required=True, help="output datalist JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", type=_parse_split, default=None, help="train:val:test ratios (default 8:1:1; not with ID lists)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--labeled-fraction", type=float, help="labelled fraction of the train set, e.g. 0.025, 0.1, 0.2")
    group.add_argument("--labeled-count", type=int, help="number of labelled cases, e.g. 1")
    p.add_argument("--train-list", type=Path, help="file of train IDs, one per line (e.g. the community LA train.list)")
    p.add_argument("--test-list", type=Path, help="file of test IDs, one per line")
    p.add_argument("--val-fraction", type=float, default=0.1, help="with ID lists: validation fraction carved from train (default 0.1)")
    p.add_argument("--id-format", default="{}", help="maps a list ID to a case id, e.g. 'la_{}' (default '{}')")
    p.add_argument("--group-regex", default=None,
                   help="split by the group id (patient, volume) this regex finds in each image file name, e.g. '^(?P<group>\\d+)_'")
    p.add_argument("--unlabeled-count", type=int, default=None, help="keep at most this many unlabelled cases")
    p.add_argument("--hint", default=None, help="dataset_dir_hint recorded in the datalist (default: derived from --dataset-dir)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (1 with a message on a data error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.train_list is None) != (args.test_list is None):
        parser.error("give both --train-list and --test-list, or neither")
    if args.train_list is not None and args.split is not None:
        parser.error("--split cannot be combined with --train-list/--test-list")
    if args.train_list is not None and args.group_regex is not None:
        parser.error("--group-regex cannot be combined with --train-list/--test-list (the lists already fix the split)")
    try:
        entries = scan_dataset_dir(args.dataset_dir)
        train_ids = test_ids = None
        if args.train_list is not None:
            train_ids = _read_ids(args.train_list, args.id_format)
            test_ids = _read_ids(args.test_list, args.id_format)
        hint = args.hint or f"{args.dataset_dir} prepared by scripts/prepare_data.py"
        if args.group_regex is not None:
            datalist = group_protocol_split(
                entries, group_of(entries, args.group_regex), name=args.name, seed=args.seed, split=args.split or (8, 1, 1),
                labeled_fraction=args.labeled_fraction, labeled_count=args.labeled_count, group_regex=args.group_regex,
                dataset_dir_hint=hint, created_by="python scripts/make_datalist.py " + shlex.join(argv),
            )
        else:
            datalist = make_protocol_split(
                entries,
                name=args.name,
                seed=args.seed,
                split=args.split or (8, 1, 1),
                labeled_fraction=args.labeled_fraction,
                labeled_count=args.labeled_count,
                train_ids=train_ids,
                test_ids=test_ids,
                val_fraction=args.val_fraction,
                dataset_dir_hint=hint,
                created_by="python scripts/make_datalist.py " + shlex.join(argv),
            )
        if args.unlabeled_count is not None:
            datalist = cap_unlabeled(datalist, args.unlabeled_count)
    except DatalistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    save_datalist(args.out, datalist)
    counts = datalist["protocol"]["counts"]
    print(f"{args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
