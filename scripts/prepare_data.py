#!/usr/bin/env python
"""Convert public dataset layouts into the project layout used by the datalists.

2D datasets become ``<out>/images/<id>.png`` (8-bit grayscale) + ``<out>/labels/<id>.png``
(0/255); 3D datasets become ``<out>/imagesTr/<id>.nii.gz`` + ``<out>/labelsTr/<id>.nii.gz``
(uint8 0/1). Every file is written atomically (temp name, then rename), so a killed run never
leaves a partial file, and cases whose outputs exist are skipped unless ``--overwrite``.

Examples::

    python scripts/prepare_data.py busi --src ../shared/data/busi/Dataset_BUSI_with_GT --out data/busi
    python scripts/prepare_data.py ddti --src ../shared/data/ddti --out data/ddti
    python scripts/prepare_data.py hc18 --src HC18/training_set --out data/hc18
    python scripts/prepare_data.py la_h5 --src 2018LA_Seg_Training_Set --out data/la
    python scripts/prepare_data.py la_nifti --src ../shared/data/la_heart --out data/la
    python scripts/prepare_data.py pancreas --src Pancreas-CT-nifti --out data/pancreas
    python scripts/prepare_data.py brats --src MICCAI_BraTS_2019_Data_Training --out data/brats --modality flair

Ids: BUSI ``<class>_<NNNN>`` (``benign (12).png`` -> ``benign_0012``); DDTI the file stem with
runs of characters other than letters, digits, ``-`` and ``_`` replaced by ``_``
(``100_1(1)`` -> ``100_1_1``); HC18 the image stem (``000_HC``); LA ``la_<ID>``; Pancreas
``pancreas_<NNNN>`` (the case number); BraTS the case folder name (``BraTS19_2013_2_1``).
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from monai_ssl.data.readers import read_gray_uint8  # noqa: E402
from monai_ssl.utils import atomic_path  # noqa: E402


class PrepareError(ValueError):
    """The source layout or one of its files cannot be converted; the message names the file."""


# --------------------------------------------------------------------------------------------- io
def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp path in ``path``'s folder, then rename it to ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)


def _save_png(path: Path, array: np.ndarray) -> None:
    """Atomically save a uint8 (H, W) array as an 8-bit grayscale PNG."""
    _atomic_write(path, lambda tmp: Image.fromarray(array, mode="L").save(tmp, format="PNG"))


def _save_nifti(path: Path, img: nib.Nifti1Image) -> None:
    """Atomically save a NIfTI image as ``.nii.gz`` (gzip mtime 0, so reruns give identical bytes)."""
    data = gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)
    _atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _image_shape(path: Path) -> tuple[int, int]:
    """(H, W) of an image file, read from its header only."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except OSError as e:
        raise PrepareError(f"cannot read image {path}: {e}") from e


def _write_gray_png(src: Path, dst: Path) -> None:
    """Write ``src`` to ``dst`` as an 8-bit grayscale PNG.

    An 8-bit grayscale PNG source is copied byte for byte (fast, and exactly the same pixels);
    other 8-bit images (RGB, palette, other formats) are converted with PIL's "L" luminance, and
    16/32-bit or float ones are min-max scaled to 0..255 (``read_gray_uint8``; "L" would clip them).
    """
    try:
        with Image.open(src) as im:
            if im.format == "PNG" and im.mode == "L":
                _atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
            else:
                _save_png(dst, read_gray_uint8(src))
    except (OSError, ValueError) as e:
        raise PrepareError(f"cannot read image {src}: {e}") from e


