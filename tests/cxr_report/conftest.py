"""The small synthetic dataset the cxr_report tests read."""
from __future__ import annotations

from pathlib import Path

import pytest

from nbsupport.cxr_report.demo_data import write_demo_dataset


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 synthetic patients at 128 px (seed 3), CheXpert Plus layout."""
    return write_demo_dataset(tmp_path_factory.mktemp("cxr") / "demo", n_patients=30, image_size=128, seed=3)
