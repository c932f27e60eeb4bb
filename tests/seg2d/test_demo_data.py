"""The synthetic UW-Madison demo: Kaggle layout and formats, organs that vary and overlap, deterministic output,
and a folder that is reused, replaced or refused through the shared demo marker."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from nbsupport.demo import DEMO_MARKER, read_demo_marker
from nbsupport.manifest import ManifestError
from nbsupport.seg2d.data import (CLASSES, MANIFEST_COLUMNS, build_manifest, masks_for_row, normalize_intensity,
                                  read_slice)
from nbsupport.seg2d.demo_data import DEMO_SIZES, GENERATOR, write_demo_dataset


def test_demo_dataset_is_in_kaggle_format(demo_root: Path):
    table = pd.read_csv(demo_root / "train.csv", keep_default_na=False)
    assert list(table.columns) == ["id", "class", "segmentation"]
    assert len(table) == 5 * 8 * 3
    assert table["class"].tolist()[:6] == list(CLASSES) * 2  # three rows per slice, in Kaggle's order
    pngs = sorted(demo_root.glob("train/case*/case*_day*/scans/slice_*.png"))
    assert len(pngs) == 40
    image = cv2.imread(str(pngs[0]), cv2.IMREAD_UNCHANGED)
    assert image.dtype == np.uint16 and image.ndim == 2
    assert 3000 < image.max() < 40000


def test_demo_dataset_reads_with_the_real_adapter(demo_root: Path):
    df = build_manifest(demo_root, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert list(df.columns) == list(MANIFEST_COLUMNS)
    assert len(df) == 40 and df["id"].is_unique and df["has_labels"].all()
    sizes = set(zip(df["width"], df["height"]))
    assert {(360, 310), (266, 266), (234, 234), (276, 276)} <= sizes
    spacing = set(df["pixel_spacing_w"])
    assert len(spacing) >= 2
    # images decode to the size the filename says (height, width)
    wide = df[(df["width"] == 360)].iloc[0]
    assert read_slice(demo_root / wide["image"]).shape == (310, 360)
    assert masks_for_row(wide).shape == (3, 310, 360)

    masks = [masks_for_row(row) for _, row in df.iterrows()]
    present = np.array([m.reshape(3, -1).any(1) for m in masks])
    assert present.any(0).all(), "every organ appears somewhere"
    assert (~present.any(1)).any(), "some slices have no organ at all"
    assert (present.sum(0) < len(df)).all(), "every organ is absent from some slices"
    overlaps = sum(int((m[0] & m[2]).sum()) for m in masks)
    assert overlaps > 0, "large bowel and stomach overlap somewhere"
    # the first slice of each scan is above the organs
    assert not present[df["slice"].to_numpy() == 1].any()

    by_case = df.groupby("case")["split"].nunique()
    assert (by_case == 1).all()
    assert set(df["split"]) == {"train", "val", "test"}


def test_organs_are_visible_in_the_image(demo_root: Path):
    df = build_manifest(demo_root)
    stomach, background = [], []
    for _, row in df.iterrows():
        m = masks_for_row(row)
        if m[2].sum() > 200:
            image = normalize_intensity(read_slice(demo_root / row["image"]))
            stomach.append(np.median(image[m[2]]))
            body = image > 0.1
            background.append(np.median(image[body & ~m.any(0)]))
    assert stomach, "the stomach is large in some slices"
    assert np.mean(stomach) > np.mean(background) + 0.2  # fluid-bright stomach stands out from the abdomen


def test_demo_sizes_follow_the_cli_convention():
    assert set(DEMO_SIZES) == {"smoke", "demo"}
    smoke = DEMO_SIZES["smoke"]
    assert smoke["n_cases"] >= 3  # one case each for train, val and test
    assert DEMO_SIZES["demo"] == {"n_cases": 16, "days_per_case": 2, "slices_per_day": 24}


def test_demo_is_deterministic_and_reused(tmp_path: Path):
    a = write_demo_dataset(tmp_path / "a", n_cases=2, days_per_case=1, slices_per_day=3, seed=5)
    b = write_demo_dataset(tmp_path / "b", n_cases=2, days_per_case=1, slices_per_day=3, seed=5)
    assert (a / "train.csv").read_bytes() == (b / "train.csv").read_bytes()
    for png in a.glob("train/**/*.png"):
        assert png.read_bytes() == (b / png.relative_to(a)).read_bytes()
    # the generator's name from before it left data.py: demo folders written since are reused, not rewritten
    assert GENERATOR == "nbsupport.seg2d.data.write_demo_dataset" == read_demo_marker(a)["params"]["generator"]
    stamp = (a / "train.csv").stat().st_mtime_ns
    write_demo_dataset(tmp_path / "a", n_cases=2, days_per_case=1, slices_per_day=3, seed=5)
    assert (a / "train.csv").stat().st_mtime_ns == stamp  # same arguments: reused, not rewritten
    write_demo_dataset(tmp_path / "a", n_cases=1, days_per_case=1, slices_per_day=2, seed=5)
    assert len(build_manifest(a)) == 2  # other arguments: replaced, no stale slices left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        write_demo_dataset(tmp_path / "mine", n_cases=1, days_per_case=1, slices_per_day=2)


def test_interrupted_demo_is_detected(demo_root: Path, tmp_path: Path):
    root = tmp_path / "interrupted"
    shutil.copytree(demo_root, root)
    (root / "train.csv").unlink()
    marker = root / DEMO_MARKER
    marker.write_text(marker.read_text().replace('"complete": true', '"complete": false'))
    with pytest.raises(ManifestError, match="not written to the end"):
        build_manifest(root)
    write_demo_dataset(root, n_cases=5, days_per_case=1, slices_per_day=8, seed=3)  # regenerates
    assert len(build_manifest(root)) == 40
