"""Bad inputs for prs_med (PRS-Med / MMRS layout: <task>/<split>_images, _masks, annotations/<task>.csv), through
the real stage verbs: dataset cases through ``prs_med.preprocess`` (01_preprocess), manifest cases through
``prs_med.train`` (02_train, whose first act is reading the manifest), parameter cases through ``from_params``.
See catalogue.py for what each case must show.
"""
from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from nbsupport.manifest import meta_path
from nbsupport.prs_med import config, demo_data, pipeline
from nbsupport.prs_med import data as prs_data
from nbsupport.runs import RunFolder

sys.path.insert(0, str(Path(__file__).parent))
from catalogue import (
    BadInput,
    Expect,
    assert_02_train_refuses,
    assert_parameters_refused,
    assert_refused,
    manifest_cell,
    manifest_duplicate,
    manifest_moved_from_its_data,
    parameter_cases,
    several,
)

TASKS = ("lung_Xray", "polyp_endoscopy")
SIZES = {"n_train": 3, "n_val": 1, "n_test": 2, "image_size": 32, "tasks": TASKS}  # 6 rows per task
CSV = "annotations/lung_Xray.csv"


# ---------------------------------------------------------------------------------------------- damage helpers
def annotations(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / CSV, dtype=str, keep_default_na=False)


def file_of(root: Path, index: int, folder: str) -> Path:
    """The image (``folder="images"``) or mask (``"masks"``) of lung_Xray.csv row ``index`` (line index + 2)."""
    row = annotations(root).iloc[index]
    return root / "lung_Xray" / f"{row['split']}_{folder}" / row["image_name"]


def file_bytes(index: int, folder: str, change: Callable[[bytes], bytes],
               says: str) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(root: Path) -> tuple[Expect, ...]:
        path = file_of(root, index, folder)
        path.write_bytes(change(path.read_bytes()))
        return (Expect(CSV, "image_name" if folder == "images" else "mask_path", says, line=index + 2),)
    return damage


def mask_pixels(index: int, mask: Callable[[np.ndarray], np.ndarray],
                says: str) -> Callable[[Path], tuple[Expect, ...]]:
    """Re-encode row ``index``'s mask as another (valid) PNG."""
    def damage(root: Path) -> tuple[Expect, ...]:
        path = file_of(root, index, "masks")
        ok, encoded = cv2.imencode(".png", mask(cv2.imread(str(path), cv2.IMREAD_UNCHANGED)))
        assert ok
        path.write_bytes(encoded.tobytes())
        return (Expect(CSV, "mask_path", says, line=index + 2),)
    return damage


def remove(index: int, folder: str, says: str) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(root: Path) -> tuple[Expect, ...]:
        file_of(root, index, folder).unlink()
        return (Expect(CSV, "image_name" if folder == "images" else "mask_path", says, line=index + 2),)
    return damage


def csv_cell(index: int, column: str, value: str, says: str) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(root: Path) -> tuple[Expect, ...]:
        table = annotations(root)
        table.loc[index, column] = value
        table.to_csv(root / CSV, index=False, lineterminator="\n")
        return (Expect(CSV, column, says, line=index + 2),)
    return damage


def drop_column(column: str) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(root: Path) -> tuple[Expect, ...]:
        annotations(root).drop(columns=[column]).to_csv(root / CSV, index=False, lineterminator="\n")
        return (Expect(CSV, None, f"missing columns \\['{column}'\\]", line=1),)
    return damage