def _read_mask(path: Path) -> np.ndarray:
    """Read a mask image as bool (H, W): foreground is above half the maximum (0/1 and 0/255 both work)."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L"))
    except OSError as e:
        raise PrepareError(f"cannot read mask {path}: {e}") from e
    peak = int(arr.max())
    return arr > peak / 2 if peak else np.zeros(arr.shape, dtype=bool)


def _check_same_size(image_shape: tuple[int, ...], mask: np.ndarray, image_path: Path, mask_path: Path) -> None:
    """Raise naming both files when the mask and the image differ in (H, W) size."""
    if tuple(image_shape) != mask.shape:
        raise PrepareError(f"mask {mask_path} has (H, W) size {mask.shape} but image {image_path} has {tuple(image_shape)}")


def _done(out: Path, rels: Sequence[str], overwrite: bool) -> bool:
    """True when all outputs of a case exist and are not to be overwritten."""
    return not overwrite and all((out / r).is_file() for r in rels)


def _problems(title: str, items: Sequence[str]) -> None:
    """Raise one PrepareError listing every problem item, if there are any."""
    if items:
        raise PrepareError(f"{title} ({len(items)}):\n  " + "\n  ".join(items))


# --------------------------------------------------------------------------------------------- 2D
_BUSI_NAME = re.compile(r"^(?P<cls>[a-z]+) \((?P<n>\d+)\)(?P<mask>_mask(?:_\d+)?)?\.png$")
_BUSI_LESION_CLASSES = ("benign", "malignant")


def prepare_busi(src: Path, out: Path, include_normal: bool = False, overwrite: bool = False) -> Counter:
    """Convert ``Dataset_BUSI_with_GT/<class>/<class> (N).png`` (+ ``_mask*.png``, united) to images/labels."""
    classes = list(_BUSI_LESION_CLASSES) + (["normal"] if include_normal else [])
    missing = [c for c in classes if not (src / c).is_dir()]
    _problems(f"BUSI source {src} lacks class folder(s) (point --src at Dataset_BUSI_with_GT)", missing)
    cases: dict[str, tuple[Path | None, list[Path]]] = {}
    bad_names: list[str] = []
    for cls in classes:
        for p in sorted((src / cls).glob("*.png")):
            m = _BUSI_NAME.match(p.name)
            if not m or m["cls"] != cls:
                bad_names.append(str(p))
                continue
            case_id = f"{cls}_{int(m['n']):04d}"
            image, masks = cases.get(case_id, (None, []))
            if m["mask"]:
                masks.append(p)
            elif image is not None:
                bad_names.append(f"{p} (second image for {case_id}: {image.name})")
            else:
                image = p
            cases[case_id] = (image, masks)
    _problems(f"BUSI: unexpected file name(s) in {src} (expected '<class> (N).png' / '<class> (N)_mask[_K].png')", bad_names)
    _problems("BUSI: mask(s) without image", [str(m[0]) for i, m in cases.values() if i is None])
    _problems("BUSI: image(s) without any mask", [str(i) for i, m in cases.values() if not m])

    stats: Counter = Counter()
    for case_id, (image_path, mask_paths) in tqdm(sorted(cases.items()), desc="busi", unit="case"):
        assert image_path is not None
        rels = [f"images/{case_id}.png", f"labels/{case_id}.png"]
        stats[case_id.split("_")[0]] += 1
        if _done(out, rels, overwrite):
            stats["skipped"] += 1
            continue
        shape = _image_shape(image_path)
        union = np.zeros(shape, dtype=bool)
        for mask_path in sorted(mask_paths):
            mask = _read_mask(mask_path)
            _check_same_size(shape, mask, image_path, mask_path)
            union |= mask
        stats["empty_masks"] += int(not union.any())
        stats["multi_mask"] += int(len(mask_paths) > 1)
        _write_gray_png(image_path, out / rels[0])
        _save_png(out / rels[1], union.astype(np.uint8) * 255)
        stats["written"] += 1
    return stats


def _safe_id(stem: str) -> str:
    """File stem with runs of characters other than letters, digits, '-' and '_' replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")


