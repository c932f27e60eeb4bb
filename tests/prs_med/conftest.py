"""Shared by the prs_med tests: a small synthetic PRS-Med dataset (five tasks, 11 images each, 48 px), and this
folder on ``sys.path`` so that they import ``prs_med_layouts`` (pytest's importlib mode does not put it there)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nbsupport.prs_med import demo_data

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_data.write_demo_dataset(tmp_path_factory.mktemp("prs") / "demo", n_train=5, n_val=1, n_test=5,
                                        image_size=48, seed=3)