def anti_aliased(mask: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(mask, (5, 5), 1.5)  # what a resize or JPEG round trip does to a 0/255 mask


def coloured(mask: np.ndarray) -> np.ndarray:
    bgr = np.dstack([mask] * 3)
    bgr[..., 2] = 0  # foreground drawn in cyan: the channels differ
    return bgr


def label_map_16bit(mask: np.ndarray) -> np.ndarray:
    out = (mask > 0).astype(np.uint16)
    out[::2] *= 2  # a 16-bit label map (0, 1, 2 on alternate rows) taken for a binary mask
    return out


def mask_16bit_binary(mask: np.ndarray) -> np.ndarray:
    return (mask > 0).astype(np.uint16) * 65535


DATASET_CASES = [
    BadInput("prs_med_png_corrupt_image", file_bytes(0, "images", lambda b: b[:8] + bytes(len(b) - 8),
                                                     "not a readable image .*expected a PNG or JPEG")),
    BadInput("prs_med_png_truncated_image", file_bytes(1, "images", lambda b: b[: len(b) // 2],
                                                       "not a readable image")),
    BadInput("prs_med_png_truncated_mask", file_bytes(2, "masks", lambda b: b[:30], "not a readable image")),
    BadInput("prs_med_missing_image", remove(3, "images", "does not exist")),
    BadInput("prs_med_missing_mask", remove(4, "masks", "mask is missing")),
    BadInput("prs_med_mask_size_mismatch", mask_pixels(5, lambda m: m[:16, :16], "mask is 16x16 .*image is 32x32")),
    BadInput("prs_med_mask_non_binary", mask_pixels(0, anti_aliased, "not a binary mask")),
    BadInput("prs_med_png_3_channels_mask", mask_pixels(1, coloured, r"expected a single-channel \(H, W\) mask")),
    BadInput("prs_med_png_16bit_label_map_mask", mask_pixels(2, label_map_16bit, "not a binary mask: 3 distinct")),
    BadInput("prs_med_empty_mask", mask_pixels(3, np.zeros_like, "empty mask")),
    BadInput("prs_med_unknown_task", csv_cell(4, "task", "lung_xray", r"expected one of \[.*got 'lung_xray'")),
    BadInput("prs_med_unknown_split", csv_cell(5, "split", "training", r"expected one of \['train'")),
    BadInput("prs_med_empty_answer", csv_cell(0, "answer", "  ", "empty; expected the answer text")),
    BadInput("prs_med_empty_question", csv_cell(1, "question", "", "empty; expected the question text")),
    BadInput("prs_med_missing_csv_column", drop_column("answer")),
    BadInput("prs_med_everything_at_once", several(file_bytes(0, "images", lambda b: b[:20], "not a readable"),
                                                   mask_pixels(2, anti_aliased, "not a binary mask"),
                                                   remove(3, "masks", "mask is missing"),
                                                   csv_cell(5, "answer", "", "empty; expected"))),
]


@pytest.fixture(scope="module")
def valid_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_data.write_demo_dataset(tmp_path_factory.mktemp("prs_med") / "data", **SIZES)


def _preprocess_config(root: Path, manifest: Path, run_dir: Path) -> config.PreprocessConfig:
    return config.PreprocessConfig.from_params({"profile": "smoke", "data_root": str(root), "manifest": str(manifest),
                                                "run_dir": str(run_dir), "n_examples": 1})


def test_the_undamaged_dataset_passes_and_a_16bit_binary_mask_is_read_as_binary(valid_dataset: Path,
                                                                                  tmp_path: Path) -> None:
    """The control: every failure below is the damage's doing; a 0/65535 16-bit mask is a valid binary mask."""
    root = tmp_path / "data"
    shutil.copytree(valid_dataset, root)
    mask_pixels(0, mask_16bit_binary, "")(root)
    cfg = _preprocess_config(root, tmp_path / "m.csv", tmp_path / "run" / "prs_med")
    result = pipeline.preprocess(cfg, RunFolder.for_stage(cfg))
    assert len(result.manifest) == 12
    first = result.manifest.set_index("id").loc["lung_Xray:2"]
    assert prs_data.read_mask(root / first["mask"]).sum() > 0


@pytest.mark.parametrize("case", DATASET_CASES, ids=lambda c: c.id)
def test_bad_dataset_is_refused_by_01_preprocess(case: BadInput, valid_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(valid_dataset, root)
    expect = case.damage(root)
    manifest, run_dir = tmp_path / "manifests" / "prs_med.csv", tmp_path / "runs" / "r" / "prs_med"
    cfg = _preprocess_config(root, manifest, run_dir)
    run = RunFolder.for_stage(cfg)
    assert_refused(lambda: pipeline.preprocess(cfg, run), expect, (run_dir, manifest.parent))
    assert not manifest.exists() and not meta_path(manifest).exists()


# ---------------------------------------------------------------------------------------------- manifest cases
MANIFEST_CASES = [
    BadInput("prs_med_manifest_moved_away_from_data_root", manifest_moved_from_its_data),
    BadInput("prs_med_manifest_duplicate_id", manifest_duplicate(2, "id")),
    BadInput("prs_med_manifest_unknown_position", manifest_cell(1, "position", "middle", r"expected one of \[")),
    BadInput("prs_med_manifest_unknown_task", manifest_cell(3, "task", "lungs", r"expected one of \[")),
    BadInput("prs_med_manifest_width_text", manifest_cell(4, "width", "abc", "expected an integer, got 'abc'")),
    BadInput("prs_med_manifest_mask_broken_after_writing", lambda manifest: _break_mask_of(manifest, 5)),
]


def _break_mask_of(manifest: Path, row: int) -> tuple[Expect, ...]:
    """A mask overwritten after 01 wrote the manifest: 02_train opens every file before training."""
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    root = Path(pd.read_json(meta_path(manifest), typ="series")["data_root"])
    (root / frame.loc[row, "mask"]).write_bytes(b"\x89PNG broken")
    return (Expect(None, "mask", "not a readable image", line=row + 2),)


@pytest.fixture(scope="module")
def valid_manifest(valid_dataset: Path) -> pd.DataFrame:
    return prs_data.build_manifest(valid_dataset)[0]


@pytest.mark.parametrize("case", MANIFEST_CASES, ids=lambda c: c.id)
def test_bad_manifest_is_refused_by_02_train_before_training(case: BadInput, valid_dataset: Path,
                                                             valid_manifest: pd.DataFrame, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(valid_dataset, root)
    run_dir = assert_02_train_refuses(case, pipeline, valid_manifest, prs_data.PRSMED_SCHEMA, root, tmp_path)
    assert not (run_dir / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- parameter cases
PARAMETER_CASES = parameter_cases("prs_med", config.TrainConfig, "lr", "learning_rate")


@pytest.mark.parametrize("case", PARAMETER_CASES, ids=lambda c: c.id)
def test_bad_parameters_are_refused_by_from_params(case: BadInput, tmp_path: Path) -> None:
    assert_parameters_refused(case, tmp_path / "run")


CASES = DATASET_CASES + MANIFEST_CASES + PARAMETER_CASES
