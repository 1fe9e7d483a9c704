"""Helpers for running bundles in tests on tiny synthetic data."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

from monai.bundle import ConfigWorkflow

from monai_ssl.data import synthetic_dataset
from monai_ssl.data.synthetic import default_cache_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES_2D = ["supervised", "mean_teacher", "dual_teacher"]


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO_ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def error_messages(exc: BaseException | None) -> list[str]:
    """Messages of ``exc`` and every exception it was raised from (MONAI's config parser wraps
    errors, so the one naming the bad file is further down the chain)."""
    messages = []
    while exc is not None:
        messages.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return messages


def config_path(bundle: str, name: str) -> str:
    """Path of ``bundles/<bundle>/configs/<name>``."""
    return str(REPO_ROOT / "bundles" / bundle / "configs" / name)


def tiny_dataset_dir() -> str:
    """A small synthetic 2D dataset (4 labelled, 8 unlabelled, 4 validation, 4 test, 64 px)."""
    return synthetic_dataset("us2d", n_labeled=4, n_unlabeled=8, n_validation=4, n_test=4, size=64)


def tiny_overrides(bundle_root: Path, **extra: Any) -> dict[str, Any]:
    """Overrides that make a 2D bundle train in seconds: 64 px, batch 2, one short epoch."""
    return {
        "bundle_root": str(bundle_root),
        "dataset_dir": tiny_dataset_dir(),
        "spatial_size": 64,
        "batch_size": 2,
        "unlabeled_batch_size": 2,
        "max_epochs": 1,
        **extra,
    }


def tiny_stage_overrides(bundle: str) -> dict[str, Any]:
    """Bundle-specific extras for the tiny runs: dual_teacher's APPG store is shared by all tests
    (LiteMedSAM runs once per cache; the settings hash guards reuse) and its warm-up is one epoch."""
    if bundle == "dual_teacher":
        return {"appg_dir": str(default_cache_dir() / "appg_tiny"), "stwp_max_epochs": 1}
    return {}


def make_workflow(bundle: str, configs: list[str], workflow_type: str = "train", **override: Any) -> ConfigWorkflow:
    """A ``ConfigWorkflow`` for ``bundles/<bundle>`` with the given config files and overrides."""
    files = [config_path(bundle, c) for c in configs]
    if workflow_type == "train":
        override = {**tiny_stage_overrides(bundle), **override}
    return ConfigWorkflow(
        config_file=files,
        meta_file=config_path(bundle, "metadata.json"),
        logging_file=config_path(bundle, "logging.conf"),
        workflow_type=workflow_type,
        **override,
    )


def dataset_with_missing_image(src: str | Path, dest: Path, missing: str) -> Path:
    """``dest``: a copy of the dataset at ``src`` whose datalist's first labelled image is
    replaced by the path ``missing``, which does not exist; returns ``dest``. (A copy, not
    symbolic links: links that leave the dataset dir are refused by ``load_datalist``.)"""
    src = Path(src)
    dest.mkdir()
    datalist = json.loads((src / "datalist.json").read_text())
    datalist["labeled"][0]["image"] = missing
    (dest / "datalist.json").write_text(json.dumps(datalist))
    for sub in src.iterdir():
        if sub.is_dir():
            shutil.copytree(sub, dest / sub.name)
    return dest