def prepare_ddti(src: Path, out: Path, include_empty: bool = False, overwrite: bool = False) -> Counter:
    """Convert DDTI ``cropped/<id>.png`` + ``mask/<id>.gif`` to images/labels (empty masks skipped by default)."""
    for sub in ("cropped", "mask"):
        if not (src / sub).is_dir():
            raise PrepareError(f"DDTI source {src} has no {sub}/ folder (expected cropped/<id>.png and mask/<id>.gif)")
    masks = {p.stem: p for p in (src / "mask").iterdir() if p.suffix.lower() in (".gif", ".png")}
    images = {p.stem: p for p in (src / "cropped").iterdir() if p.suffix.lower() == ".png"}
    _problems("DDTI: image(s) without a mask in mask/", [str(images[s]) for s in sorted(set(images) - set(masks))])
    _problems("DDTI: mask(s) without an image in cropped/", [str(masks[s]) for s in sorted(set(masks) - set(images))])
    ids: dict[str, str] = {}
    for stem in sorted(images):
        if _safe_id(stem) in ids:
            raise PrepareError(f"DDTI: {images[stem]} and {images[ids[_safe_id(stem)]]} map to the same id {_safe_id(stem)!r}")
        ids[_safe_id(stem)] = stem

    stats: Counter = Counter()
    for case_id, stem in tqdm(sorted(ids.items()), desc="ddti", unit="case"):
        rels = [f"images/{case_id}.png", f"labels/{case_id}.png"]
        if _done(out, rels, overwrite):
            stats["skipped"] += 1
            continue
        mask = _read_mask(masks[stem])
        _check_same_size(_image_shape(images[stem]), mask, images[stem], masks[stem])
        if not mask.any() and not include_empty:
            stats["skipped_empty"] += 1
            continue
        stats["empty_masks"] += int(not mask.any())
        _write_gray_png(images[stem], out / rels[0])
        _save_png(out / rels[1], mask.astype(np.uint8) * 255)
        stats["written"] += 1
    return stats


def _filled_annotation(annotation: np.ndarray, path: Path, layout: str) -> tuple[np.ndarray, str]:
    """The filled region of an annotation that public mirrors ship either as a closed outline or
    already filled; returns it and ``"outline_filled"`` or ``"given_filled"``.

    An outline encloses pixels that hole filling adds. A mask that encloses none is accepted as
    already filled when it is solid (at least half of it survives an erosion by 2 pixels; a 1-3
    pixel outline does not); otherwise it is an outline that is not closed, an error naming ``path``.
    """
    if not annotation.any():
        raise PrepareError(f"{layout} annotation {path} is empty (neither an outline nor a filled region)")
    filled = ndimage.binary_fill_holes(annotation)
    if filled.sum() > annotation.sum():
        return filled, "outline_filled"
    if ndimage.binary_erosion(annotation, iterations=2).sum() >= 0.5 * annotation.sum():
        return annotation.copy(), "given_filled"
    raise PrepareError(
        f"{layout} annotation {path}: a thin outline that is not closed (nothing to fill) and not a filled region either"
    )


def prepare_hc18(src: Path, out: Path, overwrite: bool = False) -> Counter:
    """Convert HC18 ``<id>HC.png`` + ``<id>HC_Annotation.png`` to images/labels: the ellipse outline
    is filled; an annotation that comes already filled (some mirrors) is kept (:func:`_filled_annotation`)."""
    images = sorted(p for p in src.glob("*HC.png"))
    if not images:
        raise PrepareError(f"HC18 source {src} has no '*HC.png' images (point --src at training_set)")
    _problems(
        "HC18: image(s) without '<stem>_Annotation.png'",
        [str(p) for p in images if not p.with_name(f"{p.stem}_Annotation.png").is_file()],
    )
    stats: Counter = Counter()
    for image_path in tqdm(images, desc="hc18", unit="case"):
        case_id = _safe_id(image_path.stem)
        rels = [f"images/{case_id}.png", f"labels/{case_id}.png"]
        if _done(out, rels, overwrite):
            stats["skipped"] += 1
            continue
        annotation_path = image_path.with_name(f"{image_path.stem}_Annotation.png")
        outline = _read_mask(annotation_path)
        _check_same_size(_image_shape(image_path), outline, image_path, annotation_path)
        filled, kind = _filled_annotation(outline, annotation_path, "HC18")
        stats[kind] += 1
        _write_gray_png(image_path, out / rels[0])
        _save_png(out / rels[1], filled.astype(np.uint8) * 255)
        stats["written"] += 1
    return stats


