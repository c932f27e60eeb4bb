"""ct_clip test data: a tiny CT-RATE demo, preprocessed, shared by the task and pipeline tests."""
from __future__ import annotations

import pytest

from nbsupport.ct_clip import demo_data
from nbsupport.ct_clip import preprocessing as ct_pre


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory):
    """(data root, manifest) of 3 + 1 demo patients preprocessed to 16^3 voxels."""
    tmp_path = tmp_path_factory.mktemp("ct_clip_tiny")
    root = demo_data.write_demo_dataset(tmp_path / "data", n_train_patients=3, n_valid_patients=1, scale=0.2)
    manifest = tmp_path / "ct.csv"
    assert ct_pre.main(["--data-root", str(root), "--manifest", str(manifest), "--workers", "1", "--spacing", "8",
                        "8", "8", "--shape", "16", "16", "16", "--val-fraction", "0.34"]) == 0
    return root, manifest
