"""Tests for monai_ssl.evaluation: metrics, reports, overlays, plots and handlers."""

from __future__ import annotations

import csv
import json
import logging
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from PIL import Image

from bundle_utils import BUNDLES_2D, config_path, make_workflow, tiny_overrides
from monai_ssl.evaluation import (
    EMPTY_CASE_POLICY,
    CaseReportHandler,
    MetricsLogger,
    case_metrics,
    log_written_masks,
    plot_training_curves,
    read_metrics_log,
    save_overlay,
    summarize,
    training_curves_figure,
    write_report,
)


def _square(shape: tuple[int, ...], start: tuple[int, ...], size: int) -> np.ndarray:
    """Bool array with an axis-aligned square/cube of side ``size`` at ``start``."""
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


# --------------------------------------------------------------------------- metrics


def test_overlap_metrics_4x4() -> None:
    pred = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    truth = np.array([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    m = case_metrics(pred, truth)
    # |P|=4, |T|=4, |P&T|=2, |P|T|=6, 4 of 16 pixels disagree
    assert m["dice"] == pytest.approx(2 * 2 / 8)
    assert m["iou"] == pytest.approx(2 / 6)
    assert m["accuracy"] == pytest.approx(12 / 16)
    assert m["empty_case"] == "none"
    assert "hd95_mm" not in m and "asd_mm" not in m
    # torch input with a leading channel gives the same values
    t = case_metrics(torch.from_numpy(pred)[None], torch.from_numpy(truth)[None].bool())
    assert t == m


def test_surface_distances_2x2_squares_shift3() -> None:
    pred = _square((10, 10), (3, 2), 2)
    truth = _square((10, 10), (3, 5), 2)
    m = case_metrics(pred, truth)
    # every pixel is a surface pixel; each direction gives distances [3, 3, 2, 2]
    assert m["hd95"] == pytest.approx(3.0)
    assert m["asd"] == pytest.approx(2.5)
    assert m["dice"] == 0.0


def test_surface_distances_4x4_squares_shift3() -> None:
    pred = _square((12, 12), (2, 1), 4)
    truth = _square((12, 12), (2, 4), 4)
    m = case_metrics(pred, truth)
    # 12 surface pixels per square; each direction: 4x0, 2x1, 2x2, 4x3 -> pooled 24 values
    pooled = np.array(([0] * 4 + [1] * 2 + [2] * 2 + [3] * 4) * 2, dtype=float)
    assert m["hd95"] == pytest.approx(np.percentile(pooled, 95)) and m["hd95"] == pytest.approx(3.0)
    assert m["asd"] == pytest.approx(36 / 24)


def test_surface_distances_3d_cubes() -> None:
    pred = _square((8, 8, 8), (2, 2, 1), 2)
    truth = _square((8, 8, 8), (2, 2, 3), 2)
    m = case_metrics(pred, truth)
    # all 8 voxels are surface; each direction: 4 voxels at 1, 4 at 2 along z
    assert m["hd95"] == pytest.approx(2.0)
    assert m["asd"] == pytest.approx(1.5)
    # a single voxel against a 3x3x3 cube centred on it: pred->truth 1 (nearest face),
    # truth->pred: 6 face centres 1, 12 edges sqrt2, 8 corners sqrt3 (centre is not surface)
    cube = _square((7, 7, 7), (2, 2, 2), 3)
    voxel = _square((7, 7, 7), (3, 3, 3), 1)
    m = case_metrics(voxel, cube)
    pooled = np.array([1.0] + [1.0] * 6 + [math.sqrt(2)] * 12 + [math.sqrt(3)] * 8)
    assert m["hd95"] == pytest.approx(np.percentile(pooled, 95))
    assert m["asd"] == pytest.approx(pooled.mean())


def test_spacing_scales_mm_values() -> None:
    # shift of 3 along columns (axis 1) with spacing (2.0, 0.5): pixel values x 0.5
    pred = _square((10, 10), (3, 2), 2)
    truth = _square((10, 10), (3, 5), 2)
    m = case_metrics(pred, truth, spacing=(2.0, 0.5))
    assert m["hd95"] == pytest.approx(3.0) and m["asd"] == pytest.approx(2.5)
    assert m["hd95_mm"] == pytest.approx(1.5)
    assert m["asd_mm"] == pytest.approx(1.25)
    # the same shift along rows (axis 0): pixel values x 2
    m = case_metrics(pred.T, truth.T, spacing=(2.0, 0.5))
    assert m["hd95_mm"] == pytest.approx(6.0)
    assert m["asd_mm"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(pred, truth, spacing=(1.0, 1.0, 1.0))


def test_asd_matches_monai_symmetric_average_surface_distance() -> None:
    from monai.metrics import compute_average_surface_distance
    from scipy import ndimage

    rng = np.random.default_rng(1)
    for shape, spacing in (((40, 50), (0.7, 1.3)), ((20, 24, 18), (1.0, 2.0, 0.5))):
        a, b = (ndimage.gaussian_filter(rng.random(shape), 3) > 0.5 for _ in range(2))
        m = case_metrics(a, b, spacing=spacing)
        ta, tb = (torch.from_numpy(x)[None, None].float() for x in (a, b))
        assert m["asd"] == pytest.approx(compute_average_surface_distance(ta, tb, symmetric=True).item())
        ref_mm = compute_average_surface_distance(ta, tb, symmetric=True, spacing=list(spacing)).item()
        assert m["asd_mm"] == pytest.approx(ref_mm)


@pytest.mark.parametrize(
    ("pred_on", "truth_on", "case", "dice", "penalty"),
    [
        (False, False, "both_empty", 1.0, False),
        (False, True, "pred_empty", 0.0, True),
        (True, False, "truth_empty", 0.0, True),
        (True, True, "none", 1.0, False),
    ],
)
def test_empty_case_policy(pred_on: bool, truth_on: bool, case: str, dice: float, penalty: bool) -> None:
    shape, spacing = (6, 8, 5), (1.0, 2.0, 3.0)
    full = _square(shape, (2, 2, 2), 2)
    empty = np.zeros(shape, dtype=bool)
    m = case_metrics(full if pred_on else empty, full if truth_on else empty, spacing=spacing)
    assert m["empty_case"] == case
    assert m["dice"] == dice and m["iou"] == dice
    diag = math.sqrt(6**2 + 8**2 + 5**2) if penalty else 0.0
    diag_mm = math.sqrt(6**2 + 16**2 + 15**2) if penalty else 0.0
    assert m["hd95"] == pytest.approx(diag) and m["asd"] == pytest.approx(diag)
    assert m["hd95_mm"] == pytest.approx(diag_mm) and m["asd_mm"] == pytest.approx(diag_mm)
    assert m["accuracy"] == pytest.approx(1.0 if pred_on == truth_on else 1 - 8 / full.size)


def test_case_metrics_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        case_metrics(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="binary"):
        case_metrics(np.full((4, 4), 0.7), np.zeros((4, 4)))


def test_summarize_against_numpy() -> None:
    rng = np.random.default_rng(0)
    records = [
        {"case_id": f"c{i}", "dice": float(d), "hd95": float(h), "empty_case": "none"}
        for i, (d, h) in enumerate(zip(rng.random(7), rng.random(7) * 10))
    ]
    records[2]["empty_case"] = "pred_empty"
    s = summarize(records)
    dice = np.array([r["dice"] for r in records])
    assert s["metrics"]["dice"]["mean"] == pytest.approx(dice.mean())
    assert s["metrics"]["dice"]["std"] == pytest.approx(dice.std(ddof=0))
    assert s["metrics"]["dice"]["median"] == pytest.approx(np.median(dice))
    assert s["metrics"]["dice"]["n"] == 7 and s["n_cases"] == 7
    assert s["empty_cases"] == {"none": 6, "both_empty": 0, "pred_empty": 1, "truth_empty": 0}
    records[4]["dice"] = float("nan")
    with pytest.raises(ValueError, match="c4"):
        summarize(records)


# --------------------------------------------------------------------------- report


def test_write_report(tmp_path) -> None:
    pred = _square((10, 10), (3, 2), 2)
    truth = _square((10, 10), (3, 5), 2)
    records = [
        {"case_id": "a", **case_metrics(pred, truth, spacing=(1.0, 2.0))},
        {"case_id": "b", **case_metrics(truth, truth, spacing=(1.0, 2.0))},
        {"case_id": "c", **case_metrics(np.zeros((10, 10)), truth, spacing=(1.0, 2.0))},
    ]
    summary = write_report(records, tmp_path / "out", prefix="val")
    with open(tmp_path / "out" / "val_per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[0] == "case_id"
    assert [r["case_id"] for r in rows] == ["a", "b", "c"]
    assert float(rows[1]["dice"]) == 1.0 and rows[2]["empty_case"] == "pred_empty"
    on_disk = json.loads((tmp_path / "out" / "val_summary.json").read_text())
    assert on_disk == summary
    assert on_disk["policy"] == EMPTY_CASE_POLICY
    assert on_disk["metrics"]["dice"]["mean"] == pytest.approx(1 / 3)
    assert on_disk["empty_cases"]["pred_empty"] == 1
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ValueError, match="duplicate"):
        write_report(records + records[:1], tmp_path / "dup")


# --------------------------------------------------------------------------- overlay


def test_save_overlay_2d(tmp_path) -> None:
    image = np.linspace(0, 1, 32 * 40).reshape(32, 40)
    truth = _square((32, 40), (4, 4), 8)
    pred = _square((32, 40), (20, 25), 8)
    path = tmp_path / "o" / "case.png"
    save_overlay(image[None], truth, pred, path, title="case", xy_order=False)
    k = 256 // 40
    rgb = np.asarray(Image.open(path).convert("RGB"))
    assert rgb.shape == (32 * k + 16, 40 * k, 3)
    body = rgb[16:]
    green = (body[..., 0] == 0) & (body[..., 1] == 255) & (body[..., 2] == 0)
    red = (body[..., 0] == 255) & (body[..., 1] == 0) & (body[..., 2] == 0)
    assert green.any() and red.any()
    gy, gx = np.nonzero(green)
    ry, rx = np.nonzero(red)
    assert gy.min() >= 4 * k and gy.max() < 12 * k and gx.min() >= 4 * k and gx.max() < 12 * k
    assert ry.min() >= 20 * k and ry.max() < 28 * k and rx.min() >= 25 * k and rx.max() < 33 * k
    # square interiors are not painted
    assert not green[8 * k, 8 * k] and not red[24 * k, 29 * k]


def test_save_overlay_xy_order_shows_the_array_transposed(tmp_path) -> None:
    truth = _square((32, 40), (4, 20), 8)  # MONAI [x, y] order: x in 4..11, y in 20..27
    save_overlay(np.zeros((32, 40)), truth, np.zeros((32, 40)), tmp_path / "xy.png")
    k = 256 // 40
    rgb = np.asarray(Image.open(tmp_path / "xy.png").convert("RGB"))[16:]
    assert rgb.shape[:2] == (40 * k, 32 * k)  # 32 wide (x), 40 high (y)
    gy, gx = np.nonzero((rgb[..., 1] == 255) & (rgb[..., 0] == 0))
    assert gx.min() >= 4 * k and gx.max() < 12 * k and gy.min() >= 20 * k and gy.max() < 28 * k


def test_save_overlay_3d_and_empty(tmp_path) -> None:
    image = np.random.default_rng(0).random((300, 260, 5))
    truth = np.zeros((300, 260, 5), dtype=bool)
    truth[10:50, 10:50, 3] = True
    truth[20:30, 20:30, 1] = True
    pred = np.zeros_like(truth)
    save_overlay(image, truth, pred, tmp_path / "a.png", xy_order=False)
    rgb = np.asarray(Image.open(tmp_path / "a.png").convert("RGB"))[16:]
    green = (rgb[..., 0] == 0) & (rgb[..., 1] == 255) & (rgb[..., 2] == 0)
    assert rgb.shape[:2] == (300, 260)
    ys, xs = np.nonzero(green)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (10, 49, 10, 49)  # slice 3, the largest truth
    save_overlay(np.zeros((20, 20)), np.zeros((20, 20)), np.zeros((20, 20)), tmp_path / "empty.png")
    assert Image.open(tmp_path / "empty.png").size == (20 * 12, 20 * 12 + 16)


# --------------------------------------------------------------------------- plots and logger


def test_plot_training_curves(tmp_path) -> None:
    log = tmp_path / "metrics.jsonl"
    lines = [{"epoch": 1, "iteration": i, "loss": 1 / i, "loss_sup": 0.5 / i, "loss_cons": 0.1} for i in range(1, 30)]
    lines.append({"epoch": 1, "iteration": 29, "val_mean_dice": 0.5})
    lines.append({"epoch": 2, "iteration": 58, "val_mean_dice": 0.7, "val_hd95": 3.0})
    log.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"epoch": 2, "iter')  # truncated last line
    out = tmp_path / "plots" / "curves.png"
    plot_training_curves(log, out)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert len(read_metrics_log(log)) == len(lines)


def test_training_curves_label_their_axes_and_show_the_warm_up(tmp_path) -> None:
    log, warmup = tmp_path / "metrics.jsonl", tmp_path / "stwp" / "metrics.jsonl"
    log.write_text("\n".join(json.dumps(x) for x in [
        {"epoch": 1, "iteration": 10, "loss": 1.0, "loss_sup": 0.8},
        {"epoch": 1, "iteration": 10, "val_mean_dice": 0.5},
    ]) + "\n")
    warmup.parent.mkdir()
    warmup.write_text("\n".join(json.dumps({"epoch": 1, "iteration": i, "loss": 2.0 / i}) for i in range(1, 6)) + "\n")
    fig = training_curves_figure(log, warmup)
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert list(panels) == ["warm-up (static teacher)", "training", "validation"]
    assert panels["validation"].get_ylabel() == "Dice"
    assert panels["training"].get_ylabel() == panels["warm-up (static teacher)"].get_ylabel() == "loss (log scale)"
    assert panels["warm-up (static teacher)"].get_xlabel() == "warm-up iteration"
    warm_line = panels["warm-up (static teacher)"].get_lines()[0]
    assert list(warm_line.get_xdata()) == [1, 2, 3, 4, 5] and warm_line.get_label() == "loss"
    # no warm-up log (a bundle without the stage, or a static teacher trained before it logged): two panels
    assert [ax.get_title() for ax in training_curves_figure(log, tmp_path / "absent.jsonl").axes] == ["training", "validation"]
    plot_training_curves(log, tmp_path / "curves.png", warmup)
    assert (tmp_path / "curves.png").is_file()


def test_metrics_logger_appends(tmp_path) -> None:
    log = tmp_path / "logs" / "train.jsonl"

    def run(n_iter: int, list_output: bool, stage: str | None = None) -> None:
        def step(engine: Engine, batch: int) -> object:
            out = {"loss": torch.tensor(0.5), "loss_sup": 0.25, "loss_cons": torch.tensor([0.25]),
                   "pred": torch.zeros(1, 4, 4), "flag": True}
            return [out, {"loss": 9.0}] if list_output else out

        trainer = Engine(step)
        evaluator = Engine(lambda e, b: None)


        @evaluator.on(Events.COMPLETED)
        def _set_metrics(e: Engine) -> None:
            e.state.metrics.update({"mean_dice": 0.8, "val_hd95": torch.tensor(2.0), "per_class": torch.ones(3)})

        MetricsLogger(log, log_every=2, stage=stage).attach(trainer, evaluator)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0]))
        trainer.run(range(n_iter), max_epochs=1)

    run(4, list_output=False)
    first = read_metrics_log(log)
    assert first[0] == {"epoch": 1, "iteration": 2, "loss": 0.5, "loss_sup": 0.25, "loss_cons": 0.25}
    assert [r["iteration"] for r in first] == [2, 4, 4]
    assert first[-1] == {"epoch": 1, "iteration": 4, "val_mean_dice": 0.8, "val_hd95": 2.0}
    run(2, list_output=True, stage="warmup")  # a logger of another stage on the same file appends
    second = read_metrics_log(log)
    assert second[:3] == first and len(second) == 5
    assert second[3]["loss"] == 0.5 and second[3]["stage"] == "warmup"


