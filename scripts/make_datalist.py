#!/usr/bin/env python
"""Make a seeded semi-supervised protocol datalist from a prepared dataset dir.

The split logic is ``monai_ssl.data.make_protocol_split`` (see its docstring for the rules):
train/validation/test by ``--split`` ratios (largest-remainder rounding), or by community ID
lists (``--train-list``/``--test-list``; validation = ``floor(--val-fraction * n_train_list)``
cases carved from the train list); labelled = ``max(1, floor(fraction * n_train))`` (BUSI
517 train: 2.5/10/20 % -> 12/51/103) or ``--labeled-count``; the rest of train is unlabelled.

Examples::

    python scripts/make_datalist.py --dataset-dir data/busi --name busi --split 8:1:1 \\
        --labeled-fraction 0.1 --seed 0 --out datalists/busi_10pct.json
    python scripts/make_datalist.py --dataset-dir data/la --name la --train-list ../shared/data/la_heart/train.list \\
        --test-list ../shared/data/la_heart/test.list --id-format 'la_{}' --labeled-fraction 0.1 --out datalists/la_10pct.json
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from monai_ssl.data.datalist import DatalistError, make_protocol_split, save_datalist, scan_dataset_dir  # noqa: E402


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
    try:
        entries = scan_dataset_dir(args.dataset_dir)
        train_ids = test_ids = None
        if args.train_list is not None:
            train_ids = _read_ids(args.train_list, args.id_format)
            test_ids = _read_ids(args.test_list, args.id_format)
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
            dataset_dir_hint=args.hint or f"{args.dataset_dir} prepared by scripts/prepare_data.py",
            created_by="python scripts/make_datalist.py " + shlex.join(argv),
        )
    except DatalistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    save_datalist(args.out, datalist)
    counts = datalist["protocol"]["counts"]
    print(f"{args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
