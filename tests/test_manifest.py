"""Manifest contract: every problem at once with CSV line numbers, relative paths, sidecar, moved data roots."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from nbsupport.manifest import (
    Column,
    ManifestError,
    ManifestSchema,
    absolute_data_path,
    meta_path,
    read_manifest,
    validate_manifest,
    write_manifest,
)


def _read_png(path: Path) -> np.ndarray:
    image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError("not a PNG")
    return image


SCHEMA = ManifestSchema(
    dataset="toy",
    key="id",
    columns=(
        Column("id", "str", help="sample id"),
        Column("label", "int", help="class index"),
        Column("weight", "float", nullable=True),
        Column("image", "path"),
        Column("note", "str", nullable=True),
        Column("organ", "str", allowed=("liver", "kidney")),
        Column("split", "split"),
    ),
    readers={"image": _read_png},
)


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    for i in range(4):
        cv2.imwrite(str(root / "images" / f"s{i}.png"), np.full((4, 5), i * 10, dtype=np.uint8))
    (root / "images" / "broken.png").write_bytes(b"not a png at all")
    return root


def _good_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "id": [f"s{i}" for i in range(4)],
        "label": [0, 1, 2, 1],
        "weight": [0.5, None, 1.5, 2.0],
        "image": [f"images/s{i}.png" for i in range(4)],
        "note": ["", "x", "", "y"],
        "organ": ["liver", "kidney", "liver", "liver"],
        "split": ["train", "train", "val", "test"],
    })


def test_valid_frame_has_no_problems(data_root: Path):
    assert validate_manifest(_good_frame(), SCHEMA, data_root) == []


def test_all_problems_are_reported_at_once_with_line_numbers(data_root: Path):
    df = _good_frame()
    df = pd.concat([df, df.iloc[[0]]], ignore_index=True)  # line 6: duplicate key s0
    df["label"] = df["label"].astype(object)
    df.loc[0, "label"] = "three"           # line 2
    df["weight"] = df["weight"].astype(object)
    df.loc[0, "weight"] = "heavy"          # line 2, a second problem in the same row
    df.loc[1, "split"] = "training"        # line 3
    df.loc[2, "image"] = "images/nope.png"  # line 4: missing file
    df.loc[3, "image"] = "images/broken.png"  # line 5: unreadable
    df.loc[3, "organ"] = "spleen"           # line 5: not allowed
    df.loc[1, "id"] = ""                    # line 3: empty non-nullable
    problems = validate_manifest(df, SCHEMA, data_root)
    found = {(p.line, p.column) for p in problems}
    assert found == {(2, "label"), (2, "weight"), (3, "split"), (3, "id"), (4, "image"), (5, "image"), (5, "organ"),
                     (6, "id")}
    text = {(p.line, p.column): str(p) for p in problems}
    assert "expected an integer" in text[(2, "label")]
    assert "'training'" in text[(3, "split")] and "train" in text[(3, "split")]
    assert "does not exist" in text[(4, "image")]
    assert "cannot read broken.png" in text[(5, "image")]
    assert "first seen on line 2" in text[(6, "id")]

    with pytest.raises(ManifestError) as info:
        write_manifest(df, data_root.parent / "manifests" / "toy.csv", SCHEMA, data_root)
    message = str(info.value)
    assert "toy.csv" in message and "8 problems" in message
    for line in (2, 3, 4, 5, 6):
        assert f"line {line}" in message


def test_missing_required_column_is_reported_with_the_row_problems(data_root: Path):
    df = _good_frame().drop(columns=["organ"])
    df["label"] = [-1.5, 1, 2, 1]
    problems = validate_manifest(df, SCHEMA, data_root)
    assert {(p.line, p.column) for p in problems} == {(None, "organ"), (2, "label")}


def test_long_problem_lists_are_capped_with_a_count(data_root: Path):
    df = pd.DataFrame({**{c: ["x"] * 80 for c in ("id", "note")}, "label": ["bad"] * 80, "weight": [""] * 80,
                       "image": ["images/s0.png"] * 80, "organ": ["liver"] * 80, "split": ["train"] * 80})
    df["id"] = [f"s{i}" for i in range(80)]
    with pytest.raises(ManifestError) as info:
        write_manifest(df, data_root / "m.csv", SCHEMA, data_root, check_files=False)
    assert len(info.value.problems) == 80
    assert "... and 30 more problems" in str(info.value)
    assert str(info.value).count("expected an integer") == 50


def test_nothing_is_written_when_invalid(data_root: Path, tmp_path: Path):
    df = _good_frame()
    df.loc[2, "split"] = "holdout"
    target = tmp_path / "manifests" / "toy.csv"
    with pytest.raises(ManifestError, match="line 4"):
        write_manifest(df, target, SCHEMA, data_root)
    assert not target.exists() and not meta_path(target).exists()
    assert not target.parent.exists() or not any(target.parent.iterdir())  # no temporary files left either


def test_write_read_round_trip(data_root: Path, tmp_path: Path):
    target = tmp_path / "manifests" / "toy.csv"
    write_manifest(_good_frame(), target, SCHEMA, data_root)
    meta = json.loads(meta_path(target).read_text())
    assert meta["dataset"] == "toy" and meta["n_rows"] == 4
    assert meta["data_root"] == str(data_root.resolve())
    assert meta["columns"] == [c.name for c in SCHEMA.columns]
    assert meta["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()

    df, root = read_manifest(target, SCHEMA)
    assert root == data_root.resolve()
    expected = _good_frame()
    assert df["id"].tolist() == expected["id"].tolist()
    assert df["label"].tolist() == [0, 1, 2, 1] and df["label"].dtype == np.int64
    assert df["weight"].iloc[0] == 0.5 and np.isnan(df["weight"].iloc[1])
    assert df["note"].tolist() == ["", "x", "", "y"]  # empty strings stay strings, not NaN
    assert df["split"].tolist() == ["train", "train", "val", "test"]
    assert absolute_data_path(df["image"].iloc[2], root) == data_root.resolve() / "images" / "s2.png"


def test_absolute_paths_under_the_root_are_stored_relative(data_root: Path, tmp_path: Path):
    df = _good_frame()
    df["image"] = [str(data_root / "images" / f"s{i}.png") for i in range(4)]
    target = tmp_path / "toy.csv"
    write_manifest(df, target, SCHEMA, data_root)
    stored = pd.read_csv(target, dtype=str, keep_default_na=False)
    assert stored["image"].tolist() == [f"images/s{i}.png" for i in range(4)]


def test_absolute_path_outside_the_root_is_a_problem(data_root: Path, tmp_path: Path):
    outside = tmp_path / "elsewhere.png"
    shutil.copy(data_root / "images" / "s0.png", outside)
    df = _good_frame()
    df.loc[1, "image"] = str(outside)
    df.loc[2, "image"] = "../elsewhere.png"
    target = tmp_path / "toy.csv"
    with pytest.raises(ManifestError) as info:
        write_manifest(df, target, SCHEMA, data_root)
    assert {(p.line, p.column) for p in info.value.problems} == {(3, "image"), (4, "image")}
    assert "absolute path" in str(info.value) and "'..'" in str(info.value)
    assert not target.exists()


def test_moved_data_root_names_the_root_tried_and_data_root_fixes_it(data_root: Path, tmp_path: Path):
    target = tmp_path / "manifests" / "toy.csv"
    write_manifest(_good_frame(), target, SCHEMA, data_root)
    moved = tmp_path / "archive" / "data_v1"
    moved.parent.mkdir()
    shutil.move(str(data_root), str(moved))
    # the manifest stays behind: neither the recorded root nor the manifest-relative root holds the data
    with pytest.raises(ManifestError) as info:
        read_manifest(target, SCHEMA)
    message = str(info.value)
    assert str(data_root.resolve()) in message and "data_root" in message and "toy.meta.json" in message
    df, root = read_manifest(target, SCHEMA, data_root=moved)
    assert root == moved.resolve() and len(df) == 4


def test_data_root_with_missing_files_is_reported(data_root: Path, tmp_path: Path):
    target = tmp_path / "toy.csv"
    write_manifest(_good_frame(), target, SCHEMA, data_root)
    (data_root / "images" / "s3.png").unlink()
    with pytest.raises(ManifestError) as info:
        read_manifest(target, SCHEMA)
    assert [(p.line, p.column) for p in info.value.problems] == [(5, "image")]
    assert f"Data root tried: {data_root.resolve()}" in str(info.value)


def test_manifest_and_data_moved_together_are_found_relative_to_the_manifest(data_root: Path, tmp_path: Path):
    project = tmp_path / "project"
    shutil.copytree(data_root, project / "data")
    write_manifest(_good_frame(), project / "manifests" / "toy.csv", SCHEMA, project / "data")
    moved = tmp_path / "project_moved"
    shutil.move(str(project), str(moved))
    df, root = read_manifest(moved / "manifests" / "toy.csv", SCHEMA)
    assert root == (moved / "data").resolve() and len(df) == 4


def test_manifest_without_sidecar_needs_data_root(data_root: Path, tmp_path: Path):
    target = tmp_path / "toy.csv"
    write_manifest(_good_frame(), target, SCHEMA, data_root)
    meta_path(target).unlink()
    with pytest.raises(ManifestError, match="data_root"):
        read_manifest(target, SCHEMA)
    df, _ = read_manifest(target, SCHEMA, data_root=data_root)
    assert len(df) == 4


def test_hand_edited_csv_is_validated_again(data_root: Path, tmp_path: Path):
    target = tmp_path / "toy.csv"
    write_manifest(_good_frame(), target, SCHEMA, data_root)
    target.write_text(target.read_text().replace("kidney", "spleen"))
    with pytest.warns(UserWarning, match="changed since it was written"), pytest.raises(ManifestError, match="line 3"):
        read_manifest(target, SCHEMA)