# --------------------------------------------------------------------------- evaluator handler


def test_case_report_handler_on_supervised_evaluator(tmp_path, caplog) -> None:
    from monai.data import DataLoader, Dataset, MetaTensor
    from monai.engines import SupervisedEvaluator
    from monai.transforms import Activationsd, AsDiscreted, Compose

    def logits(mask: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.where(mask, 6.0, -6.0)).float()[None]

    truth = _square((16, 16), (4, 4), 4)
    shifted = _square((16, 16), (4, 6), 4)  # overlap 4x2 -> dice 2*8/32 = 0.5
    pixdim = np.array([1.0, 0.5, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    data = [
        {"image": MetaTensor(logits(shifted), meta={"filename_or_obj": "/d/case_a.nii.gz", "pixdim": pixdim}),
         "label": torch.from_numpy(truth).float()[None]},
        {"image": MetaTensor(logits(truth), meta={"filename_or_obj": "/d/case_b.nii.gz", "pixdim": pixdim}),
         "label": torch.from_numpy(truth).float()[None]},
        {"image": MetaTensor(logits(np.zeros((16, 16), bool)), meta={"filename_or_obj": "/e/case_a.png",
                                                                        "pixdim": pixdim}),
         "label": torch.from_numpy(truth).float()[None]},
    ]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(data), batch_size=2),
        network=torch.nn.Identity(),
        postprocessing=Compose([Activationsd("pred", sigmoid=True), AsDiscreted("pred", threshold=0.5)]),
    )
    handler = CaseReportHandler(tmp_path / "eval", overlay_count=2, prefix="val")
    handler.attach(evaluator)
    with caplog.at_level(logging.INFO, logger="monai_ssl.evaluation.handlers"):
        evaluator.run()
        evaluator.run()  # records reset at STARTED: still three cases
    with open(tmp_path / "eval" / "val_per_case.csv", newline="") as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["case_a", "case_b", "case_a_2"]
    assert float(rows["case_a"]["dice"]) == pytest.approx(0.5)
    assert float(rows["case_b"]["dice"]) == 1.0
    assert rows["case_a_2"]["empty_case"] == "pred_empty"
    # spacing = pixdim[1:3] of the NIfTI-style meta
    expected = case_metrics(shifted, truth, spacing=(0.5, 2.0))
    assert float(rows["case_a"]["hd95_mm"]) == pytest.approx(expected["hd95_mm"])
    assert float(rows["case_a"]["asd_mm"]) == pytest.approx(expected["asd_mm"])
    summary = json.loads((tmp_path / "eval" / "val_summary.json").read_text())
    assert summary == handler.summary and summary["n_cases"] == 3
    assert summary["metrics"]["dice"]["mean"] == pytest.approx(0.5)
    assert sorted(p.name for p in (tmp_path / "eval" / "overlays").iterdir()) == ["case_a.png", "case_b.png"]
    assert "3 cases: Dice 0.5000" in caplog.text


