"""scripts/prepare_data.py accepts outline or filled annotations; scripts/make_datalist.py caps the
unlabelled count and splits by a group id so that one subject never straddles train and test."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image, ImageDraw



def _gray(path: Path, shape: tuple[int, int] = (40, 60)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, 50, np.uint8)).save(path)


def test_hc18_accepts_an_outline_and_an_already_filled_annotation(tmp_path: Path, prepare_data: ModuleType) -> None:
    src, out = tmp_path / "training_set", tmp_path / "out"
    outline = Image.new("L", (60, 40))
    ImageDraw.Draw(outline).ellipse((10, 5, 50, 35), outline=255, width=1)
    filled = Image.new("L", (60, 40))
    ImageDraw.Draw(filled).ellipse((10, 5, 50, 35), fill=255)
    src.mkdir()
    outline.save(src / "000_HC_Annotation.png")
    filled.save(src / "001_HC_Annotation.png")
    _gray(src / "000_HC.png")
    _gray(src / "001_HC.png")
    stats = prepare_data.prepare_hc18(src, out)
    assert stats["written"] == 2 and stats["outline_filled"] == 1 and stats["given_filled"] == 1
    a = np.asarray(Image.open(out / "labels" / "000_HC.png")) > 0
    b = np.asarray(Image.open(out / "labels" / "001_HC.png")) > 0
    assert np.array_equal(b, np.asarray(filled) > 0)
    assert (a & b).sum() / (a | b).sum() > 0.9  # the same ellipse either way


def test_hc18_still_rejects_an_open_outline_and_an_empty_one(tmp_path: Path, prepare_data: ModuleType) -> None:
    src, out = tmp_path / "training_set", tmp_path / "out"
    src.mkdir()
    broken = Image.new("L", (60, 40))
    ImageDraw.Draw(broken).arc((10, 5, 50, 35), 0, 300, fill=255, width=2)
    broken.save(src / "002_HC_Annotation.png")
    _gray(src / "002_HC.png")
    with pytest.raises(prepare_data.PrepareError, match="002_HC_Annotation.png.*not closed"):
        prepare_data.prepare_hc18(src, out)
    Image.new("L", (60, 40)).save(src / "002_HC_Annotation.png")
    with pytest.raises(prepare_data.PrepareError, match="002_HC_Annotation.png is empty"):
        prepare_data.prepare_hc18(src, out)


def _dataset(root: Path, subjects: int = 12, per_subject: int = 4) -> Path:
    """A prepared 2D dataset dir whose file names carry a subject id: ``<subject>_<slice>.png``."""
    for s in range(subjects):
        for k in range(per_subject):
            for folder in ("images", "labels"):
                _gray(root / folder / f"{s:03d}_{k}.png", (8, 8))
    return root


def test_group_split_keeps_each_subject_in_one_part(tmp_path: Path, make_datalist: ModuleType) -> None:
    data = _dataset(tmp_path / "data", subjects=12, per_subject=4)
    out = tmp_path / "by_subject.json"
    argv = ["--dataset-dir", str(data), "--name", "t", "--labeled-fraction", "0.25", "--seed", "3", "--out", str(out)]
    assert make_datalist.main([*argv, "--group-regex", r"^(?P<group>\d+)_"]) == 0
    datalist = json.loads(out.read_text())
    subject = lambda e: Path(e["image"]).name.split("_")[0]  # noqa: E731
    parts = {
        "train": {subject(e) for e in datalist["labeled"] + datalist["unlabeled"]},
        "validation": {subject(e) for e in datalist["validation"]},
        "test": {subject(e) for e in datalist["test"]},
    }
    assert not (parts["train"] & parts["validation"]) and not (parts["train"] & parts["test"]) and not (parts["validation"] & parts["test"])
    assert parts["validation"] and parts["test"]
    counts = datalist["protocol"]["counts"]
    assert counts["total"] == 48 and counts["train"] + counts["validation"] + counts["test"] == 48
    assert counts["groups"] == {"train": len(parts["train"]), "validation": len(parts["validation"]), "test": len(parts["test"])}
    assert counts["labeled"] == int(0.25 * counts["train"]) and "by group" in datalist["protocol"]["split"]
    # the same seed gives the same split; the case-level split (without the regex) does straddle subjects here
    assert make_datalist.main([*argv, "--group-regex", r"^(?P<group>\d+)_", "--out", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["test"] == datalist["test"]
    assert make_datalist.main([*argv, "--out", str(tmp_path / "by_case.json")]) == 0
    by_case = json.loads((tmp_path / "by_case.json").read_text())
    train_case = {subject(e) for e in by_case["labeled"] + by_case["unlabeled"]}
    assert train_case & {subject(e) for e in by_case["test"]}
    # a file name the regex does not match is an error naming it
    _gray(data / "images" / "scan.png", (8, 8))
    _gray(data / "labels" / "scan.png", (8, 8))
    assert make_datalist.main([*argv, "--group-regex", r"^(?P<group>\d+)_"]) == 1


def test_group_regex_error_names_the_file(tmp_path: Path, make_datalist: ModuleType, capsys) -> None:
    data = _dataset(tmp_path / "data", subjects=3, per_subject=2)
    _gray(data / "images" / "scan.png", (8, 8))
    _gray(data / "labels" / "scan.png", (8, 8))
    argv = ["--dataset-dir", str(data), "--name", "t", "--labeled-count", "1", "--out", str(tmp_path / "d.json")]
    assert make_datalist.main([*argv, "--group-regex", r"^(\d+)_"]) == 1
    assert "images/scan.png" in capsys.readouterr().err
    assert make_datalist.main([*argv, "--group-regex", r"(unclosed"]) == 1
    assert "not a valid regular expression" in capsys.readouterr().err


def test_unlabeled_count_caps_the_unlabelled_list(tmp_path: Path, make_datalist: ModuleType) -> None:
    data = _dataset(tmp_path / "data", subjects=10, per_subject=3)
    argv = ["--dataset-dir", str(data), "--name", "t", "--labeled-count", "2", "--seed", "0"]
    assert make_datalist.main([*argv, "--out", str(tmp_path / "full.json")]) == 0
    assert make_datalist.main([*argv, "--unlabeled-count", "5", "--out", str(tmp_path / "capped.json")]) == 0
    full, capped = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("full", "capped"))
    assert len(full["unlabeled"]) > 5 and capped["unlabeled"] == full["unlabeled"][:5]
    assert capped["labeled"] == full["labeled"] and capped["test"] == full["test"]
    counts = capped["protocol"]["counts"]
    assert counts["unlabeled"] == 5 and counts["unlabeled_left_out"] == len(full["unlabeled"]) - 5
    assert "--unlabeled-count" in capped["protocol"]["unlabeled_rule"]
    # with the group split too
    assert make_datalist.main([*argv, "--group-regex", r"^(\d+)_", "--unlabeled-count", "3", "--out", str(tmp_path / "g.json")]) == 0
    assert len(json.loads((tmp_path / "g.json").read_text())["unlabeled"]) == 3
    assert make_datalist.main([*argv, "--unlabeled-count", "-1", "--out", str(tmp_path / "bad.json")]) == 1
