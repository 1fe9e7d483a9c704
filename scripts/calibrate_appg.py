#!/usr/bin/env python
"""Calibrate APPG on the LABELLED images of a datalist only (``monai_ssl.pseudo.calibration``).

Reads the images and masks of the datalist's ``--key`` list (default ``labeled``) and nothing
else: fits the appearance proposer's priors (target size, position, brightness relative to the
surrounding ring, contrast, border contact) from the masks, then proposes and segments those
images once (LiteMedSAM by default) to fit the rerank weights by a small grid search. Writes a
JSON for ``scripts/run_appg.py --calibration`` or the dual_teacher bundle's ``appg_calibration``.

Examples::

    python scripts/calibrate_appg.py --dataset-dir data/busi --datalist datalists/busi_2.5pct.json --out runs/appg/busi.calib.json
    python scripts/calibrate_appg.py --dataset-dir data/ddti --datalist datalists/ddti_10pct.json --out ddti.calib.json \\
        --prompts "bright oval" --no-segmenter
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the CLI."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset-dir", type=Path, required=True, help="prepared dataset dir (images/ + labels/)")
    p.add_argument("--datalist", type=Path, default=None, help="datalist JSON (default <dataset-dir>/datalist.json)")
    p.add_argument("--key", default="labeled", help="datalist key of the labelled images (default labeled)")
    p.add_argument("--out", type=Path, required=True, help="calibration JSON to write")
    p.add_argument("--prompts", nargs="+", default=None, help="prompts to fit for (default: the paper's shape words, measured brightness)")
    p.add_argument("--top-k", type=int, default=3, help="candidate boxes per image (default 3, as run_appg.py)")
    p.add_argument("--no-segmenter", action="store_true", help="fit the proposer priors only (rerank weights stay generic)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="LiteMedSAM precision (default auto)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (1 with a message on a data error)."""
    from monai_ssl.data.datalist import DatalistError, load_datalist
    from monai_ssl.foundation.appearance import AppearanceBoxProposer
    from monai_ssl.foundation.interfaces import AutocastSegmenter, bf16_supported
    from monai_ssl.pseudo.calibration import calibrate, save_calibration

    args = build_parser().parse_args(argv)
    datalist = args.datalist or args.dataset_dir / "datalist.json"
    try:
        labelled = load_datalist(datalist, args.dataset_dir, args.key)
        segmenter = None
        if not args.no_segmenter:
            from monai_ssl.foundation.litemedsam import LiteMedSAMPredictor

            segmenter = LiteMedSAMPredictor()
            if args.precision == "bf16" or (args.precision == "auto" and bf16_supported()):
                segmenter = AutocastSegmenter(segmenter)
        calibration = calibrate(
            labelled, AppearanceBoxProposer(), segmenter, prompts=args.prompts, top_k=args.top_k,
            source=f"{len(labelled)} images of key {args.key!r} of {datalist}",
        )
    except (DatalistError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    save_calibration(args.out, calibration)
    stats, proposer = calibration["measured"], calibration["proposer"]
    print(f"APPG calibration from {stats['n_labelled']} labelled images ({stats['n_with_target']} with a target) -> {args.out}")
    print(f"  brightness {calibration['brightness']} (median ring-minus-inside contrast {stats['contrast']['median']:+.3f}); prompts {calibration['prompts']}")
    print(
        f"  size prior median {proposer['size_prior'][0]:.4f} log-std {proposer['size_prior'][1]:.2f}, "
        f"area [{proposer['min_area']:.4f}, {proposer['max_area']:.3f}]; position prior {proposer['position_prior']}"
    )
    fit = calibration["rerank_fit"]
    if fit is not None:
        print(
            f"  rerank weights {calibration['rerank']}: Dice on the labelled images {fit['dice_fitted']:.4f} "
            f"(generic weights {fit['dice_generic_weights']:.4f}, best candidate {fit['dice_best_candidate']:.4f})"
        )
    for warning in calibration["warnings"]:
        print(f"  WARNING: {warning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
