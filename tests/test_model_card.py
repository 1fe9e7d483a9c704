"""Model cards: a trained model carries the settings it was trained with, and evaluation/inference use them.

The configs of every bundle are exercised for real (``ConfigParser`` on the shipped JSON files):
the card writer is the one ``train.json`` attaches to its validation evaluator, and the settings
evaluate/inference take or check are read through ``evaluate.json`` / ``inference.json``.
The end-to-end run (train, then evaluate and infer without repeating ``--spatial_size``) is in
``tests/test_bundles.py::test_one_epoch_lowers_the_loss_then_evaluate_and_infer``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser

from bundle_utils import BUNDLES_2D, config_path, error_messages
from monai_ssl.bundle import ModelCard, ModelCardWriter
from monai_ssl.bundle.model_card import card_path, file_sha256

BUNDLES = [*BUNDLES_2D, "dual_network_3d"]
TINY_3D = {"n_filters": 4, "resnet_layers": [1, 1, 1, 1]}


def parser_for(bundle: str, files: list[str], **override: Any) -> ConfigParser:
    """A parser of ``bundles/<bundle>/configs/<files>`` (merged in order) with ``override``."""
    parser = ConfigParser()
    parser.read_config([config_path(bundle, f) for f in files])
    parser.update(override)
    return parser


def trained_settings(bundle: str) -> dict[str, Any]:
    """Non-default training settings whose values the card must carry to evaluation and inference."""
    if bundle == "dual_network_3d":
        return {**TINY_3D, "normalize": False, "sw_roi_size": [32, 32, 32]}
    return {"spatial_size": 64}


def train_and_write_card(bundle: str, root: Path) -> dict[str, Any]:
    """Save a model as train.json would and let train.json's own card writer describe it; return the card."""
    parser = parser_for(bundle, ["train.json"], bundle_root=str(root), dataset_dir=str(root / "data"), **trained_settings(bundle))
    handlers = parser.get_parsed_content("validate#handlers")
    writer, saver = handlers[-1], handlers[1]
    assert isinstance(writer, ModelCardWriter), "train.json's validation handlers end with the model card writer"
    saver.best, saver.best_epoch = 0.5, 3  # the validation that saved the model (e.g. before a resume)
    model_path = root / "models" / "model.pt"
    model_path.parent.mkdir(parents=True)
    torch.save(parser.get_parsed_content("deploy_network").state_dict(), model_path)
    engine = Engine(lambda e, b: None)
    engine.state.metrics = {"val_mean_dice": 0.25}  # this validation did not improve on it
    engine.state.epoch = 4
    writer(engine)  # what the evaluator's COMPLETED event does after BestModelSaver
    return json.loads(card_path(model_path).read_text())


@pytest.mark.parametrize("bundle", BUNDLES)
def test_card_settings_are_the_default_of_evaluate_and_inference(bundle: str, tmp_path: Path) -> None:
    card = train_and_write_card(bundle, tmp_path)
    trained = trained_settings(bundle)
    assert card["bundle"] == bundle and card["model_sha256"] == file_sha256(tmp_path / "models" / "model.pt")
    assert card["validation"] == {"val_mean_dice": 0.5, "epoch": 3}
    assert card["network"]["n_parameters"] > 0 and card["preprocessing"]
    for key, value in trained.items():
        assert card["settings"][key] == value
    # the evaluate overlay (merged on train.json) and inference.json, with none of the settings repeated
    overrides = {"bundle_root": str(tmp_path), **({} if bundle != "dual_network_3d" else TINY_3D)}
    for files in (["train.json", "evaluate.json"], ["inference.json"]):
        parser = parser_for(bundle, files, **overrides)
        for key, value in trained.items():
            assert parser.get_parsed_content(key) == value, (files, key)
        parser.get_parsed_content("run#1")  # the card check (run#0 checks that model.pt exists) passes


@pytest.mark.parametrize("bundle", BUNDLES)
def test_an_override_that_disagrees_with_the_card_stops_the_run(bundle: str, tmp_path: Path) -> None:
    train_and_write_card(bundle, tmp_path)
    key, wrong, trained = (
        ("normalize", True, False) if bundle == "dual_network_3d" else ("spatial_size", 224, 64)
    )
    extra = TINY_3D if bundle == "dual_network_3d" else {}
    for files in (["train.json", "evaluate.json"], ["inference.json"]):
        parser = parser_for(bundle, files, bundle_root=str(tmp_path), **extra, **{key: wrong})
        with pytest.raises(Exception) as info:
            parser.get_parsed_content("run#1")
        message = " ".join(error_messages(info.value))
        assert f"{key}={wrong!r} (this run)" in message and f"{key}={trained!r}" in message, message
        assert str(tmp_path / "models" / "model.json") in message


def test_model_without_card_or_with_a_stale_card_uses_the_config_with_a_warning(tmp_path: Path, caplog) -> None:
    model = tmp_path / "models" / "model.pt"
    model.parent.mkdir()
    torch.save({"w": torch.zeros(2)}, model)
    with caplog.at_level(logging.WARNING):
        parser = parser_for("supervised", ["inference.json"], bundle_root=str(tmp_path))
        assert parser.get_parsed_content("spatial_size") == 224
    assert "has no model card" in caplog.text and str(card_path(model)) in caplog.text

    ModelCardWriter(model, "supervised", {"spatial_size": 64}).write()
    assert ModelCard.load(model).get("spatial_size", 224) == 64
    torch.save({"w": torch.ones(2)}, model)  # replaced (e.g. by MONAI Label): the card describes other weights
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        card = ModelCard.load(model)
    assert card.get("spatial_size", 224) == 224 and "written for other weights" in caplog.text
    card.check({"spatial_size": 128})  # nothing to disagree with

    card_path(model).write_text("{not json")
    with pytest.raises(ValueError, match="model.json is not readable JSON"):
        ModelCard.load(model)
    card_path(model).write_text(json.dumps({"format": 99, "settings": {}}))
    with pytest.raises(ValueError, match="format 1"):
        ModelCard.load(model)


def test_no_model_no_warning(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        card = ModelCard.load(tmp_path / "models" / "model.pt")
    assert card.get("spatial_size", 224) == 224 and not caplog.text


def test_writer_rewrites_the_card_only_when_the_model_changes(tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    writer = ModelCardWriter(model, "b", {"spatial_size": (64, 64)}, training={"seed": 0})
    engine = Engine(lambda e, b: None)
    engine.state.metrics = {"val_mean_dice": 0.25}
    writer(engine)
    assert not card_path(model).exists()  # no model yet: no card
    torch.save({"w": torch.zeros(2)}, model)
    writer(engine)
    first = json.loads(card_path(model).read_text())
    assert first["settings"] == {"spatial_size": [64, 64]} and first["validation"]["val_mean_dice"] == 0.25
    card_path(model).write_text("left alone")
    engine.state.metrics = {"val_mean_dice": 0.2}
    writer(engine)  # the model did not change (no new best): the card is not rewritten
    assert card_path(model).read_text() == "left alone"
    torch.save({"w": torch.ones(2)}, model)
    os.utime(model, ns=(model.stat().st_atime_ns, model.stat().st_mtime_ns + 1_000_000))
    writer(engine)
    second = json.loads(card_path(model).read_text())
    assert second["model_sha256"] == file_sha256(model) != first["model_sha256"]
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temp file left
