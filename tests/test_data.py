"""Tests of the data layer: datalists, protocol splits, synthetic data, transforms, readers, scripts."""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from types import ModuleType

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from PIL import Image, ImageDraw
from scipy import ndimage


from monai_ssl.data import (
    BinarizeLabeld,
    CaseError,
    DatalistError,
    H5VolumeReader,
    ToGrayscaled,
    ValidateCased,
    load_datalist,
    make_protocol_split,
    save_datalist,
    synthetic_dataset,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _touch(root: Path, *rels: str) -> None:
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


# ----------------------------------------------------------------------------------- datalists
@pytest.fixture()
def small_datalist(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "ds"
    _touch(data, "images/a.png", "labels/a.png", "images/b.png", "labels/b.png", "images/c.png", "imagesTr/v.nii.gz")
    datalist = {
        "name": "t",
        "protocol": {},
        "seed": 0,
        "dataset_dir_hint": "",
        "created_by": "",
        "labeled": [{"image": "images/a.png", "label": "labels/a.png", "weight": 2}],
        "unlabeled": [{"image": "images/c.png"}, {"image": "imagesTr/v.nii.gz"}],
        "validation": [{"image": "images/b.png", "label": "labels/b.png", "case_id": "custom"}],
        "test": [],
    }
    path = tmp_path / "dl.json"
    save_datalist(path, datalist)
    return path, data


def test_load_datalist_makes_paths_absolute_and_adds_case_id(small_datalist: tuple[Path, Path]) -> None:
    path, data = small_datalist
    labeled = load_datalist(path, data, "labeled")
    assert labeled == [
        {"image": str(data / "images/a.png"), "label": str(data / "labels/a.png"), "weight": 2, "case_id": "a"}
    ]
    assert [e["case_id"] for e in load_datalist(path, data, "unlabeled")] == ["c", "v"]  # .nii.gz stripped
    assert load_datalist(path, data, "validation")[0]["case_id"] == "custom"
    assert load_datalist(path, data, "test") == []


def test_save_datalist_is_atomic_json_indent4(small_datalist: tuple[Path, Path]) -> None:
    path, _ = small_datalist
    assert path.read_text().startswith('{\n    "name": "t"')
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


def test_load_datalist_names_every_missing_file(small_datalist: tuple[Path, Path]) -> None:
    path, data = small_datalist
    (data / "images/c.png").unlink()
    (data / "imagesTr/v.nii.gz").unlink()
    with pytest.raises(DatalistError) as ei:
        load_datalist(path, data, "unlabeled")
    msg = str(ei.value)
    assert str(path) in msg and "'unlabeled'" in msg and "2 file(s) missing" in msg
    assert str(data / "images/c.png") in msg and str(data / "imagesTr/v.nii.gz") in msg
    assert load_datalist(path, data, "unlabeled", check_files=False)[0]["image"] == str(data / "images/c.png")


@pytest.mark.parametrize(
    ("bad_path", "expected"),
    [("../outside.png", "escapes the dataset dir"), ("images/../../x.png", "escapes"), ("/etc/passwd", "absolute path")],
)
def test_load_datalist_rejects_escaping_and_absolute_paths(tmp_path: Path, bad_path: str, expected: str) -> None:
    _touch(tmp_path / "ds", "images/a.png")
    path = tmp_path / "dl.json"
    save_datalist(path, {"labeled": [{"image": "images/a.png", "label": bad_path}]})
    with pytest.raises(DatalistError, match=expected) as ei:
        load_datalist(path, tmp_path / "ds", "labeled")
    assert str(path) in str(ei.value) and bad_path in str(ei.value)


def test_load_datalist_key_and_emptiness_rules(tmp_path: Path) -> None:
    path = tmp_path / "dl.json"
    save_datalist(path, {"name": "x", "labeled": [], "unlabeled": [], "validation": [{"image": "a.png"}]})
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(DatalistError, match="no labelled cases"):
        load_datalist(path, tmp_path, "labeled")
    assert load_datalist(path, tmp_path, "unlabeled") == []
    with pytest.raises(DatalistError, match="unknown key 'training'"):
        load_datalist(path, tmp_path, "training")
    with pytest.raises(DatalistError, match="unknown key 'name'"):
        load_datalist(path, tmp_path, "name")
    with pytest.raises(DatalistError, match=r"missing field\(s\) \['label'\]"):
        load_datalist(path, tmp_path, "validation")
    with pytest.raises(DatalistError, match="does not exist"):
        load_datalist(tmp_path / "nope.json", tmp_path, "labeled")


def test_load_datalist_refuses_an_empty_validation_list(tmp_path: Path) -> None:
    _touch(tmp_path, "a.png", "a_mask.png")
    path = tmp_path / "dl.json"
    save_datalist(path, {"labeled": [{"image": "a.png", "label": "a_mask.png"}], "validation": [], "test": []})
    with pytest.raises(DatalistError, match="no cases under key 'validation'") as ei:
        load_datalist(path, tmp_path, "validation")
    assert str(path) in str(ei.value)
    assert load_datalist(path, tmp_path, "test") == []  # an empty test list is allowed (nothing to evaluate)


def test_load_datalist_refuses_symlinks_that_leave_the_dataset_dir(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    _touch(outside, "secret.png", "folder/b.png")
    data = tmp_path / "ds"
    _touch(data, "images/a.png", "labels/a.png")
    (data / "images" / "linked.png").symlink_to(outside / "secret.png")  # a file link leading out
    (data / "outside_folder").symlink_to(outside / "folder", target_is_directory=True)  # a folder link leading out
    (data / "images" / "alias.png").symlink_to(data / "images" / "a.png")  # a link that stays inside: fine
    path = tmp_path / "dl.json"
    entries = [{"image": "images/linked.png"}, {"image": "outside_folder/b.png"}, {"image": "images/alias.png"}]
    save_datalist(path, {"labeled": [], "unlabeled": entries})
    with pytest.raises(DatalistError) as ei:
        load_datalist(path, data, "unlabeled")
    msg = str(ei.value)
    assert "2 bad entries" in msg and "symbolic link" in msg, msg
    assert "entry 0 image: path 'images/linked.png'" in msg and str(outside / "secret.png") in msg, msg
    assert "entry 1 image: path 'outside_folder/b.png'" in msg and "alias.png" not in msg, msg
    save_datalist(path, {"labeled": [], "unlabeled": entries[2:]})
    assert [e["image"] for e in load_datalist(path, data, "unlabeled")] == [str(data / "images" / "alias.png")]
    linked_root = tmp_path / "ds_link"  # a dataset dir that is itself a link is fine
    linked_root.symlink_to(data, target_is_directory=True)
    assert load_datalist(path, linked_root, "unlabeled")[0]["image"] == str(linked_root / "images" / "alias.png")


# ------------------------------------------------------------------------------ protocol split
def _entries(n: int) -> list[dict[str, str]]:
    return [{"image": f"images/c{i:04d}.png", "label": f"labels/c{i:04d}.png"} for i in range(n)]


@pytest.mark.parametrize(("fraction", "expected"), [(0.025, 12), (0.1, 51), (0.2, 103), (0.5, 258), (0.25, 129), (0.125, 64)])
def test_protocol_split_busi_counts(fraction: float, expected: int) -> None:
    dl = make_protocol_split(_entries(647), name="busi", seed=0, split=(8, 1, 1), labeled_fraction=fraction)
    counts = dl["protocol"]["counts"]
    assert (counts["train"], counts["validation"], counts["test"]) == (517, 65, 65)
    assert counts["labeled"] == len(dl["labeled"]) == expected
    assert len(dl["unlabeled"]) == 517 - expected
    assert all("label" not in e for e in dl["unlabeled"]) and all("label" in e for e in dl["labeled"])
    images = [e["image"] for k in ("labeled", "unlabeled", "validation", "test") for e in dl[k]]
    assert len(images) == len(set(images)) == 647  # disjoint and complete


def test_protocol_split_is_deterministic_order_free_and_nested() -> None:
    entries = _entries(100)
    a = make_protocol_split(entries, name="x", seed=3, labeled_fraction=0.1)
    b = make_protocol_split(list(reversed(entries)), name="x", seed=3, labeled_fraction=0.1)
    c = make_protocol_split(entries, name="x", seed=4, labeled_fraction=0.1)
    assert a == b
    assert a["labeled"] != c["labeled"]
    small = make_protocol_split(entries, name="x", seed=3, labeled_count=1)
    assert len(small["labeled"]) == 1 and small["labeled"][0] in a["labeled"]
    assert small["test"] == a["test"] and small["validation"] == a["validation"]


def test_protocol_split_with_id_lists() -> None:
    entries = [{"image": f"imagesTr/la_{i:02d}.nii.gz", "label": f"labelsTr/la_{i:02d}.nii.gz"} for i in range(40)]
    train = [f"la_{i:02d}" for i in range(30)]
    test = [f"la_{i:02d}" for i in range(30, 40)]
    for fraction, n_lab in ((0.1, 3), (0.2, 6)):
        dl = make_protocol_split(entries, name="la", labeled_fraction=fraction, train_ids=train, test_ids=test)
        assert [len(dl[k]) for k in ("labeled", "unlabeled", "validation", "test")] == [n_lab, 27 - n_lab, 3, 10]
        assert {e["image"] for e in dl["test"]} == {f"imagesTr/{i}.nii.gz" for i in test}
    with pytest.raises(DatalistError, match="la_99"):
        make_protocol_split(entries, name="la", labeled_fraction=0.1, train_ids=train + ["la_99"], test_ids=test)
    with pytest.raises(DatalistError, match="exactly one"):
        make_protocol_split(entries, name="la", labeled_fraction=0.1, labeled_count=2)


def test_make_datalist_cli(tmp_path: Path, make_datalist: ModuleType) -> None:
    data = tmp_path / "ds"
    for i in range(20):
        _touch(data, f"images/c{i:02d}.png", f"labels/c{i:02d}.png")
    out = tmp_path / "dl.json"
    argv = ["--dataset-dir", str(data), "--name", "t", "--split", "8:1:1", "--labeled-fraction", "0.25", "--out", str(out)]
    assert make_datalist.main(argv) == 0
    dl = json.loads(out.read_text())
    assert dl["created_by"].startswith("python scripts/make_datalist.py --dataset-dir")
    assert [len(dl[k]) for k in ("labeled", "unlabeled", "validation", "test")] == [4, 12, 2, 2]
    assert len(load_datalist(out, data, "labeled")) == 4
    (data / "labels/c03.png").unlink()
    assert make_datalist.main(argv) == 1  # image without label is reported, not split


# --------------------------------------------------------------------------------- synthetic
def _read_png(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_synthetic_us2d_default_is_fast_deterministic_and_plausible(tmp_path: Path) -> None:
    start = time.perf_counter()
    d1 = Path(synthetic_dataset("us2d", root=tmp_path / "a"))
    assert time.perf_counter() - start < 10.0
    assert d1.name == "synthetic_us2d_s128_l8_u32_v16_t32_seed0" and (d1 / "COMPLETE").is_file()
    d2 = Path(synthetic_dataset("us2d", root=tmp_path / "b"))
    files = sorted(p.relative_to(d1) for p in d1.rglob("*.png"))
    assert len(files) == 2 * 88
    # a test split that one case cannot swing: 32 images, a few lesion-free (one false alarm moves the mean by 1/32)
    test_masks = [_read_png(c["label"]) for c in load_datalist(d1 / "datalist.json", d1, "test")]
    assert len(test_masks) == 32 and sum(not m.any() for m in test_masks) == 3
    assert all((d1 / f).read_bytes() == (d2 / f).read_bytes() for f in files)

    darker = []
    for key in ("labeled", "unlabeled", "validation", "test"):
        cases = load_datalist(d1 / "datalist.json", d1, key)
        with_lesion = 0
        for case in cases:
            image = _read_png(case["image"])
            mask = _read_png(case["image"].replace("/images/", "/labels/"))
            assert image.dtype == np.uint8 and image.shape == (128, 128)
            assert set(np.unique(mask).tolist()) <= {0, 255}
            if mask.any():
                with_lesion += 1
                inside = mask > 0
                ring = ndimage.binary_dilation(inside, iterations=6) & ~inside
                darker.append(image[inside].mean() < image[ring].mean())
        assert 0.8 * len(cases) <= with_lesion < len(cases)  # ~10 % empty masks, at most 20 %
    assert np.mean(darker) > 0.9
    assert synthetic_dataset("us2d", root=tmp_path / "a", seed=1) != str(d1)


def test_synthetic_incomplete_folder_is_regenerated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONAI_SSL_CACHE", str(tmp_path))
    kwargs = {"n_labeled": 2, "n_unlabeled": 2, "n_validation": 1, "n_test": 1, "size": 48}
    d = Path(synthetic_dataset(**kwargs))
    assert d.parent == tmp_path
    image = d / "images/us2d_0000.png"
    original = image.read_bytes()
    (d / "COMPLETE").unlink()  # as if killed before the marker was written
    image.write_bytes(b"truncated")
    assert synthetic_dataset(**kwargs) == str(d)
    assert image.read_bytes() == original and (d / "COMPLETE").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [d.name]  # no temp folders left
    image.write_bytes(b"kept")  # a complete dataset is trusted: no-op
    assert synthetic_dataset(**kwargs) == str(d) and image.read_bytes() == b"kept"


def test_synthetic_vol3d(tmp_path: Path) -> None:
    kwargs = {"n_labeled": 2, "n_unlabeled": 1, "n_validation": 1, "n_test": 1, "size": 24}
    d = Path(synthetic_dataset("vol3d", root=tmp_path / "a", **kwargs))
    d2 = Path(synthetic_dataset("vol3d", root=tmp_path / "b", **kwargs))
    assert d.name == "synthetic_vol3d_s24_l2_u1_v1_t1_seed0"
    cases = load_datalist(d / "datalist.json", d, "labeled")
    assert len(load_datalist(d / "datalist.json", d, "unlabeled")) == 1
    for case in cases:
        img, lab = nib.load(case["image"]), nib.load(case["label"])
        image, label = img.get_fdata(dtype=np.float32), np.asanyarray(lab.dataobj)
        assert image.shape == label.shape == (24, 24, 24)
        assert img.get_data_dtype() == np.float32 and label.dtype == np.uint8
        assert np.allclose(img.affine, np.eye(4)) and set(np.unique(label).tolist()) == {0, 1}
        assert image[label == 1].mean() > image[label == 0].mean() + 0.3
        rel = Path(case["image"]).relative_to(d)
        assert (d / rel).read_bytes() == (d2 / rel).read_bytes()
    with pytest.raises(ValueError, match="unknown synthetic kind"):
        synthetic_dataset("ct", root=tmp_path)


# -------------------------------------------------------------------------------- transforms
def _case(image_shape: tuple[int, ...], label: np.ndarray | None = None, name: str = "/data/images/case_42.png") -> dict:
    meta = {"filename_or_obj": name}
    d = {"image": MetaTensor(torch.rand(image_shape), meta=dict(meta))}
    if label is not None:
        d["label"] = MetaTensor(torch.as_tensor(label), meta={"filename_or_obj": name.replace("images", "labels")})
    return d


def _bad_cases() -> list[tuple[dict, ValidateCased, list[str]]]:
    nan_case = _case((1, 8, 8), np.zeros((1, 8, 8), np.float32))
    nan_case["image"][0, 0, :3] = float("nan")
    nan_case["image"][0, 1, 0] = float("inf")
    return [
        (_case((1, 8, 8), np.zeros((1, 8, 9), np.float32)), ValidateCased(), ["spatial size mismatch", "(8, 8)", "(8, 9)"]),
        (_case((1, 4, 4), np.arange(16, dtype=np.float32).reshape(1, 4, 4)), ValidateCased(), ["more than two distinct", "0, 1, 2, 3, 4", "16 distinct"]),
        (nan_case, ValidateCased(), ["4 non-finite", "3 NaN, 1 Inf"]),
        (_case((1, 20, 30)), ValidateCased(min_spatial_size=(32, -1)), ["(20, 30)", "(32, -1)", "pad"]),
    ]


@pytest.mark.parametrize("index", range(4))
def test_validate_case_errors_name_the_case(index: int) -> None:
    case, transform, fragments = _bad_cases()[index]
    with pytest.raises(CaseError) as ei:
        transform(case)
    msg = str(ei.value)
    assert "case_42.png" in msg and all(f in msg for f in fragments), msg
    with pytest.raises(RuntimeError) as ei2:  # MONAI wraps it; the original message stays in the chain
        Compose([transform])(dict(case, case_id="case_42"))
    assert isinstance(_root_cause(ei2.value), CaseError)
    text = "".join(traceback.format_exception(ei2.value))
    assert "case 'case_42'" in text and fragments[0] in text


def test_validate_case_accepts_good_and_unlabelled_cases() -> None:
    good = _case((1, 8, 8), np.array([0, 255] * 32, np.uint8).reshape(1, 8, 8))
    assert ValidateCased(min_spatial_size=(8, 8))(good).keys() == good.keys()
    assert "label" not in ValidateCased()(_case((1, 8, 8)))


def test_load_pipeline_on_png_case(tmp_path: Path) -> None:
    image = np.zeros((10, 12, 3), np.uint8)
    image[..., 0] = 200
    Image.fromarray(image, "RGB").save(tmp_path / "rgb_case.png")
    mask = np.zeros((10, 12), np.uint8)
    mask[2:5, 3:7] = 255
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    pipeline = Compose(
        [
            LoadImaged(keys=("image", "label"), image_only=True),
            EnsureChannelFirstd(keys=("image", "label")),
            ToGrayscaled(keys="image"),
            ValidateCased(),
            BinarizeLabeld(keys="label"),
        ]
    )
    out = pipeline({"image": str(tmp_path / "rgb_case.png"), "label": str(tmp_path / "mask.png")})
    assert out["image"].shape == (1, 12, 10) and torch.allclose(out["image"], torch.tensor(0.299 * 200))
    assert out["label"].dtype == torch.float32 and set(out["label"].unique().tolist()) == {0.0, 1.0}
    assert int(out["label"].sum()) == 12 and out["label"].meta["filename_or_obj"].endswith("mask.png")
    bad = pipeline.transforms[:2] + (ValidateCased(),)
    Image.fromarray(np.zeros((10, 13), np.uint8), "L").save(tmp_path / "bad_mask.png")
    with pytest.raises(RuntimeError) as ei:
        Compose(list(bad))({"image": str(tmp_path / "rgb_case.png"), "label": str(tmp_path / "bad_mask.png")})
    assert "rgb_case.png" in str(_root_cause(ei.value))


def test_to_grayscale_channels() -> None:
    rgba = torch.tensor([1.0, 2.0, 3.0, 9.0]).reshape(4, 1, 1).expand(4, 2, 2)
    out = ToGrayscaled(keys="image")({"image": rgba})["image"]
    assert out.shape == (1, 2, 2) and torch.allclose(out, torch.tensor(0.299 + 2 * 0.587 + 3 * 0.114))
    one = torch.rand(1, 3, 3)
    assert ToGrayscaled(keys="image")({"image": one})["image"] is one
    with pytest.raises(CaseError, match="case 'x'.*1, 3 \\(RGB\\) or 4"):
        ToGrayscaled(keys="image")({"image": torch.rand(2, 3, 3), "case_id": "x"})


# ------------------------------------------------------------------------------------ readers
def test_h5_reader_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.standard_normal((6, 5, 4)).astype(np.float32)  # (W, H, D) as stored by the community
    label = (image > 0.5).astype(np.uint8)
    path = tmp_path / "mri_norm2.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image)
        f.create_dataset("label", data=label)
    reader = H5VolumeReader(dataset="image")
    assert reader.verify_suffix(str(path)) and reader.verify_suffix("x.hdf5") and not reader.verify_suffix("x.nii.gz")
    loader = Compose(
        [
            LoadImaged(keys="image", reader=H5VolumeReader(dataset="image"), image_only=True),
            LoadImaged(keys="label", reader=H5VolumeReader(dataset="label"), image_only=True),
            EnsureChannelFirstd(keys=("image", "label")),
        ]
    )
    out = loader({"image": str(path), "label": str(path)})
    assert out["image"].shape == (1, 6, 5, 4)
    np.testing.assert_array_equal(out["image"][0].numpy(), image)
    np.testing.assert_array_equal(out["label"][0].numpy(), label)
    np.testing.assert_allclose(out["image"].affine.numpy(), np.eye(4))
    with h5py.File(path, "a") as f:
        f["image"].attrs["spacing"] = [0.625, 0.625, 0.625]
    spaced = LoadImaged(keys="image", reader=H5VolumeReader(dataset="image"), image_only=True)({"image": str(path)})
    np.testing.assert_allclose(spaced["image"].pixdim.numpy(), [0.625] * 3)
    with pytest.raises(KeyError, match="mri_norm2.h5 has no dataset 'missing'"):
        H5VolumeReader(dataset="missing").read(str(path))


# ------------------------------------------------------------------------------- prepare_data
def _png(path: Path, array: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def test_prepare_keeps_the_contrast_of_a_16_bit_image(tmp_path: Path, prepare_data: ModuleType) -> None:
    # PIL's convert("L") clipped a 1000..5000 16-bit image to a constant 255
    src = tmp_path / "deep.png"
    Image.fromarray(np.tile(np.linspace(1000, 5000, 40), (30, 1)).astype(np.uint16)).save(src)
    prepare_data._write_gray_png(src, tmp_path / "out.png")
    with Image.open(tmp_path / "out.png") as im:
        out = np.asarray(im)
        assert im.mode == "L"
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out[0])) == 40 and np.all(np.diff(out[0].astype(int)) > 0)


def test_prepare_busi_unions_masks(tmp_path: Path, prepare_data: ModuleType) -> None:
    src, out = tmp_path / "Dataset_BUSI_with_GT", tmp_path / "out"
    rgb = np.full((20, 30, 3), 100, np.uint8)
    m1, m2 = np.zeros((20, 30), np.uint8), np.zeros((20, 30), np.uint8)
    m1[2:6, 2:6], m2[10:15, 20:28] = 255, 255
    _png(src / "benign/benign (1).png", rgb, "RGB")
    _png(src / "benign/benign (1)_mask.png", m1)
    _png(src / "benign/benign (1)_mask_1.png", m2)
    _png(src / "malignant/malignant (12).png", rgb[..., 0])
    _png(src / "malignant/malignant (12)_mask.png", m1)
    _png(src / "normal/normal (1).png", rgb[..., 0])
    _png(src / "normal/normal (1)_mask.png", np.zeros((20, 30), np.uint8))
    assert prepare_data.main(["busi", "--src", str(src), "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["benign_0001.png", "malignant_0012.png"]
    label = _read_png(out / "labels/benign_0001.png")
    np.testing.assert_array_equal(label, np.maximum(m1, m2))
    image = Image.open(out / "images/benign_0001.png")
    assert image.mode == "L" and image.size == (30, 20)
    assert prepare_data.main(["busi", "--src", str(src), "--out", str(out), "--include-normal"]) == 0
    assert (out / "labels/normal_0001.png").is_file()
    assert prepare_data.prepare_busi(src, out)["skipped"] == 2  # skip-existing
    _png(src / "benign/benign (2).png", rgb, "RGB")  # no mask
    with pytest.raises(prepare_data.PrepareError, match=r"(?s)without any mask.*benign \(2\)\.png"):
        prepare_data.prepare_busi(src, out)


def test_prepare_ddti(tmp_path: Path, prepare_data: ModuleType) -> None:
    src, out = tmp_path / "ddti", tmp_path / "out"
    mask = np.zeros((16, 16), np.uint8)
    mask[4:9, 4:9] = 255
    for stem, m in (("1_1(1)", mask), ("2_1(1)", np.zeros_like(mask))):
        _png(src / "cropped" / f"{stem}.png", np.full((16, 16), 80, np.uint8))
        (src / "mask").mkdir(parents=True, exist_ok=True)
        Image.fromarray(m, "L").convert("P").save(src / "mask" / f"{stem}.gif")
    assert prepare_data.main(["ddti", "--src", str(src), "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["1_1_1.png"]  # empty mask skipped
    np.testing.assert_array_equal(_read_png(out / "labels/1_1_1.png"), mask)
    assert prepare_data.prepare_ddti(src, out, include_empty=True)["written"] == 1


def test_prepare_hc18_fills_outline(tmp_path: Path, prepare_data: ModuleType) -> None:
    src, out = tmp_path / "training_set", tmp_path / "out"
    outline = Image.new("L", (60, 40))
    ImageDraw.Draw(outline).ellipse((10, 5, 50, 35), outline=255, width=1)
    src.mkdir()
    outline.save(src / "000_HC_Annotation.png")
    _png(src / "000_HC.png", np.full((40, 60), 50, np.uint8))
    assert prepare_data.main(["hc18", "--src", str(src), "--out", str(out)]) == 0
    filled = _read_png(out / "labels/000_HC.png") > 0
    assert abs(filled.sum() - np.pi * 20 * 15) < 0.1 * np.pi * 20 * 15 and filled[20, 30]
    broken = Image.new("L", (60, 40))
    ImageDraw.Draw(broken).arc((10, 5, 50, 35), 0, 300, fill=255)
    broken.save(src / "001_HC_Annotation.png")
    _png(src / "001_HC.png", np.full((40, 60), 50, np.uint8))
    with pytest.raises(prepare_data.PrepareError, match="001_HC_Annotation.png.*not closed"):
        prepare_data.prepare_hc18(src, out)


def test_prepare_la_h5_and_nifti(tmp_path: Path, prepare_data: ModuleType) -> None:
    src, out = tmp_path / "h5", tmp_path / "out"
    rng = np.random.default_rng(1)
    volumes = {}
    for case in ("CASEA", "CASEB"):
        image = rng.standard_normal((7, 6, 5)).astype(np.float32)
        label = (image > 0).astype(np.uint8)
        (src / case).mkdir(parents=True)
        with h5py.File(src / case / "mri_norm2.h5", "w") as f:
            f["image"], f["label"] = image, label
        volumes[case] = (image, label)
    assert prepare_data.main(["la_h5", "--src", str(src), "--out", str(out), "--spacing", "0.625", "0.625", "0.625"]) == 0
    for case, (image, label) in volumes.items():
        img, lab = nib.load(out / f"imagesTr/la_{case}.nii.gz"), nib.load(out / f"labelsTr/la_{case}.nii.gz")
        np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), image)
        np.testing.assert_array_equal(np.asanyarray(lab.dataobj), label)
        assert lab.get_data_dtype() == np.uint8 and np.allclose(img.header.get_zooms(), 0.625)

    out2 = tmp_path / "out2"
    (out / "labelsTr/la_CASEB.nii.gz").unlink()
    nib.save(nib.Nifti1Image(volumes["CASEB"][1] * 255, np.eye(4)), out / "labelsTr/la_CASEB.nii.gz")  # 0/255
    assert prepare_data.main(["la_nifti", "--src", str(out), "--out", str(out2)]) == 0
    np.testing.assert_array_equal(np.asanyarray(nib.load(out2 / "labelsTr/la_CASEB.nii.gz").dataobj), volumes["CASEB"][1])
    assert (out2 / "imagesTr/la_CASEA.nii.gz").read_bytes() == (out / "imagesTr/la_CASEA.nii.gz").read_bytes()


# ---------------------------------------------------------------------------------- real data
REAL_DATALISTS = {
    "busi": ("busi/Dataset_BUSI_with_GT", {"busi_2.5pct": (12, 505, 65, 65), "busi_10pct": (51, 466, 65, 65), "busi_20pct": (103, 414, 65, 65)}),
    "ddti": ("ddti", {"ddti_10pct": (51, 467, 65, 65)}),
    "la_nifti": ("la_heart", {"la_10pct": (3, 24, 3, 10), "la_20pct": (6, 21, 3, 10)}),
}


@pytest.mark.real_data
@pytest.mark.parametrize("dataset", sorted(REAL_DATALISTS))
def test_committed_datalists_match_prepared_real_data(tmp_path: Path, prepare_data: ModuleType, dataset: str) -> None:
    rel_src, datalists = REAL_DATALISTS[dataset]
    src = SHARED_DATA / rel_src
    if not src.is_dir():
        pytest.skip(f"../shared/data/{rel_src.split('/')[0]} not found: real-data test skipped")
    out = tmp_path / dataset
    assert prepare_data.main([dataset, "--src", str(src), "--out", str(out)]) == 0
    for name, counts in datalists.items():
        path = REPO / "datalists" / f"{name}.json"
        lists = {k: load_datalist(path, out, k) for k in ("labeled", "unlabeled", "validation", "test")}
        assert tuple(len(v) for v in lists.values()) == counts
        assert len({e["case_id"] for v in lists.values() for e in v}) == sum(counts)  # disjoint
        assert json.loads(path.read_text())["protocol"]["counts"]["labeled"] == counts[0]


def test_shared_augmentation_moves_image_and_mask_together_and_jitters_intensity_only(tmp_path) -> None:
    """With augmentation on, the mask follows every spatial change of the image (flip, rotation,
    zoom), stays binary, and only the image's intensities are jittered."""
    import numpy as np
    from PIL import Image

    from monai_ssl.bundle import segmentation_transforms_2d

    img = np.zeros((64, 64), np.uint8)
    img[10:30, 5:25] = 200
    img += np.random.default_rng(0).integers(0, 20, img.shape, dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 5:25] = 255
    Image.fromarray(img).save(tmp_path / "i.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    case = {"image": str(tmp_path / "i.png"), "label": str(tmp_path / "m.png")}
    plain = segmentation_transforms_2d(64, augment=False)(case)
    chain = segmentation_transforms_2d(64, augment=True)
    chain.set_random_state(seed=0)
    changed = 0
    for _ in range(12):
        out = chain(case)
        label = out["label"][0].numpy()
        assert set(np.unique(label)) <= {0.0, 1.0}
        bright = out["image"][0].numpy() > 0.5 * float(out["image"].max())
        # the lesion region of the image and the mask stay aligned (IoU of the bright region and the mask)
        iou = (bright & (label > 0)).sum() / max(1, (bright | (label > 0)).sum())
        assert iou > 0.7, iou
        changed += int(not np.array_equal(label, plain["label"][0].numpy()))
    assert changed >= 4  # the spatial transforms fire
