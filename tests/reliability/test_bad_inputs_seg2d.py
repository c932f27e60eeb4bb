"""Bad inputs for seg2d (UW-Madison GI tract, Kaggle layout), through the real stage verbs.

Dataset cases go through ``seg2d.preprocess`` (01_preprocess); manifest cases through ``seg2d.train``
(02_train), whose first act is to read and validate the manifest; parameter cases through the configs'
``from_params`` (cell 2 of every notebook). See catalogue.py for what each case must show.
"""
from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from nbsupport.config import ConfigError
from nbsupport.demo import DEMO_MARKER
from nbsupport.manifest import ManifestError, meta_path, read_manifest, write_manifest
from nbsupport.runs import RunFolder
from nbsupport.seg2d import data as seg_data
from nbsupport.seg2d import pipeline
from nbsupport.seg2d.config import AttentionConfig, PreprocessConfig, TrainConfig
from nbsupport.seg2d.demo_data import write_demo_dataset

sys.path.insert(0, str(Path(__file__).parent))
from catalogue import BadInput, Expect, assert_reports, snapshot

SIZES = {"n_cases": 3, "days_per_case": 1, "slices_per_day": 4}  # 12 slices, 36 train.csv rows


# ---------------------------------------------------------------------------------------------- damage helpers
def slice_files(root: Path) -> list[Path]:
    return sorted((root / "train").glob("*/*/scans/*.png"))


def train_csv(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False, na_filter=False)


def save_csv(root: Path, df: pd.DataFrame) -> None:
    df.to_csv(root / "train.csv", index=False, lineterminator="\n")


def image_of(root: Path, slice_id: str) -> Path:
    sid = seg_data.parse_slice_id(slice_id)
    return next((root / "train" / f"case{sid.case}" / sid.case_day / "scans").glob(f"slice_{sid.slice:04d}_*.png"))


def rle(index: int, value: Callable[[int], str] | str, says: str) -> Callable[[Path], tuple[Expect, ...]]:
    """Set train.csv row ``index``'s segmentation (``value`` may depend on the slice's pixel count)."""
    def damage(root: Path) -> tuple[Expect, ...]:
        df = train_csv(root)
        info = seg_data.parse_slice_filename(image_of(root, df.loc[index, "id"]))
        df.loc[index, "segmentation"] = value(info.width * info.height) if callable(value) else value
        save_csv(root, df)
        return (Expect("train.csv", "segmentation", says, line=index + 2),)
    return damage


def csv_cell(index: int, column: str, value: str, says: str) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(root: Path) -> tuple[Expect, ...]:
        df = train_csv(root)
        df.loc[index, column] = value
        save_csv(root, df)
        return (Expect("train.csv", column, says, line=index + 2),)
    return damage


def duplicate_row(index: int) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(root: Path) -> tuple[Expect, ...]:
        df = train_csv(root)
        save_csv(root, pd.concat([df, df.iloc[[index]]], ignore_index=True))
        return (Expect("train.csv", "class", f"duplicate row .*first on line {index + 2}", line=len(df) + 2),)
    return damage


def image_bytes(k: int, change: Callable[[bytes], bytes], says: str) -> Callable[[Path], tuple[Expect, ...]]:
    """Replace the bytes of the k-th slice file."""
    def damage(root: Path) -> tuple[Expect, ...]:
        path = slice_files(root)[k]
        path.write_bytes(change(path.read_bytes()))
        return (Expect(path.name, "image", says),)
    return damage


def image_pixels(k: int, change: Callable[[np.ndarray], np.ndarray], says: str) -> Callable[[Path], tuple[Expect, ...]]:
    """Re-encode the k-th slice after ``change`` (a valid PNG of another kind)."""
    def damage(root: Path) -> tuple[Expect, ...]:
        path = slice_files(root)[k]
        image = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
        ok, encoded = cv2.imencode(".png", change(image))
        assert ok
        encoded.tofile(path)
        return (Expect(path.name, "image", says),)
    return damage


def flip_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


def rename_slice(k: int, new_tail: str, says: str) -> Callable[[Path], tuple[Expect, ...]]:
    """Rename the k-th slice to ``slice_SSSS_<new_tail>.png`` (size and spacing fields)."""
    def damage(root: Path) -> tuple[Expect, ...]:
        path = slice_files(root)[k]
        target = path.with_name("_".join(path.name.split("_")[:2]) + f"_{new_tail}.png")
        path.rename(target)
        return (Expect(target.name, "image", says),)
    return damage


