"""The PRS-Med layout adapter: position_of as the official generator, mask checks, manifest, Dataset."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from nbsupport.manifest import ManifestError
from nbsupport.prs_med import data


def _box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1 + 1, x0:x1 + 1] = 255
    return m


@pytest.mark.parametrize("box, expected", [
    ((10, 20, 10, 20), "top left"),
    ((10, 20, 70, 90), "top right"),
    ((70, 90, 10, 20), "bottom left"),
    ((70, 90, 70, 90), "bottom right"),
    ((40, 60, 45, 55), "center"),
    # the box touches the centre pixel (50, 50) exactly: inclusive bounds make it "center"
    ((10, 50, 10, 50), "center"),
    # box centre x == centre_x: left needs "<", so it is right; the box lies above the centre -> top right
    ((5, 20, 45, 55), "top right"),
])
def test_position_of_follows_the_official_rule(box: tuple[int, int, int, int], expected: str) -> None:
    assert data.position_of(_box(100, 100, *box)).position == expected


def test_position_of_near_center_threshold() -> None:
    near = data.position_of(_box(100, 100, 36, 40, 36, 40))  # box centre (38, 38): 16.97 px < 20
    far = data.position_of(_box(100, 100, 30, 34, 30, 34))  # box centre (32, 32): 25.5 px
    assert (near.position, near.near_center) == ("top left", True)
    assert (far.position, far.near_center) == ("top left", False)


def test_position_of_rejects_empty_and_non_binary_masks() -> None:
    with pytest.raises(ValueError, match="empty mask"):
        data.position_of(np.zeros((8, 8), dtype=np.uint8))
    soft = _box(8, 8, 1, 3, 1, 3)
    soft[2, 2] = 128
    with pytest.raises(ValueError, match="not a binary mask: 3 distinct values"):
        data.position_of(soft)


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def test_read_mask_errors_name_the_file_and_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="gone.png: mask is missing"):
        data.read_mask(tmp_path / "gone.png")
    _write(tmp_path / "small.png", _box(32, 40, 1, 5, 1, 5))
    with pytest.raises(ValueError, match=r"small.png: mask is 40x32 \(WxH\) but its image is 64x64"):
        data.read_mask(tmp_path / "small.png", (64, 64))
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    _write(tmp_path / "grey.png", grey)
    with pytest.raises(ValueError, match="grey.png: not a binary mask"):
        data.read_mask(tmp_path / "grey.png")
    assert data.read_mask(tmp_path / "small.png", (32, 40)).sum() == 25


def test_build_manifest_reports_every_bad_mask_at_once(demo_root: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(demo_root, root)
    ann = pd.read_csv(root / "annotations" / "lung_Xray.csv")
    names = list(ann["image_name"][:3])
    (root / "lung_Xray" / "train_masks" / names[0]).unlink()
    _write(root / "lung_Xray" / "train_masks" / names[1], _box(20, 20, 1, 5, 1, 5))
    grey = np.full((48, 48), 7, dtype=np.uint8)
    grey[:10, :10] = 200
    grey[0, 0] = 0
    _write(root / "lung_Xray" / "train_masks" / names[2], grey)
    with pytest.raises(ManifestError) as err:
        data.build_manifest(root)
    text = str(err.value)
    assert "3 problems" in text
    assert "annotations/lung_Xray.csv, line 2, column 'mask_path': mask is missing" in text
    assert "line 3" in text and "mask is 20x20 (WxH) but its image is 48x48" in text
    assert "line 4" in text and "not a binary mask: 3 distinct values" in text


def test_official_csv_form_and_position_disagreements(demo_root: Path, tmp_path: Path) -> None:
    """The generator's own CSV: image_path = mask path, position = a sentence; a wrong sentence is reported."""
    import shutil

    root = tmp_path / "official"
    shutil.copytree(demo_root, root)
    ann = pd.read_csv(root / "annotations" / "skin_rgbimage.csv")
    official = pd.DataFrame({
        "image_path": [f"skin_rgbimage/{s}_masks/{n}" for s, n in zip(ann["split"], ann["image_name"])],
        "image_name": ann["image_name"], "split": ann["split"], "question": ann["question"],
        "answer": ann["answer"], "position": [f"The lesion is located at the {p} of the image." for p in ann["position"]],
    })
    wrong = "top left" if ann.loc[0, "position"] != "top left" else "bottom right"
    official.loc[0, "position"] = f"It is in the {wrong}."
    official.to_csv(root / "annotations" / "skin_rgbimage.csv", index=False)
    manifest, disagreements = data.build_manifest(root, tasks=["skin_rgbimage"])
    assert len(manifest) == len(ann)
    assert manifest.iloc[0]["image"] == f"skin_rgbimage/{ann.loc[0, 'split']}_images/{ann.loc[0, 'image_name']}"
    assert list(disagreements["line"]) == [2]
    assert disagreements.iloc[0]["csv_position"] == wrong
    assert disagreements.iloc[0]["mask_position"] == ann.loc[0, "position"] == manifest.iloc[0]["position"]


def test_dataset_items_are_normalised_tensors(demo_root: Path) -> None:
    manifest, _ = data.build_manifest(demo_root)
    ds = data.PositionQADataset(manifest.head(3), demo_root, image_size=32)
    item = ds[1]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0} and item["mask"].sum() > 0
    batch = data.collate_qa([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["question"] == list(manifest["question"][:2])
