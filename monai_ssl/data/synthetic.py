"""Synthetic datasets: the embedded default data of every bundle, generated on first use.

Two kinds:

* ``"us2d"``: ultrasound-like 8-bit grayscale PNGs (``images/<id>.png``) with 0/255 PNG masks
  (``labels/<id>.png``): speckle, depth attenuation, layered tissue, hypoechoic lesions of varied
  shape (ellipse, lobulated, irregular) and size, posterior shadowing or enhancement, sometimes
  a bright rim, mildly dark unlabelled structures as distractors; about 10 % of the images of
  each list have no lesion (empty mask), never more than 20 %.
* ``"vol3d"``: float32 NIfTI volumes (``imagesTr/<id>.nii.gz``, identity affine, 1 mm spacing)
  with a smooth bright blob (union of 2-3 ellipsoids) in Gaussian noise and a smooth bias
  field; uint8 0/1 labels (``labelsTr/<id>.nii.gz``). Every volume has a blob.

``size`` is the image edge (default 128) for ``us2d`` and the cube edge (default 64) for
``vol3d``. The default ``us2d`` lists are 8 labelled, 32 unlabelled, 16 validation and 32 test
images (2 and 3 of the last two lesion-free), so that one case moves the test mean Dice by at
most 1/32 (with 8 test images and its one lesion-free case, a single false alarm moved it by
0.125); ``vol3d`` keeps 8 validation and 8 test volumes (every volume has a blob, and 3D cases
cost more). Labels of the unlabelled cases are written too (for pseudo-label quality analysis)
but are not listed in ``datalist.json``.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage

from monai_ssl.data.datalist import save_datalist

__all__ = ["SYNTHETIC_KINDS", "default_cache_dir", "synthetic_dataset"]

#: Bumped whenever generation changes, so cached datasets of an older generator are regenerated.
GENERATOR_VERSION = 1
SYNTHETIC_KINDS: tuple[str, ...] = ("us2d", "vol3d")
_DEFAULT_SIZE = {"us2d": 128, "vol3d": 64}
#: Default validation and test list lengths per kind (``n_validation``/``n_test`` left as ``None``).
_DEFAULT_EVAL_COUNTS = {"us2d": (16, 32), "vol3d": (8, 8)}
_MIN_SIZE = {"us2d": 32, "vol3d": 16}
_MARKER = "COMPLETE"
#: Temp folders of killed runs older than this are removed by later runs.
_STALE_TMP_SECONDS = 3600.0


def default_cache_dir() -> Path:
    """The synthetic data cache root: env ``MONAI_SSL_CACHE``, else ``~/.cache/monai_ssl``."""
    return Path(os.environ.get("MONAI_SSL_CACHE") or "~/.cache/monai_ssl").expanduser()


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to zero mean and unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return (field - field.mean()) / (field.std() + 1e-8)


def _us2d_case(rng: np.random.Generator, size: int, with_lesion: bool) -> tuple[np.ndarray, np.ndarray]:
    """One ultrasound-like image (uint8) and its 0/255 mask (uint8), both (size, size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size  # yy = depth (row), xx = lateral

    # layered tissue: a bright skin line, gently tilted horizontal bands, smooth texture
    tilt = rng.uniform(-0.15, 0.15)
    depth = yy + tilt * (xx - 0.5)
    tissue = 0.55 + 0.08 * _smooth_noise(rng, (size, size), size / 14)
    for _ in range(3):
        tissue += rng.uniform(0.03, 0.07) * np.sin(2 * np.pi * rng.uniform(2.0, 5.0) * depth + rng.uniform(0, 2 * np.pi))
    tissue += 0.35 * np.exp(-(((yy - rng.uniform(0.03, 0.06)) / 0.012) ** 2))

    # mildly hypoechoic unlabelled structures (fat lobules, ducts): distractors
    for _ in range(rng.integers(0, 3)):
        cy, cx = rng.uniform(0.15, 0.9), rng.uniform(0.05, 0.95)
        ry, rx = rng.uniform(0.02, 0.05), rng.uniform(0.06, 0.18)
        blob = np.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2))
        tissue *= 1.0 - rng.uniform(0.15, 0.3) * blob

    mask = np.zeros((size, size), dtype=bool)
    posterior = np.ones((size, size))
    if with_lesion:
        cy, cx = rng.uniform(0.3, 0.65), rng.uniform(0.25, 0.75)
        r0 = rng.uniform(0.07, 0.2)
        aspect = rng.uniform(0.55, 1.0)  # mostly wider than tall
        angle = rng.uniform(-0.5, 0.5)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        rho = np.sqrt((u / r0) ** 2 + (v / (r0 * aspect)) ** 2)
        theta = np.arctan2(v, u)
        shape = rng.choice(["ellipse", "lobulated", "irregular"])
        radius = np.ones_like(theta)
        for k in range(2, 2 + {"ellipse": 0, "lobulated": 4, "irregular": 12}[shape]):
            amp = rng.uniform(0.04, 0.12) if shape == "lobulated" else rng.uniform(0.0, 0.25) / k**0.7
            radius += amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        rho_n = rho / np.clip(radius, 0.4, None)
        mask = rho_n < 1.0

        edge = rng.uniform(0.03, 0.1)  # sharp to blurred margin
        inside = 1.0 / (1.0 + np.exp(-(1.0 - rho_n) / edge))
        darkness = rng.uniform(0.2, 0.45) * (1.0 + 0.15 * _smooth_noise(rng, (size, size), size / 40))
        tissue = tissue * (1.0 - inside) + tissue * darkness * inside
        if rng.random() < 0.35:  # echogenic rim
            tissue += rng.uniform(0.2, 0.45) * np.exp(-(((rho_n - 1.08) / 0.06) ** 2))

        effect = rng.choice(["shadow", "enhancement", "none"], p=[0.3, 0.35, 0.35])
        if effect != "none" and mask.any():
            below = np.maximum.accumulate(mask, axis=0) & ~mask
            bottom = size - 1 - np.argmax(mask[::-1], axis=0)  # last lesion row of each column
            dist = (np.arange(size)[:, None] - bottom[None, :]) / size
            weight = below * np.exp(-np.clip(dist, 0, None) / rng.uniform(0.2, 0.5))
            weight = ndimage.gaussian_filter1d(weight.astype(np.float64), sigma=size / 64, axis=1)
            strength = -rng.uniform(0.35, 0.6) if effect == "shadow" else rng.uniform(0.25, 0.5)
            posterior = 1.0 + strength * weight

    attenuation = np.exp(-rng.uniform(0.6, 1.3) * yy)
    speckle = rng.rayleigh(scale=np.sqrt(2.0 / np.pi), size=(size, size))  # mean 1
    speckle = ndimage.gaussian_filter(speckle, sigma=(0.6, 1.2))
    speckle /= speckle.mean()
    intensity = np.clip(tissue, 0.02, None) * posterior * attenuation * speckle
    intensity += 0.01 * rng.standard_normal((size, size))
    image = np.clip(intensity * rng.uniform(200.0, 240.0), 0, 255).astype(np.uint8)
    return image, (mask.astype(np.uint8) * 255)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation matrix."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def _vol3d_case(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One float32 volume with a bright blob (union of 2-3 ellipsoids) and its uint8 0/1 label."""
    grid = np.stack(np.meshgrid(*[np.arange(size, dtype=np.float64) / size] * 3, indexing="ij"), axis=-1)
    centre = rng.uniform(0.38, 0.62, size=3)
    level = np.full((size,) * 3, np.inf)
    for i in range(rng.integers(2, 4)):
        c = centre if i == 0 else centre + rng.uniform(-0.12, 0.12, size=3)
        radii = rng.uniform(0.1, 0.2, size=3) if i == 0 else rng.uniform(0.07, 0.15, size=3)
        local = (grid - c) @ _random_rotation(rng)
        level = np.minimum(level, np.sum((local / radii) ** 2, axis=-1))
    label = (level < 1.0).astype(np.uint8)
    blob = 1.0 / (1.0 + np.exp(-(1.0 - level) / 0.15))

    coeffs = rng.uniform(-0.25, 0.25, size=3)
    bias = np.exp((grid - 0.5) @ coeffs + rng.uniform(-0.3, 0.3) * np.sum((grid - 0.5) ** 2, axis=-1))
    texture = 0.05 * _smooth_noise(rng, (size,) * 3, size / 16)
    image = (0.25 + texture + rng.uniform(0.45, 0.65) * blob) * bias + rng.normal(0.0, 0.1, size=(size,) * 3)
    return image.astype(np.float32), label


