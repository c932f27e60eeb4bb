"""textseg3d demo generator: the target only the report can tell, and a demo folder reused, replaced or refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nbsupport.demo import DEMO_MARKER
from nbsupport.textseg3d.demo_data import DEMO_SIZES, GENERATOR, demo_cases, render_demo_case, write_demo_dataset

SMOKE = DEMO_SIZES["smoke"]
TINY = {"n_cases": 2, "shape": (4, 8, 8), "spacing": (8.0, 6.0, 6.0)}


def test_demo_target_is_on_the_reported_side_and_the_image_shows_both_breasts() -> None:
    shape, spacing = SMOKE["shape"], SMOKE["spacing"]
    for case in demo_cases(8)[:4]:
        image, target = render_demo_case(case, shape, spacing)
        assert target.any()
        centre_w = np.argwhere(target)[:, 2].mean()
        # IPL: the patient's left is the high end of axis 2
        assert (centre_w > shape[2] / 2) == (case.side == "left"), case
        # soft tissue anterior to the chest on both sides: the breasts are mirror images up to jitter
        soft = (image > -500)[:, : shape[1] // 3]
        left, right = soft[..., shape[2] // 2:].sum(), soft[..., : shape[2] // 2].sum()
        assert 0.7 < left / right < 1.4


def test_a_demo_folder_is_reused_with_the_same_arguments_replaced_with_others_and_real_data_refused(
        tmp_path: Path) -> None:
    root = write_demo_dataset(tmp_path / "d", table="csv", **TINY)
    marker = json.loads((root / DEMO_MARKER).read_text())
    # the generator name of the first release, so demo folders written before the move are reused
    assert marker["complete"] and marker["params"]["generator"] == GENERATOR == \
        "nbsupport.textseg3d.data.write_demo_dataset"
    assert marker["cases"] == ["BC001", "BC002"]
    stamp = (root / "BC001" / "data.npz").stat().st_mtime_ns
    write_demo_dataset(root, table="csv", **TINY)
    assert (root / "BC001" / "data.npz").stat().st_mtime_ns == stamp  # reused, not written again
    write_demo_dataset(root, table="xlsx", **TINY)
    assert (root / "demo_report.xlsx").is_file() and not (root / "demo_report.csv").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "patient.nii.gz").write_bytes(b"real data")
    with pytest.raises(FileExistsError, match="holds no nbsupport_demo.json"):
        write_demo_dataset(tmp_path / "mine", **TINY)
    assert (tmp_path / "mine" / "patient.nii.gz").read_bytes() == b"real data"