# --------------------------------------------------------------------------------------------- 3D
def _binary_label(data: np.ndarray, path: Path) -> np.ndarray:
    """uint8 0/1 label from an array with at most two distinct values, naming ``path`` otherwise."""
    values = np.unique(data)
    if values.size > 2:
        raise PrepareError(f"label {path} has {values.size} distinct values {values[:5].tolist()}...; expected a binary mask")
    return (data != 0).astype(np.uint8)


def _la_id(stem: str) -> str:
    """``la_<ID>`` for an LA case (a stem that already starts with ``la_`` is kept)."""
    return stem if stem.startswith("la_") else f"la_{stem}"


def prepare_la_h5(src: Path, out: Path, spacing: Sequence[float] | None = None, overwrite: bool = False) -> Counter:
    """Convert community ``<case>/mri_norm2.h5`` (``image``/``label``, (W, H, D)) to float32/uint8 NIfTI."""
    # imported here: monai_ssl.data pulls in MONAI, which only this sub-command needs
    from monai_ssl.data.readers import read_h5_volume

    files = sorted(src.glob("*/mri_norm2.h5"))
    if not files:
        raise PrepareError(f"LA source {src} has no '<case>/mri_norm2.h5' files")
    stats: Counter = Counter()
    for h5 in tqdm(files, desc="la_h5", unit="case"):
        case_id = _la_id(h5.parent.name)
        rels = [f"imagesTr/{case_id}.nii.gz", f"labelsTr/{case_id}.nii.gz"]
        if _done(out, rels, overwrite):
            stats["skipped"] += 1
            continue
        try:
            image, affine = read_h5_volume(h5, "image")
            label, _ = read_h5_volume(h5, "label")
        except (KeyError, ValueError, OSError) as e:
            raise PrepareError(f"cannot read {h5}: {e}") from e
        if image.shape != label.shape or image.ndim != 3:
            raise PrepareError(f"{h5}: image {image.shape} and label {label.shape} must be equal 3D shapes")
        if spacing is not None:
            affine = np.diag([*spacing, 1.0])
        _save_nifti(out / rels[0], nib.Nifti1Image(image.astype(np.float32), affine))
        _save_nifti(out / rels[1], nib.Nifti1Image(_binary_label(label, h5), affine))
        stats["written"] += 1
    return stats


def prepare_la_nifti(src: Path, out: Path, overwrite: bool = False) -> Counter:
    """Copy ``imagesTr/<id>.nii[.gz]`` + ``labelsTr/<id>.nii[.gz]`` pairs; labels become uint8 0/1, ids ``la_<ID>``."""
    if not (src / "imagesTr").is_dir() or not (src / "labelsTr").is_dir():
        raise PrepareError(f"LA source {src} needs imagesTr/ and labelsTr/ folders")
    images = sorted(p for p in (src / "imagesTr").iterdir() if p.name.endswith((".nii.gz", ".nii")))
    if not images:
        raise PrepareError(f"LA source {src}/imagesTr has no .nii/.nii.gz files")
    _problems("LA: image(s) without a label of the same name in labelsTr/", [str(p) for p in images if not (src / "labelsTr" / p.name).is_file()])
    stats: Counter = Counter()
    for image_path in tqdm(images, desc="la_nifti", unit="case"):
        stem = image_path.name.removesuffix(".gz").removesuffix(".nii")
        case_id = _la_id(stem)
        rels = [f"imagesTr/{case_id}.nii.gz", f"labelsTr/{case_id}.nii.gz"]
        if _done(out, rels, overwrite):
            stats["skipped"] += 1
            continue
        label_path = src / "labelsTr" / image_path.name
        try:
            image = nib.load(image_path)
            label = nib.load(label_path)
            label_data = np.asanyarray(label.dataobj)
        except Exception as e:  # nibabel raises several types for corrupt files
            raise PrepareError(f"cannot read {image_path} / {label_path}: {e}") from e
        if image.shape != label.shape:
            raise PrepareError(f"label {label_path} has shape {label.shape} but image {image_path} has {image.shape}")
        binary = nib.Nifti1Image(_binary_label(label_data, label_path), label.affine, header=label.header)
        binary.set_data_dtype(np.uint8)
        if image_path.name.endswith(".nii.gz"):
            _atomic_write(out / rels[0], lambda tmp: shutil.copyfile(image_path, tmp))
        else:
            _save_nifti(out / rels[0], nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, header=image.header))
        _save_nifti(out / rels[1], binary)
        stats["written"] += 1
    return stats


