"""A small synthetic UW-Madison dataset in the Kaggle layout, written once for the seg2d tests that read one."""
from __future__ import annotations

from pathlib import Path

import pytest

from nbsupport.seg2d.demo_data import write_demo_dataset


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 cases x 1 day x 8 slices (40 slices, every Kaggle size), seed 3."""
    return write_demo_dataset(tmp_path_factory.mktemp("uwmgi") / "demo", n_cases=5, days_per_case=1,
                              slices_per_day=8, seed=3)
