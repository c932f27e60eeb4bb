"""The synthetic PRS-Med dataset: the released layout, every task and position, distinct looks, findings drawn where
their masks are; the same bytes as before the generator moved; the demo-folder marker."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from nbsupport.demo import DEMO_MARKER
from nbsupport.metrics import POSITIONS
from nbsupport.prs_med import data, demo_data


def test_demo_data_follows_the_layout_and_covers_tasks_and_positions(demo_root: Path) -> None:
    manifest, disagreements = data.build_manifest(demo_root)
    assert len(disagreements) == 0
    assert sorted(manifest["task"].unique()) == sorted(demo_data.DEMO_TASKS)
    assert len(manifest) == 5 * 11
    test = manifest[manifest.split == "test"]
    for task, part in test.groupby("task"):
        assert sorted(part["position"]) == sorted(POSITIONS), task  # all five positions in every task's test split
    assert manifest["question"].nunique() >= 8 and manifest["answer"].nunique() >= 10
    for row in manifest.itertuples():
        assert (demo_root / row.image).is_file() and (demo_root / row.mask).is_file()
        assert row.image.split("/")[1] == f"{row.split}_images" and row.mask.split("/")[1] == f"{row.split}_masks"
        assert data.position_of(data.read_mask(demo_root / row.mask)).position == row.position


def test_demo_tasks_look_different(demo_root: Path) -> None:
    manifest, _ = data.build_manifest(demo_root)
    looks = {}
    for task, part in manifest.groupby("task"):
        image = data.read_image(demo_root / part.iloc[0]["image"]).astype(float)
        colour = float(np.abs(image[..., 0] - image[..., 2]).mean())
        looks[task] = (colour, image.mean(), image.std())
    grey = ("brain_tumors_ct_scan", "breast_tumors_ct_scan", "lung_Xray")
    assert all(looks[t][0] < 1 for t in grey)
    assert all(looks[t][0] > 20 for t in ("polyp_endoscopy", "skin_rgbimage"))
    assert len({round(v[1] / 10) for v in looks.values()}) >= 4  # mean brightness differs between modalities


def test_demo_finding_is_drawn_where_its_mask_is_not_flipped(demo_root: Path) -> None:
    # The image read back (BGR file -> RGB) shows the finding inside its mask: the colour contrast between the mask
    # and a 3 px ring around it is clearly larger than with the mask flipped top/bottom or left/right. Checked on
    # the tasks whose background near a lesion is plain (CT, endoscopy, skin); the ultrasound fan and the X-ray's
    # lung fields give a flipped mask its own contrast.
    manifest, _ = data.build_manifest(demo_root)
    plain = manifest[manifest.task.isin(["brain_tumors_ct_scan", "polyp_endoscopy", "skin_rgbimage"])
                     & (manifest.position != "center")]  # a centred blob flipped still mostly overlaps itself
    assert len(plain) == 3 * (11 - 3)  # 3 of each task's 11 images are centred (train 1, val 1, test 1)
    for row in plain.itertuples():
        image = data.read_image(demo_root / row.image).astype(float)
        mask = data.read_mask(demo_root / row.mask)

        def contrast(m: np.ndarray) -> float:
            ring = cv2.dilate(m.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool) & ~m
            return float(np.abs(image[m].mean(axis=0) - image[ring].mean(axis=0)).sum())

        true, flipped = contrast(mask), max(contrast(mask[::-1]), contrast(mask[:, ::-1]))
        assert true > 1.5 * flipped, (row.image, row.position, true, flipped)


# sha256 over the relative path and bytes of every file of this demo, from the generator as it was in data.py before it
# moved here (main at c313bc6): the demo datasets written since must keep their bytes, so the demo metrics stay.
PINNED_DEMO_SHA256 = "14f58cf50651e0183d0c3ddf84e88b0114b121dc11898a9b58ca0cd815c47ca2"


def _tree_sha256(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != DEMO_MARKER:
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_demo_bytes_are_those_of_the_generator_before_the_move(tmp_path: Path) -> None:
    root = demo_data.write_demo_dataset(tmp_path / "d", n_train=3, n_val=1, n_test=2, image_size=40,
                                        tasks=("polyp_endoscopy", "lung_Xray", "breast_tumors_ct_scan"), seed=3)
    assert _tree_sha256(root) == PINNED_DEMO_SHA256


def test_demo_folder_is_reused_replaced_or_refused(tmp_path: Path) -> None:
    small = {"n_train": 1, "n_val": 0, "n_test": 1, "image_size": 32, "tasks": ("skin_rgbimage",)}
    root = demo_data.write_demo_dataset(tmp_path / "d", **small)
    marker = json.loads((root / DEMO_MARKER).read_text())
    assert marker["complete"] and marker["params"]["generator"] == "nbsupport.prs_med.demo_data.write_demo_dataset"
    first = root / "skin_rgbimage" / "train_images" / "skin_rgbimage_train_0000.png"
    stamp = first.stat().st_mtime_ns
    demo_data.write_demo_dataset(root, **small)  # same arguments: nothing rewritten
    assert first.stat().st_mtime_ns == stamp
    demo_data.write_demo_dataset(root, **{**small, "tasks": ("lung_Xray",)})  # other arguments: replaced
    assert not (root / "skin_rgbimage").exists() and (root / "annotations" / "lung_Xray.csv").is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "scan.png").write_bytes(b"somebody's data")
    with pytest.raises(FileExistsError, match="holds no nbsupport_demo.json"):
        demo_data.write_demo_dataset(tmp_path / "mine", **small)
    with pytest.raises(ValueError, match="unknown task 'lungs'"):
        demo_data.write_demo_dataset(tmp_path / "other", **{**small, "tasks": ("lungs",)})
