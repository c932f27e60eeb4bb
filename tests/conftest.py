"""Test-wide settings: headless figures, sparse progress bars, and outputs kept out of the checkout."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ["NBSUPPORT_HEADLESS"] = "1"
os.environ.setdefault("NBSUPPORT_PROGRESS_INTERVAL", "30")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _outputs_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run folders of every test go to a temporary ``outputs`` unless a test sets its own."""
    if "NBSUPPORT_OUTPUTS" not in os.environ:
        monkeypatch.setenv("NBSUPPORT_OUTPUTS", str(tmp_path_factory.mktemp("outputs")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests run where CUDA is, and are skipped (saying why) only where it is absent."""
    import torch

    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="needs a CUDA device; runs on a GPU node (pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)