def _write_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 (H, W) array as an 8-bit grayscale PNG."""
    Image.fromarray(array, mode="L").save(path, format="PNG")


def _write_nifti(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as ``.nii.gz`` with identity affine (1 mm) and byte-reproducible gzip (mtime 0)."""
    img = nib.Nifti1Image(array, np.eye(4))
    img.header.set_xyzt_units("mm")
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def _plan(seed: int, counts: dict[str, int], kind: str) -> list[tuple[str, str, bool]]:
    """(list key, case id, has lesion) for every case; ~10 % (at most 20 %) of each 2D list is empty."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    plan: list[tuple[str, str, bool]] = []
    index = 0
    for key, n in counts.items():
        n_empty = min(int(0.1 * n + 0.5), int(0.2 * n)) if kind == "us2d" else 0
        empty = set(rng.choice(n, size=n_empty, replace=False).tolist()) if n_empty else set()
        for i in range(n):
            plan.append((key, f"{kind}_{index:04d}", i not in empty))
            index += 1
    return plan


def _generate(kind: str, out: Path, size: int, seed: int, counts: dict[str, int], params: dict[str, Any]) -> None:
    """Write all cases, ``datalist.json`` and finally the ``COMPLETE`` marker into ``out``."""
    image_dir, label_dir, suffix = ("images", "labels", ".png") if kind == "us2d" else ("imagesTr", "labelsTr", ".nii.gz")
    (out / image_dir).mkdir()
    (out / label_dir).mkdir()
    plan = _plan(seed, counts, kind)
    case_seeds = np.random.SeedSequence([seed, 1]).spawn(len(plan))
    lists: dict[str, list[dict[str, str]]] = {key: [] for key in counts}
    for (key, case_id, with_lesion), case_seed in zip(plan, case_seeds):
        rng = np.random.default_rng(case_seed)
        image_rel, label_rel = f"{image_dir}/{case_id}{suffix}", f"{label_dir}/{case_id}{suffix}"
        if kind == "us2d":
            image, label = _us2d_case(rng, size, with_lesion)
            _write_png(out / image_rel, image)
            _write_png(out / label_rel, label)
        else:
            image, label = _vol3d_case(rng, size)
            _write_nifti(out / image_rel, image)
            _write_nifti(out / label_rel, label)
        lists[key].append({"image": image_rel} if key == "unlabeled" else {"image": image_rel, "label": label_rel})
    call = ", ".join(f"{k}={v!r}" for k, v in params.items())
    save_datalist(
        out / "datalist.json",
        {
            "name": f"synthetic_{kind}",
            "protocol": {
                "split": "fixed synthetic lists",
                "counts": {key: len(v) for key, v in lists.items()},
                "empty_masks": sum(1 for _, _, lesion in plan if not lesion),
            },
            "seed": seed,
            "dataset_dir_hint": f"generated by monai_ssl.data.synthetic_dataset({call})",
            "created_by": f"monai_ssl.data.synthetic_dataset({call}), generator version {GENERATOR_VERSION}",
            **lists,
        },
    )
    (out / _MARKER).write_text(json.dumps({"generator_version": GENERATOR_VERSION, **params}, indent=4) + "\n")


def _is_complete(folder: Path, params: dict[str, Any]) -> bool:
    """True when ``folder`` has a COMPLETE marker from this generator version with these parameters."""
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return marker == {"generator_version": GENERATOR_VERSION, **params} and (folder / "datalist.json").is_file()


def _remove_stale_tmp(root: Path, name: str) -> None:
    """Delete temp folders of ``name`` left by runs killed more than an hour ago."""
    now = time.time()
    for tmp in root.glob(f".{name}.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            continue


def synthetic_dataset(
    kind: str = "us2d",
    root: str | Path | None = None,
    n_labeled: int = 8,
    n_unlabeled: int = 32,
    n_validation: int | None = None,
    n_test: int | None = None,
    size: int | None = None,
    seed: int = 0,
) -> str:
    """Return the dir of a synthetic dataset (with ``datalist.json``), generating it on first use.

    The dataset lives in ``root`` (default :func:`default_cache_dir`) under
    ``synthetic_<kind>_s<size>_l<n_labeled>_u<n_unlabeled>_v<n_validation>_t<n_test>_seed<seed>``.
    ``size`` defaults to 128 (2D edge) for ``"us2d"`` and 64 (cube edge) for ``"vol3d"``;
    ``n_validation``/``n_test`` to 16/32 for ``"us2d"`` and 8/8 for ``"vol3d"``.
    A dataset counts as present only with its ``COMPLETE`` marker (written last, matching the
    generator version and parameters); otherwise it is generated into a temp folder next to it and
    renamed into place, so killed or concurrent runs never leave a partial dataset that looks
    complete. Output is identical for identical arguments.
    """
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; choose one of {SYNTHETIC_KINDS}")
    size = _DEFAULT_SIZE[kind] if size is None else int(size)
    n_validation = _DEFAULT_EVAL_COUNTS[kind][0] if n_validation is None else n_validation
    n_test = _DEFAULT_EVAL_COUNTS[kind][1] if n_test is None else n_test
    if size < _MIN_SIZE[kind]:
        raise ValueError(f"synthetic {kind}: size={size} is too small (minimum {_MIN_SIZE[kind]})")
    counts = {"labeled": n_labeled, "unlabeled": n_unlabeled, "validation": n_validation, "test": n_test}
    bad = {k: v for k, v in counts.items() if v < 0 or (k == "labeled" and v < 1)}
    if bad:
        raise ValueError(f"synthetic {kind}: invalid case counts {bad} (n_labeled >= 1, others >= 0)")
    params = {"kind": kind, "size": size, "seed": int(seed), **{f"n_{k}": v for k, v in counts.items()}}
    name = f"synthetic_{kind}_s{size}_l{n_labeled}_u{n_unlabeled}_v{n_validation}_t{n_test}_seed{seed}"
    root = default_cache_dir() if root is None else Path(root).expanduser()
    final = root / name
    if _is_complete(final, params):
        return str(final)

    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root, name)
    tmp = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _generate(kind, tmp, size, int(seed), counts, params)
        if final.exists() and not _is_complete(final, params):
            shutil.rmtree(final)  # incomplete (killed run) or from another generator version
        try:
            os.replace(tmp, final)
        except OSError:
            if not _is_complete(final, params):  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