def remove_image(k: int) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(root: Path) -> tuple[Expect, ...]:
        path = slice_files(root)[k]
        path.unlink()
        sid = f"{path.parent.parent.name}_{'_'.join(path.name.split('_')[:2])}"
        first = int(np.flatnonzero(train_csv(root)["id"].to_numpy() == sid)[0]) + 2
        return (Expect("train.csv", "id", f"slice {sid} has rows but no image file", line=first),)
    return damage


def remove_rows_of(k: int) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(root: Path) -> tuple[Expect, ...]:
        path = slice_files(root)[k]
        sid = f"{path.parent.parent.name}_{'_'.join(path.name.split('_')[:2])}"
        df = train_csv(root)
        save_csv(root, df[df["id"] != sid])
        return (Expect(path.name, "image", f"no rows in train.csv for slice {sid}"),)
    return damage


def misname_case_folder(root: Path) -> tuple[Expect, ...]:
    day = slice_files(root)[0].parent.parent
    wrong = day.with_name(day.name.replace("case", "patient"))
    day.rename(wrong)
    return (Expect(wrong.name, "image", r"do not match 'case\{N\}/case\{N\}_day\{D\}'"),)


def rename_header(root: Path) -> tuple[Expect, ...]:
    text = (root / "train.csv").read_text().split("\n", 1)
    (root / "train.csv").write_text("id,organ,segmentation\n" + text[1])
    return (Expect("train.csv", "class", "missing column; expected header 'id,class,segmentation'", line=1),)


def interrupt_demo(root: Path) -> tuple[Expect, ...]:
    marker = root / DEMO_MARKER
    marker.write_text(marker.read_text().replace('"complete": true', '"complete": false'))
    return (Expect(DEMO_MARKER, None, "not written to the end"),)


def several(*damages: Callable[[Path], tuple[Expect, ...]]) -> Callable[[Path], tuple[Expect, ...]]:
    """Several problems in one dataset: all must be in the one error."""
    def damage(root: Path) -> tuple[Expect, ...]:
        return tuple(e for d in damages for e in d(root))
    return damage


def as_8bit(image: np.ndarray) -> np.ndarray:
    return (image / 257).astype(np.uint8)  # the usual "export as 8-bit" of a viewer