#: HU window of the NIH Pancreas-CT preprocessing (MCF / the dual-network paper).
PANCREAS_HU_WINDOW: tuple[float, float] = (-120.0, 240.0)
#: Voxels kept around the pancreas bounding box.
PANCREAS_MARGIN = 25
_NIFTI = (".nii.gz", ".nii")
_DIGITS = re.compile(r"(\d+)(?!.*\d)")


def _nifti_stem(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".nii")


def _first_dir(src: Path, names: Sequence[str], what: str) -> Path:
    for name in names:
        if (src / name).is_dir():
            return src / name
    raise PrepareError(f"{what}: {src} has none of the folders {', '.join(names)}")


def _load_nifti(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read a NIfTI file's array and image, naming the file on error."""
    try:
        img = nib.load(path)
        return np.asanyarray(img.dataobj), img
    except Exception as e:  # nibabel raises several types for corrupt files
        raise PrepareError(f"cannot read {path}: {e}") from e


def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``margin`` voxels per side, clipped to the array."""
    coords = np.nonzero(mask)
    return tuple(slice(max(int(c.min()) - margin, 0), min(int(c.max()) + margin + 1, n)) for c, n in zip(coords, mask.shape))


def _cropped_affine(affine: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """The affine of ``array[box]``: the same voxel-to-world map, origin moved to the box's corner."""
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in box]
    return affine @ shift