# ------------------------------------------------------------------- one figure, one policy
def _run_metric(metric, cases: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Value of an ignite metric (e.g. a bundle's ``validate#key_metric``) over (pred, truth) cases."""
    def step(engine, batch):
        return [{"pred": torch.from_numpy(p).float()[None], "label": torch.from_numpy(t).float()[None]} for p, t in batch]

    engine = Engine(step)
    metric.attach(engine, "dice")
    engine.run([cases[:2], cases[2:]])
    return float(engine.state.metrics["dice"])


@pytest.mark.parametrize("bundle", [*BUNDLES_2D, "dual_network_3d"])
def test_validation_dice_of_every_bundle_follows_the_empty_case_policy(bundle: str) -> None:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_path(bundle, "train.json"))
    metric = parser.get_parsed_content("validate#key_metric#val_mean_dice")
    truth = _square((16, 16), (4, 4), 4)
    empty = np.zeros((16, 16), bool)
    cases = [
        (_square((16, 16), (4, 6), 4), truth),  # dice 0.5
        (truth, truth),  # 1
        (truth, empty),  # a false alarm on a lesion-free image: 0 (MONAI's MeanDice leaves it out)
        (empty, empty),  # both empty: 1
    ]
    expected = summarize([case_metrics(p, t) for p, t in cases])["metrics"]["dice"]["mean"]
    assert expected == pytest.approx(0.625)
    assert _run_metric(metric, cases) == pytest.approx(expected)


@pytest.mark.parametrize("bundle", ["supervised"])
def test_evaluation_prints_one_test_figure(bundle: str, tmp_path) -> None:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_path(bundle, "inference.json"))
    (tmp_path / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "models" / "model.pt")
    ev = make_workflow(bundle, ["train.json", "evaluate.json"], **tiny_overrides(tmp_path))
    ev.initialize()
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger().addHandler(handler)  # after the bundle's logging.conf replaced the root handlers
    try:
        ev.run()
    finally:
        logging.getLogger().removeHandler(handler)
    evaluator = ev.parser.get_parsed_content("validate#evaluator")
    assert evaluator.state.metrics == {}, "a second, differently computed Dice figure"
    assert not [m for m in messages if "val_mean_dice" in m], messages
    figures = [m for m in messages if "Dice" in m]
    assert len(figures) == 1 and figures[0].startswith("test split, 4 cases: Dice"), figures
    summary = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())
    assert summary["split"] == "test" and f"Dice {summary['metrics']['dice']['mean']:.4f}" in figures[0]


def test_log_written_masks_counts_this_runs_masks_only(tmp_path, caplog) -> None:
    import os
    import time

    old = tmp_path / "old_mask.png"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))  # left by an earlier run
    for name in ("a_mask.png", "b_mask.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    engine = Engine(lambda e, b: None)
    engine.run([0])
    with caplog.at_level(logging.INFO, logger="monai_ssl.evaluation.report"):
        assert log_written_masks(tmp_path, engine) == 2
    assert f"inference wrote 2 masks to {tmp_path.resolve()}" in caplog.text