DATASET_CASES = [
    BadInput("png_corrupt_bytes", image_bytes(1, lambda b: b[:8] + bytes(len(b) - 8), "cannot decode .*corrupt")),
    BadInput("png_truncated", image_bytes(2, lambda b: b[: len(b) // 2], "cannot decode .*truncated")),
    BadInput("png_truncated_end_chunk", image_bytes(2, lambda b: b[:-12], "cannot decode")),
    BadInput("png_bit_flip", image_bytes(3, flip_byte, "cannot decode")),
    BadInput("png_empty_file", image_bytes(0, lambda b: b"", "empty file; expected a 16-bit grayscale PNG")),
    BadInput("png_not_a_png", image_bytes(0, lambda b: b"\x00\x00\x01\x00DICM" * 40, "cannot decode")),
    BadInput("png_8bit_not_16bit", image_pixels(4, as_8bit, "is 8-bit .*expected 16-bit")),
    BadInput("png_3_channels", image_pixels(5, lambda im: np.dstack([im] * 3), "has 3 channels, expected 1")),
    BadInput("png_4_channels", image_pixels(5, lambda im: np.dstack([im] * 4), "has 4 channels, expected 1")),
    BadInput("png_size_disagrees_with_name", image_pixels(6, lambda im: im[:-10], "filename says")),
    BadInput("missing_image", remove_image(7)),
    BadInput("image_without_rows", remove_rows_of(8)),
    BadInput("rle_odd_length", rle(4, "10 5 30", r"odd number of values \(3\)")),
    BadInput("rle_overlapping_runs", rle(5, "10 20 25 3", "begins before run 1 ends")),
    BadInput("rle_unsorted_runs", rle(5, "500 3 10 2", "begins before run 1 ends")),
    BadInput("rle_run_past_last_pixel", rle(7, lambda n: f"{n - 2} 5", r"runs to pixel \d+ but the image is")),
    BadInput("rle_start_beyond_image", rle(7, lambda n: f"{n + 1} 1", r"runs to pixel \d+ but the image is")),
    BadInput("rle_zero_start", rle(8, "0 4", "expected 1-indexed starts >= 1")),
    BadInput("rle_zero_length", rle(8, "5 0", "expected lengths >= 1")),
    BadInput("rle_negative_length", rle(8, "5 -3", "expected lengths >= 1")),
    BadInput("rle_not_numbers", rle(9, "12 abc", "non-integer value 'abc'")),
    BadInput("rle_float_values", rle(9, "12.0 4", "non-integer value '12.0'")),
    BadInput("duplicate_rows", duplicate_row(3)),
    BadInput("unknown_class", csv_cell(10, "class", "colon", r"unknown class 'colon'; expected one of")),
    BadInput("class_wrong_case", csv_cell(11, "class", "Stomach", r"unknown class 'Stomach'")),
    BadInput("malformed_slice_id", csv_cell(12, "id", "case1_slice_0001", r"does not match 'case\{N\}_day\{D\}")),
    BadInput("missing_csv_column", rename_header),
    BadInput("spacing_zero", rename_slice(0, "266_266_0.00_1.50", "expected a positive size and pixel spacing")),
    BadInput("spacing_negative", rename_slice(1, "266_266_1.50_-1.50", "expected a positive size and pixel spacing")),
    BadInput("spacing_not_a_number", rename_slice(2, "266_266_abc_1.50", "pixel spacings numbers")),
    BadInput("spacing_nan", rename_slice(3, "266_266_nan_1.50", "expected a positive size and pixel spacing")),
    BadInput("size_zero", rename_slice(0, "0_266_1.50_1.50", "expected a positive size")),
    BadInput("misnamed_case_folder", misname_case_folder),
    BadInput("interrupted_demo_dataset", interrupt_demo),
    BadInput("everything_at_once", several(image_bytes(1, lambda b: b[: len(b) // 3], "cannot decode"),
                                           image_pixels(5, as_8bit, "is 8-bit"),
                                           rle(4, "10 5 30", "odd number of values"),
                                           csv_cell(10, "class", "colon", "unknown class 'colon'"),
                                           remove_image(7))),
]


@pytest.fixture(scope="module")
def valid_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("seg2d") / "data", **SIZES)


def _preprocess(data_root: Path, manifest: Path, run_dir: Path) -> None:
    cfg = PreprocessConfig.from_params({"profile": "smoke", "data_root": str(data_root),
                                                 "manifest": str(manifest), "run_dir": str(run_dir), "n_examples": 2})
    pipeline.preprocess(cfg, RunFolder.for_stage(cfg))


def test_the_undamaged_dataset_passes(valid_dataset: Path, tmp_path: Path) -> None:
    """The control: every failure below is the damage's doing."""
    _preprocess(valid_dataset, tmp_path / "m" / "manifest.csv", tmp_path / "run" / "seg2d")
    assert len(pd.read_csv(tmp_path / "m" / "manifest.csv")) == 12


@pytest.mark.parametrize("case", DATASET_CASES, ids=lambda c: c.id)
def test_bad_dataset_is_refused_by_01_preprocess(case: BadInput, valid_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(valid_dataset, root)
    expect = case.damage(root)
    manifest, run_dir = tmp_path / "manifests" / "uwmgi.csv", tmp_path / "runs" / "r" / "seg2d"
    cfg = PreprocessConfig.from_params({"profile": "smoke", "data_root": str(root),
                                                 "manifest": str(manifest), "run_dir": str(run_dir)})
    run = RunFolder.for_stage(cfg)  # as cell 2 of the notebook does, before the verb
    before = snapshot(run_dir, manifest.parent)

    with pytest.raises(ManifestError) as raised:
        pipeline.preprocess(cfg, run)

    assert_reports(raised.value, expect)
    if len(expect) > 1:
        assert len(raised.value.problems) >= len(expect)
    assert snapshot(run_dir, manifest.parent) == before, "something was written although the input was refused"
    assert not manifest.exists() and not meta_path(manifest).exists()


# ---------------------------------------------------------------------------------------------- manifest cases
def manifest_cell(row: int, column: str, value: str, says: str) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(manifest: Path) -> tuple[Expect, ...]:
        df = pd.read_csv(manifest, dtype=str, keep_default_na=False, na_filter=False)
        df.loc[row, column] = value
        df.to_csv(manifest, index=False, lineterminator="\n")
        return (Expect(None, column, says, line=row + 2),)
    return damage


def manifest_duplicate(row: int) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(manifest: Path) -> tuple[Expect, ...]:
        df = pd.read_csv(manifest, dtype=str, keep_default_na=False, na_filter=False)
        pd.concat([df, df.iloc[[row]]], ignore_index=True).to_csv(manifest, index=False, lineterminator="\n")
        return (Expect(None, "id", f"is not unique \\(first seen on line {row + 2}\\)", line=len(df) + 2),)
    return damage


def manifest_drop_column(column: str) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(manifest: Path) -> tuple[Expect, ...]:
        pd.read_csv(manifest, dtype=str, keep_default_na=False).drop(columns=[column]).to_csv(manifest, index=False)
        return (Expect(None, column, "required column is missing"),)
    return damage


def manifest_moved_from_its_data(manifest: Path) -> tuple[Expect, ...]:
    """The data folder was moved (or the manifest copied to another machine): the recorded root is gone."""
    data_root = Path(pd.read_json(meta_path(manifest), typ="series")["data_root"])
    data_root.rename(data_root.with_name("moved_elsewhere"))
    return (Expect(None, None, f"data root {re.escape(str(data_root))} does not exist"),
            Expect(None, None, f"Data root tried: {re.escape(str(data_root))}"),
            Expect(None, None, "pass data_root=<new folder>"))


def manifest_without_sidecar(manifest: Path) -> tuple[Expect, ...]:
    meta_path(manifest).unlink()
    return (Expect(meta_path(manifest).name, None, "no sidecar .*names the data root"),
            Expect(None, None, "Pass data_root="))


def manifest_image_replaced(manifest: Path) -> tuple[Expect, ...]:
    """A slice file broken after the manifest was written: 02_train re-reads every file before training."""
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    data_root = Path(pd.read_json(meta_path(manifest), typ="series")["data_root"])
    (data_root / df.loc[2, "image"]).write_bytes(b"")
    return (Expect(Path(df.loc[2, "image"]).name, "image", "empty file", line=4),)


MANIFEST_CASES = [
    BadInput("manifest_moved_away_from_data_root", manifest_moved_from_its_data),
    BadInput("manifest_without_sidecar", manifest_without_sidecar),
    BadInput("manifest_image_broken_after_writing", manifest_image_replaced),
    BadInput("manifest_spacing_list_string", manifest_cell(1, "pixel_spacing_w", "[0.7 0.7]", "expected a number")),
    BadInput("manifest_spacing_empty", manifest_cell(1, "pixel_spacing_h", "", "empty cell; expected a number")),
    BadInput("manifest_spacing_text", manifest_cell(2, "pixel_spacing_w", "abc", "expected a number, got 'abc'")),
    BadInput("manifest_spacing_zero", manifest_cell(3, "pixel_spacing_w", "0", r"expected a pixel spacing > 0 mm")),
    BadInput("manifest_spacing_negative", manifest_cell(3, "pixel_spacing_h", "-1.5", r"pixel spacing > 0 mm")),
    BadInput("manifest_spacing_infinite", manifest_cell(3, "pixel_spacing_h", "inf", "expected a finite number")),
    BadInput("manifest_width_not_integer", manifest_cell(4, "width", "266.5", "expected an integer")),
    BadInput("manifest_unknown_split", manifest_cell(5, "split", "training", r"expected one of \['train'")),
    BadInput("manifest_has_labels_not_bool", manifest_cell(5, "has_labels", "maybe", "expected True or False")),
    BadInput("manifest_rle_odd", manifest_cell(6, "rle_stomach", "3 4 5", "odd number of values")),
    BadInput("manifest_path_escapes_root", manifest_cell(7, "image", "../../etc/passwd.png", r"no '\.\.'")),
    BadInput("manifest_absolute_path", manifest_cell(7, "image", "/tmp/slice_0001_266_266_1.50_1.50.png",
                                                     "absolute path")),
    BadInput("manifest_duplicate_id", manifest_duplicate(3)),
    BadInput("manifest_missing_column", manifest_drop_column("split")),
    BadInput("manifest_many_at_once", several(manifest_cell(1, "pixel_spacing_w", "abc", "expected a number"),
                                              manifest_cell(2, "split", "training", "expected one of"),
                                              manifest_cell(3, "width", "x", "expected an integer"))),
]


@pytest.fixture(scope="module")
def valid_manifest(valid_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("manifest")
    _preprocess(valid_dataset, folder / "uwmgi.csv", folder / "run" / "seg2d")
    return folder / "uwmgi.csv"


@pytest.mark.parametrize("case", MANIFEST_CASES, ids=lambda c: c.id)
def test_bad_manifest_is_refused_by_02_train_before_training(case: BadInput, valid_dataset: Path,
                                                             valid_manifest: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(valid_dataset, root)
    manifest = tmp_path / "manifests" / "uwmgi.csv"
    manifest.parent.mkdir()
    write_manifest(read_manifest(valid_manifest, seg_data.SEG2D_SCHEMA)[0], manifest,
                   seg_data.SEG2D_SCHEMA, root)  # a valid manifest for this copy of the data
    expect = case.damage(manifest)
    run_dir = tmp_path / "runs" / "r" / "seg2d"
    cfg = TrainConfig.from_params({"profile": "smoke", "manifest": str(manifest), "run_dir": str(run_dir)})
    run = RunFolder.for_stage(cfg)
    before = snapshot(run_dir, manifest.parent)

    with pytest.raises((ManifestError, FileNotFoundError)) as raised:
        pipeline.train(cfg, run)

    assert_reports(raised.value, expect)
    assert snapshot(run_dir, manifest.parent) == before, "something was written although the manifest was refused"
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "model_spec.json").exists()


def test_a_moved_data_root_is_accepted_once_named(valid_dataset: Path, valid_manifest: Path, tmp_path: Path) -> None:
    """The control of the moved-manifest case: the message's advice works."""
    moved = tmp_path / "moved"
    shutil.copytree(valid_dataset, moved)
    cfg = TrainConfig.from_params({"profile": "smoke", "manifest": str(valid_manifest),
                                            "data_root": str(moved)})
    frame, root = cfg.load_manifest()
    assert root == moved.resolve() and len(frame) == 12


# ---------------------------------------------------------------------------------------------- parameter cases
def params(stage: type, values: dict, *expect: Expect) -> Callable[[], tuple[type, dict, tuple[Expect, ...]]]:
    return lambda: (stage, values, expect)


PARAMETER_CASES = [
    BadInput("param_misspelt_name", params(TrainConfig, {"learning_rate": 1e-3},
                                           Expect(None, "learning_rate", "unknown parameter 'learning_rate'"))),
    BadInput("param_close_misspelling", params(PreprocessConfig, {"val_fractoin": 0.1},
                                               Expect(None, None, "did you mean 'val_fraction'"))),
    BadInput("param_string_for_float", params(TrainConfig, {"lr": "1e-3"},
                                              Expect(None, "lr", "expected a number, got str '1e-3'"))),
    BadInput("param_float_for_int", params(TrainConfig, {"image_size": 128.0},
                                           Expect(None, "image_size", "expected an integer, got float"))),
    BadInput("param_bool_for_int", params(TrainConfig, {"epochs": True},
                                          Expect(None, "epochs", "expected an integer, got bool"))),
    BadInput("param_unknown_choice", params(TrainConfig, {"arch": "unet"},
                                            Expect(None, "arch", r"expected one of \['segformer'"))),
    BadInput("param_unknown_profile", params(TrainConfig, {"profile": "fast"},
                                             Expect(None, "profile", r"must be one of \['smoke'"))),
    BadInput("param_wrong_tuple_length", params(AttentionConfig, {"query_point": [0.5]},
                                                Expect(None, "query_point", "expected 2 values, got 1"))),
    BadInput("param_fractions_sum_to_one", params(PreprocessConfig, {"val_fraction": 0.5,
                                                                               "test_fraction": 0.5},
                                                  Expect(None, None, "sum to less than 1"))),
    BadInput("param_many_at_once", params(TrainConfig, {"lr": "fast", "epochs": "3", "batchsize": 4},
                                          Expect(None, "lr", "expected a number"),
                                          Expect(None, "epochs", "expected an integer"),
                                          Expect(None, "batchsize", "unknown parameter"))),
]


@pytest.mark.parametrize("case", PARAMETER_CASES, ids=lambda c: c.id)
def test_bad_parameters_are_refused_by_from_params(case: BadInput, tmp_path: Path) -> None:
    stage, values, expect = case.damage()
    with pytest.raises(ConfigError) as raised:
        stage.from_params({"run_dir": str(tmp_path / "run"), **values})
    assert_reports(raised.value, expect)
    assert str(raised.value).startswith(f"seg2d/{stage.STAGE}:")
    assert not (tmp_path / "run").exists()


CASES = DATASET_CASES + MANIFEST_CASES + PARAMETER_CASES