def pancreas_volume(image: np.ndarray, label: np.ndarray, affine: np.ndarray, margin: int = PANCREAS_MARGIN,
                    hu_window: tuple[float, float] = PANCREAS_HU_WINDOW) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clip CT to ``hu_window``, scale it to [0, 1], crop image and label around the pancreas (+ ``margin``).

    Returns ``(image float32, label uint8 0/1, affine of the crop)``; raises ``ValueError`` on an
    empty label.
    """
    fg = label != 0
    if not fg.any():
        raise ValueError("the pancreas label is empty")
    lo, hi = hu_window
    scaled = (np.clip(image.astype(np.float32), lo, hi) - lo) / (hi - lo)
    box = _bbox(fg, margin)
    return scaled[box].astype(np.float32), fg[box].astype(np.uint8), _cropped_affine(affine, box)


def prepare_pancreas(src: Path, out: Path, margin: int = PANCREAS_MARGIN, overwrite: bool = False) -> Counter:
    """Convert NIH Pancreas-CT NIfTI pairs (``images/PANCREAS_0001.nii.gz`` + ``labels/label0001.nii.gz``).

    Images and labels are paired by the last number in their names (or by equal names). The CT
    is clipped to [-120, 240] HU and scaled to [0, 1], and both are cropped to the pancreas
    bounding box grown by ``margin`` voxels (the affine follows the crop).
    """
    image_dir = _first_dir(src, ("images", "imagesTr", "img"), "Pancreas")
    label_dir = _first_dir(src, ("labels", "labelsTr", "label", "TCIA_pancreas_labels-02-05-2017"), "Pancreas")
    images = sorted(p for p in image_dir.iterdir() if p.name.endswith(_NIFTI))
    labels = sorted(p for p in label_dir.iterdir() if p.name.endswith(_NIFTI))
    if not images:
        raise PrepareError(f"Pancreas: {image_dir} has no .nii/.nii.gz images (convert the TCIA DICOM series to NIfTI first)")

    def number(p: Path) -> int | None:
        m = _DIGITS.search(_nifti_stem(p))
        return int(m.group(1)) if m else None

    by_number = {number(p): p for p in labels}
    by_name = {p.name: p for p in labels}
    pairs: dict[str, tuple[Path, Path]] = {}
    unpaired: list[str] = []
    for p in images:
        n = number(p)
        lab = by_name.get(p.name) or by_number.get(n)
        if lab is None or n is None:
            unpaired.append(str(p))
            continue
        case_id = f"pancreas_{n:04d}"
        if case_id in pairs:
            raise PrepareError(f"Pancreas: {p} and {pairs[case_id][0]} both map to {case_id}")
        pairs[case_id] = (p, lab)
    _problems(f"Pancreas: image(s) without a label of the same number in {label_dir}", unpaired)

    return _convert_volume_pairs(
        pairs, out, overwrite, "pancreas",
        lambda image, label, affine, label_path: pancreas_volume(image, _binary_label(label, label_path), affine, margin),
    )


def _convert_volume_pairs(
    pairs: dict[str, tuple[Path, Path]],
    out: Path,
    overwrite: bool,
    desc: str,
    convert: Callable[[np.ndarray, np.ndarray, np.ndarray, Path], tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> Counter:
    """Write ``imagesTr`` / ``labelsTr/<case_id>.nii.gz`` for every ``case_id -> (image, label)`` pair.

    ``convert(image, label, affine, label_path)`` returns the volume, the 0/1 label and their
    affine; a ``ValueError`` it raises becomes a ``PrepareError`` naming both files. Finished cases
    are skipped unless ``overwrite``. Counts ``written``, ``skipped`` and ``empty_label``.
    """
    stats: Counter = Counter()
    for case_id, (image_path, label_path) in tqdm(sorted(pairs.items()), desc=desc, unit="case"):
        rels = [f"imagesTr/{case_id}.nii.gz", f"labelsTr/{case_id}.nii.gz"]
        if _done(out, rels, overwrite):
            stats["skipped"] += 1
            continue
        image, image_nii = _load_nifti(image_path)
        label, _ = _load_nifti(label_path)
        if image.shape != label.shape or image.ndim != 3:
            raise PrepareError(f"label {label_path} has shape {label.shape} but image {image_path} has {image.shape}")
        try:
            volume, mask, affine = convert(image, label, image_nii.affine, label_path)
        except ValueError as e:
            raise PrepareError(f"{image_path} / {label_path}: {e}") from e
        if not mask.any():
            stats["empty_label"] += 1
        _save_nifti(out / rels[0], nib.Nifti1Image(volume, affine))
        _save_nifti(out / rels[1], nib.Nifti1Image(mask, affine))
        stats["written"] += 1
    return stats


#: BraTS modalities (file suffixes).
BRATS_MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")


def brats_volume(image: np.ndarray, seg: np.ndarray, affine: np.ndarray, crop_brain: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole tumour (``seg > 0``) and the image z-scored over the brain (non-zero voxels; background stays 0).

    With ``crop_brain`` both are cropped to the brain's bounding box (the affine follows).
    Returns ``(image float32, label uint8 0/1, affine)``; raises ``ValueError`` on an empty image.
    """
    brain = image != 0
    if not brain.any():
        raise ValueError("the image is all zero")
    values = image[brain].astype(np.float64)
    normed = np.zeros(image.shape, dtype=np.float32)
    normed[brain] = (values - values.mean()) / (values.std() + 1e-8)
    label = (seg > 0).astype(np.uint8)
    if crop_brain:
        box = _bbox(brain, 0)
        return normed[box], label[box], _cropped_affine(affine, box)
    return normed, label, affine


