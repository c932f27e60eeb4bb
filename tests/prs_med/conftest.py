"""A small synthetic PRS-Med dataset shared by the prs_med tests (five tasks, 11 images each, 48 px)."""
from __future__ import annotations

from pathlib import Path

import pytest

from nbsupport.prs_med import demo_data


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_data.write_demo_dataset(tmp_path_factory.mktemp("prs") / "demo", n_train=5, n_val=1, n_test=5,
                                        image_size=48, seed=3)
