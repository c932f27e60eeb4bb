"""UW-Madison GI tract adapter: RLE convention, filenames, PNG checks, train.csv checks, manifest, dataset.

The dataset read is the synthetic demo (``demo_root`` in conftest.py), written in the Kaggle layout."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from nbsupport.manifest import ManifestError, read_manifest, write_manifest
from nbsupport.seg2d.data import (
    CLASSES,
    SEG2D_SCHEMA,
    SliceDataset,
    SliceFile,
    build_manifest,
    masks_for_row,
    parse_slice_filename,
    parse_slice_id,
    read_slice,
    read_train_csv,
    restore_slice_size,

)
from nbsupport.seg2d.rle import rle_decode, rle_encode


# ---------------------------------------------------------------------------------------------- RLE
def test_rle_decode_is_row_major_and_one_indexed():
    # 3x4 mask, pixels 2-4 and 9-10 (1-indexed, counted along rows)
    expected = np.array([[0, 1, 1, 1],
                         [0, 0, 0, 0],
                         [1, 1, 0, 0]], dtype=bool)
    mask = rle_decode("2 3 9 2", height=3, width=4)
    assert mask.dtype == bool and mask.shape == (3, 4)
    np.testing.assert_array_equal(mask, expected)
    assert rle_encode(expected) == "2 3 9 2"


def test_rle_round_trip_on_non_square_masks():
    rng = np.random.default_rng(0)
    height, width = 310, 360  # a 360x310 (WxH) Kaggle slice
    for density in (0.001, 0.3, 0.9):
        mask = rng.random((height, width)) < density
        rle = rle_encode(mask)
        np.testing.assert_array_equal(rle_decode(rle, height, width), mask)
    blob = np.zeros((height, width), dtype=bool)
    blob[100:200, 20:300] = True
    rle = rle_encode(blob)
    assert rle.split()[:2] == [str(100 * width + 21), "280"]  # one run per row, row-major
    np.testing.assert_array_equal(rle_decode(rle, height, width), blob)
    # a transposed (column-major) reading would not give the same mask back
    assert not np.array_equal(rle_decode(rle, height, width), rle_decode(rle, width, height).T)


def test_rle_edge_runs_first_and_last_pixel():
    height, width = 310, 360
    mask = np.zeros((height, width), dtype=bool)
    mask[0, 0] = mask[-1, -1] = True
    rle = rle_encode(mask)
    assert rle == f"1 1 {height * width} 1"
    np.testing.assert_array_equal(rle_decode(rle, height, width), mask)
    full = np.ones((height, width), dtype=bool)
    assert rle_encode(full) == f"1 {height * width}"
    assert rle_decode(f"1 {height * width}", height, width).all()


def test_empty_rle():
    assert rle_encode(np.zeros((5, 7), dtype=bool)) == ""
    for empty in ("", "  ", None, float("nan")):
        mask = rle_decode(empty, 5, 7)
        assert mask.shape == (5, 7) and not mask.any()


def test_adjacent_runs_are_accepted():
    np.testing.assert_array_equal(rle_decode("1 2 3 2", 2, 3), [[True, True, True], [True, False, False]])


@pytest.mark.parametrize("rle, message", [
    ("1 2 3", "odd number"),
    ("0 2", "start 0"),
    ("3 0", "length 0"),
    ("5 -2", "length -2"),
    ("1 2 a 3", "non-integer value 'a'"),
    ("1 2.5", "non-integer value '2.5'"),
    ("5 3 1 2", "before run 1 ends"),      # unsorted
    ("1 5 3 2", "before run 1 ends"),      # overlapping
    ("11 3", "ends at pixel 13"),          # out of range for 3x4
])
def test_invalid_rle_is_rejected(rle: str, message: str):
    with pytest.raises(ValueError, match=message):
        rle_decode(rle, 3, 4)


# ---------------------------------------------------------------------------------------------- names and files
def test_parse_slice_id():
    assert parse_slice_id("case123_day20_slice_0001") == (123, 20, 1)
    for bad in ("case123_day20_0001", "case_day20_slice_0001", "case1_day2_slice_x"):
        with pytest.raises(ValueError, match="case\\{N\\}_day\\{D\\}_slice_\\{SSSS\\}"):
            parse_slice_id(bad)


def test_parse_slice_filename():
    info = parse_slice_filename("train/case1/case1_day0/scans/slice_0007_360_310_1.50_1.63.png")
    assert info == SliceFile(slice=7, width=360, height=310, pixel_spacing_w=1.5, pixel_spacing_h=1.63)
    for bad in ("slice_0001_266_266_1.50.png", "slice_0001_266_x_1.50_1.50.png", "img_0001_266_266_1.50_1.50.png",
                "slice_0001_266_266_1.50_1.50.jpg", "slice_0001_0_266_1.50_1.50.png"):
        with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
            parse_slice_filename(bad)


def _write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def test_read_slice_returns_uint16_height_by_width(tmp_path: Path):
    image = (np.arange(310 * 360) % 15000).astype(np.uint16).reshape(310, 360)
    path = _write_png(tmp_path / "slice_0001_360_310_1.50_1.50.png", image)
    out = read_slice(path)
    assert out.dtype == np.uint16 and out.shape == (310, 360)
    np.testing.assert_array_equal(out, image)


def test_read_slice_errors_are_clear(tmp_path: Path):
    good = _write_png(tmp_path / "slice_0001_8_6_1.50_1.50.png", np.full((6, 8), 1000, dtype=np.uint16))
    truncated = tmp_path / "slice_0002_8_6_1.50_1.50.png"
    truncated.write_bytes(good.read_bytes()[:40])
    corrupt = tmp_path / "slice_0003_8_6_1.50_1.50.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    eight_bit = _write_png(tmp_path / "slice_0004_8_6_1.50_1.50.png", np.full((6, 8), 10, dtype=np.uint8))
    color = _write_png(tmp_path / "slice_0005_8_6_1.50_1.50.png", np.full((6, 8, 3), 1000, dtype=np.uint16))
    wrong_size = _write_png(tmp_path / "slice_0006_8_6_1.50_1.50.png", np.full((8, 6), 1000, dtype=np.uint16))
    empty = tmp_path / "slice_0007_8_6_1.50_1.50.png"
    empty.write_bytes(b"")
    cases = [(truncated, "corrupt or truncated"), (corrupt, "corrupt or truncated"), (eight_bit, "8-bit"),
             (color, "3 channels, expected 1"), (wrong_size, "6x8 \\(WxH\\) but its filename says 8x6"),
             (empty, "empty file"), (tmp_path / "missing.png", "no such slice image")]
    for path, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
            read_slice(path)
        assert path.name in str(info.value)


# ---------------------------------------------------------------------------------------------- train.csv
def test_read_train_csv_reports_every_problem(tmp_path: Path):
    path = tmp_path / "train.csv"
    path.write_text("id,class,segmentation\n"
                    "case1_day0_slice_0001,large_bowel,\n"         # 2 ok
                    "case1_day0_slice_0001,small_bowel,1 2 3\n"    # 3 odd count
                    "case1_day0_slice_0001,stomach,5 2 1 2\n"      # 4 out of order
                    "case1_day0_slice_0001,liver,\n"               # 5 unknown class
                    "case1_slice_0002,stomach,\n"                  # 6 bad id
                    "case1_day0_slice_0001,large_bowel,1 x\n"      # 7 non-numeric + duplicate
                    "case1_day0_slice_0002,stomach,10 5 12 3\n")   # 8 overlapping
    with pytest.raises(ManifestError) as info:
        read_train_csv(path)
    found = {(p.line, p.column) for p in info.value.problems}
    assert found == {(3, "segmentation"), (4, "segmentation"), (5, "class"), (6, "id"), (7, "segmentation"),
                     (7, "class"), (8, "segmentation")}
    message = str(info.value)
    assert "train.csv" in message and "odd number" in message and "duplicate row" in message and "'liver'" in message


def test_read_train_csv_missing_columns(tmp_path: Path):
    path = tmp_path / "train.csv"
    path.write_text("id,segmentation\ncase1_day0_slice_0001,\n")
    with pytest.raises(ManifestError, match="'class'.*missing column"):
        read_train_csv(path)


def test_read_train_csv_keeps_empty_segmentation_as_empty_string(tmp_path: Path):
    path = tmp_path / "train.csv"
    path.write_text("id,class,segmentation\ncase1_day0_slice_0001,large_bowel,\ncase1_day0_slice_0001,stomach,3 4\n")
    df = read_train_csv(path)
    assert df["segmentation"].tolist() == ["", "3 4"]


# ---------------------------------------------------------------------------------------------- manifest
def test_splits_are_by_case_and_deterministic(demo_root: Path):
    a = build_manifest(demo_root, val_fraction=0.4, seed=1)
    b = build_manifest(demo_root, val_fraction=0.4, seed=1)
    pd.testing.assert_frame_equal(a, b)
    assert (a.groupby("case")["split"].nunique() == 1).all()
    assert a.groupby("split")["case"].nunique().to_dict() == {"train": 3, "val": 2}


def test_build_manifest_reports_mismatches_at_once(demo_root: Path, tmp_path: Path):
    root = tmp_path / "broken"
    shutil.copytree(demo_root, root)
    pngs = sorted(root.glob("train/*/*/scans/*.png"))
    pngs[0].unlink()                                          # csv rows without an image
    extra = pngs[1].parent / "slice_0099_266_266_1.50_1.50.png"  # an image without csv rows
    shutil.copy(pngs[1], extra)
    (pngs[2].parent / "slice_00x_1_2.png").write_bytes(b"")     # badly named file
    table = pd.read_csv(root / "train.csv", keep_default_na=False)
    width, height = parse_slice_filename(pngs[3]).width, parse_slice_filename(pngs[3]).height
    slice_id = f"{pngs[3].parent.parent.name}_slice_{parse_slice_filename(pngs[3]).slice:04d}"
    row = table.index[(table["id"] == slice_id) & (table["class"] == "stomach")][0]
    table.loc[row, "segmentation"] = f"{width * height - 1} 5"  # runs past the image
    table.to_csv(root / "train.csv", index=False)
    with pytest.raises(ManifestError) as info:
        build_manifest(root)
    message = str(info.value)
    problems = info.value.problems
    assert any("has rows but no image" in p.message for p in problems)
    assert any("no rows in train.csv" in p.message and p.file.endswith("slice_0099_266_266_1.50_1.50.png")
               for p in problems)
    assert "slice_00x_1_2.png" in message
    assert any(p.line == row + 2 and p.column == "segmentation" and "runs to pixel" in p.message for p in problems)


@pytest.mark.parametrize("folder", ["train", "test"])
def test_images_without_train_csv_are_unlabelled(demo_root: Path, tmp_path: Path, folder: str):
    root = tmp_path / "new_images"
    shutil.copytree(demo_root / "train", root / folder)  # Kaggle's hidden test set uses test/
    df = build_manifest(root)
    assert df["image"].str.startswith(f"{folder}/").all()
    assert len(df) == 40 and not df["has_labels"].any()
    assert (df[[f"rle_{c}" for c in CLASSES]] == "").all().all()
    assert set(df["split"]) == {"test"}
    assert not masks_for_row(df.iloc[0]).any()


def test_manifest_round_trip_with_seg2d_schema(demo_root: Path, tmp_path: Path):
    df = build_manifest(demo_root)
    target = tmp_path / "manifests" / "uwmgi.csv"
    write_manifest(df, target, SEG2D_SCHEMA, demo_root)
    back, root = read_manifest(target, SEG2D_SCHEMA)
    assert root == demo_root.resolve()
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    assert back["rle_stomach"].map(type).eq(str).all()

    # the schema catches an RLE past the image and a size that disagrees with the filename
    broken = df.copy()
    broken.loc[3, "rle_stomach"] = f"{int(broken.loc[3, 'width'] * broken.loc[3, 'height'])} 2"
    broken.loc[5, "width"] = 999
    with pytest.raises(ManifestError) as info:
        write_manifest(broken, tmp_path / "bad.csv", SEG2D_SCHEMA, demo_root, check_files=False)
    assert {(p.line, p.column) for p in info.value.problems} == {(5, "rle_stomach"), (7, "image")}


# ---------------------------------------------------------------------------------------------- dataset
def test_slice_dataset_shapes_and_values(demo_root: Path):
    df = build_manifest(demo_root)
    dataset = SliceDataset(df, demo_root, image_size=32)
    assert len(dataset) == len(df)
    item = dataset[5]
    assert item["index"] == 5
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert item["masks"].shape == (3, 32, 32) and item["masks"].dtype == torch.float32
    assert 0 <= float(item["image"].min()) and float(item["image"].max()) <= 1
    assert set(torch.unique(item["masks"]).tolist()) <= {0.0, 1.0}
    # masks at model resolution follow the original ones (nearest-neighbour resize)
    for i in range(len(df)):
        original = masks_for_row(df.iloc[i])
        small = dataset[i]["masks"].numpy().astype(bool)
        assert (original.reshape(3, -1).any(1) >= small.reshape(3, -1).any(1)).all()
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["index"].tolist() == [0, 1, 2, 3]
    row = dataset.manifest.iloc[batch["index"][0].item()]
    assert row["id"] == df["id"].iloc[0]
    restored = restore_slice_size(batch["masks"][0].numpy(), int(row["height"]), int(row["width"]))
    assert restored.shape == (3, row["height"], row["width"])


def test_slice_dataset_augmentation_changes_items_but_not_shapes(demo_root: Path):
    df = build_manifest(demo_root)
    part = df[df["slice"] == 4].head(2)
    plain = SliceDataset(part, demo_root, image_size=24)
    augmented = SliceDataset(part, demo_root, image_size=24, augment=True)
    torch.manual_seed(0)
    items = [augmented[0] for _ in range(8)]
    assert all(it["image"].shape == (1, 24, 24) and it["masks"].shape == (3, 24, 24) for it in items)
    assert any(not torch.equal(it["image"], plain[0]["image"]) for it in items)
    assert torch.equal(plain[0]["image"], plain[0]["image"])  # off by default: the same item every time