def prepare_brats(src: Path, out: Path, modality: str = "flair", crop_brain: bool = True, overwrite: bool = False) -> Counter:
    """Convert BraTS 2019 ``<grade>/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` to one modality + whole tumour."""
    if modality not in BRATS_MODALITIES:
        raise PrepareError(f"BraTS: modality must be one of {BRATS_MODALITIES}, got {modality!r}")
    segs = sorted(p for p in src.rglob("*_seg.nii*") if p.name.endswith(_NIFTI))
    if not segs:
        raise PrepareError(f"BraTS source {src} has no '<case>/<case>_seg.nii.gz' files")
    cases: dict[str, tuple[Path, Path]] = {}
    missing: list[str] = []
    for seg in segs:
        case_id = _nifti_stem(seg).removesuffix("_seg")
        candidates = [seg.with_name(f"{case_id}_{modality}{ext}") for ext in _NIFTI]
        image = next((c for c in candidates if c.is_file()), None)
        if image is None:
            missing.append(str(candidates[0]))
            continue
        if case_id in cases:
            raise PrepareError(f"BraTS: case {case_id} appears twice ({cases[case_id][1]} and {seg})")
        cases[case_id] = (image, seg)
    _problems(f"BraTS: case(s) without a {modality} volume", missing)

    return _convert_volume_pairs(
        cases, out, overwrite, "brats", lambda image, seg, affine, _path: brats_volume(image, seg, affine, crop_brain)
    )


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with one sub-command per dataset."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="dataset", required=True)
    helps = {
        "busi": "BUSI Dataset_BUSI_with_GT (benign + malignant; normal with --include-normal)",
        "ddti": "DDTI cropped/<id>.png + mask/<id>.gif",
        "hc18": "HC18 training_set *_HC.png + *_HC_Annotation.png (an outline is filled; an already filled one is kept)",
        "la_h5": "LA community <case>/mri_norm2.h5 folders -> NIfTI",
        "la_nifti": "LA imagesTr/labelsTr NIfTI pairs -> normalised layout",
        "pancreas": "NIH Pancreas-CT NIfTI images/ + labels/ -> HU [-120, 240] scaled to [0, 1], cropped to pancreas + margin",
        "brats": "BraTS 2019 <grade>/<case>/<case>_<modality>.nii.gz + _seg -> one modality + whole tumour (seg > 0)",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--src", type=Path, required=True, help="source folder of the public layout")
        p.add_argument("--out", type=Path, required=True, help="output dataset dir")
        p.add_argument("--overwrite", action="store_true", help="rewrite cases whose outputs exist (default: skip)")
        if name == "busi":
            p.add_argument("--include-normal", action="store_true", help="also convert the lesion-free 'normal' class")
        if name == "ddti":
            p.add_argument("--include-empty", action="store_true", help="keep the pairs whose mask is empty")
        if name == "la_h5":
            p.add_argument(
                "--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                help="voxel spacing in mm for the NIfTI affine (default: from h5 attributes, else 1 1 1; LA is 0.625)",
            )
        if name == "pancreas":
            p.add_argument("--margin", type=int, default=PANCREAS_MARGIN, help="voxels kept around the pancreas (default 25)")
        if name == "brats":
            p.add_argument("--modality", choices=BRATS_MODALITIES, default="flair", help="input modality (default flair)")
            p.add_argument("--no-crop", dest="crop_brain", action="store_false", help="keep the full 240x240x155 grid")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (1 with a message on a data error)."""
    args = build_parser().parse_args(argv)
    if not args.src.is_dir():
        print(f"error: --src {args.src} is not a directory", file=sys.stderr)
        return 1
    try:
        if args.dataset == "busi":
            stats = prepare_busi(args.src, args.out, args.include_normal, args.overwrite)
        elif args.dataset == "ddti":
            stats = prepare_ddti(args.src, args.out, args.include_empty, args.overwrite)
        elif args.dataset == "hc18":
            stats = prepare_hc18(args.src, args.out, args.overwrite)
        elif args.dataset == "la_h5":
            stats = prepare_la_h5(args.src, args.out, args.spacing, args.overwrite)
        elif args.dataset == "pancreas":
            stats = prepare_pancreas(args.src, args.out, args.margin, args.overwrite)
        elif args.dataset == "brats":
            stats = prepare_brats(args.src, args.out, args.modality, args.crop_brain, args.overwrite)
        else:
            stats = prepare_la_nifti(args.src, args.out, args.overwrite)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    details = ", ".join(f"{k} {v}" for k, v in sorted(stats.items()) if k not in ("written", "skipped"))
    print(
        f"{args.dataset}: {stats['written']} case(s) written, {stats['skipped']} skipped (already present)"
        + (f"; {details}" if details else "")
        + f" -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
