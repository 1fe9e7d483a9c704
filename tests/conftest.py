"""Shared fixtures: repository paths, the real-data folder, small in-memory datasets."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import pytest
import torch
from bundle_utils import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

os.environ.setdefault("MONAI_SSL_CACHE", str(REPO_ROOT / ".cache" / "test_data"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def repo_root() -> Path:
    """The repository root."""
    return REPO_ROOT


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``; tests that use it skip when it is absent (a user's fresh machine)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found: real-data test skipped")
    return SHARED_DATA


@pytest.fixture(scope="module")
def prepare_data() -> ModuleType:
    """``scripts/prepare_data.py`` as a module."""
    return load_script("prepare_data")


@pytest.fixture(scope="module")
def make_datalist() -> ModuleType:
    """``scripts/make_datalist.py`` as a module."""
    return load_script("make_datalist")


def blob_batch(n: int, size: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` images with a bright square on noise and its mask: a task a tiny net learns fast."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for _ in range(n):
        img = torch.rand(1, size, size, generator=g) * 0.3
        lab = torch.zeros(1, size, size)
        r, c = torch.randint(2, size // 2, (2,), generator=g).tolist()
        s = size // 3
        lab[:, r : r + s, c : c + s] = 1
        img = img + 0.6 * lab
        cases.append({"image": img, "label": lab})
    return cases
