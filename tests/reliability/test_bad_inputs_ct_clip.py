"""Bad inputs for ct_clip (CT-RATE layout: NIfTI volumes + reports, metadata and label CSVs), through the real stage
verbs: dataset cases through ``ct_clip.preprocess`` (01_preprocess), manifest cases through ``ct_clip.train``
(02_train, whose first act is reading the manifest), parameter cases through ``from_params``.

Problems of the CSVs (and missing volume files) are refused before any volume is read, every one at once. A volume
that cannot be decoded (corrupt or truncated .nii.gz, NaN/inf voxels) is, by ct_clip's design for CT-RATE's 50 000
volumes, not a reason to stop the others: it is named with its reason in ``preprocessing_status.csv`` and on
stdout, left out of the manifest, so 02_train never reads it (``VOLUME_CASES``).
"""
from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nbsupport.ct_clip import data as ct_data
from nbsupport.ct_clip import demo_data, pipeline
from nbsupport.ct_clip.config import PreprocessConfig, TrainConfig
from nbsupport.manifest import meta_path
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

DEMO = {"n_train_patients": 3, "n_valid_patients": 1, "scale": 0.25}  # train_1..3_a_1, valid_1_a_1; 96x96x30
REPORTS, METADATA, LABELS = (ct_data.REPORT_FILES["train"], ct_data.METADATA_FILES["train"],
                             ct_data.LABEL_FILES["train"])


# ---------------------------------------------------------------------------------------------- damage helpers
def read(root: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(root / name, dtype=str, keep_default_na=False)


def cell(name: str, index: int, column: str, value: str, says: str) -> Callable[[Path], tuple[Expect, ...]]:
    """Set one cell of a CT-RATE CSV (row 0 = line 2)."""
    def damage(root: Path) -> tuple[Expect, ...]:
        table = read(root, name)
        table.loc[index, column] = value
        table.to_csv(root / name, index=False, lineterminator="\n")
        return (Expect(Path(name).name, column, says, line=index + 2),)
    return damage


def spacing(value: str, says: str, index: int = 1) -> Callable[[Path], tuple[Expect, ...]]:
    return cell(METADATA, index, "XYSpacing", value, says)


def rename_column(name: str, old: str, new: str) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(root: Path) -> tuple[Expect, ...]:
        read(root, name).rename(columns={old: new}).to_csv(root / name, index=False, lineterminator="\n")
        return (Expect(Path(name).name, old, "required columns are missing"),)
    return damage


def duplicate_row(name: str, index: int) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(root: Path) -> tuple[Expect, ...]:
        table = read(root, name)
        pd.concat([table, table.iloc[[index]]], ignore_index=True).to_csv(root / name, index=False,
                                                                          lineterminator="\n")
        return (Expect(Path(name).name, "VolumeName", "appears twice", line=len(table) + 2),)
    return damage


def report_for_missing_volume(root: Path) -> tuple[Expect, ...]:
    table = read(root, REPORTS)
    extra = table.iloc[[0]].assign(VolumeName="train_9_a_1.nii.gz")
    pd.concat([table, extra], ignore_index=True).to_csv(root / REPORTS, index=False, lineterminator="\n")
    return (Expect("train_reports.csv", "VolumeName", "train_9_a_1.nii.gz does not exist", line=len(table) + 2),)


def remove_volume(volume: str) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(root: Path) -> tuple[Expect, ...]:
        (root / ct_data.volume_relative_path(volume)).unlink()
        line = 2 + list(read(root, REPORTS).VolumeName.str.removesuffix(".nii.gz")).index(volume)
        return (Expect("train_reports.csv", "VolumeName", f"{volume}.nii.gz does not exist", line=line),)
    return damage


def drop_row(name: str, index: int, says: str) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(root: Path) -> tuple[Expect, ...]:
        read(root, name).drop(index=index).to_csv(root / name, index=False, lineterminator="\n")
        return (Expect(Path(name).name, "VolumeName", says),)
    return damage


def empty_report(index: int) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(root: Path) -> tuple[Expect, ...]:
        table = read(root, REPORTS)
        table.loc[index, "Findings_EN"], table.loc[index, "Impressions_EN"] = "", "Not given."
        table.to_csv(root / REPORTS, index=False, lineterminator="\n")
        return (Expect("train_reports.csv", "Findings_EN", "empty report", line=index + 2),)
    return damage


DATASET_CASES = [
    BadInput("ct_clip_spacing_list_string", spacing("[0.7 0.7]", r"expected a string like '\[0.7, 0.7\]'")),
    BadInput("ct_clip_spacing_empty", spacing("", r"expected a string like .* got ''")),
    BadInput("ct_clip_spacing_text", spacing("abc", "got 'abc'")),
    BadInput("ct_clip_spacing_zero", spacing("[0, 0.7]", "must be finite and positive")),
    BadInput("ct_clip_spacing_negative", spacing("[-0.7, 0.7]", "must be finite and positive")),
    BadInput("ct_clip_spacing_nan", spacing("[nan, 0.7]", r"expected a string like .* got '\[nan, 0.7\]'")),
    BadInput("ct_clip_spacing_infinite", spacing("[1e999, 0.7]", "must be finite and positive")),
    BadInput("ct_clip_z_spacing_zero", cell(METADATA, 0, "ZSpacing", "0", "expected a finite positive number")),
    BadInput("ct_clip_z_spacing_negative", cell(METADATA, 2, "ZSpacing", "-1.5", "got '-1.5'")),
    BadInput("ct_clip_z_spacing_infinite", cell(METADATA, 2, "ZSpacing", "inf", "finite positive number")),
    BadInput("ct_clip_rescale_intercept_text", cell(METADATA, 0, "RescaleIntercept", "-1024 HU", "a finite number")),
    BadInput("ct_clip_label_outside_0_1", cell(LABELS, 0, "Cardiomegaly", "2", "expected 0 or 1, got '2'")),
    BadInput("ct_clip_label_minus_one", cell(LABELS, 1, "Emphysema", "-1", "expected 0 or 1, got '-1'")),
    BadInput("ct_clip_label_empty", cell(LABELS, 2, "Lung nodule", "", "expected 0 or 1, got ''")),
    BadInput("ct_clip_unknown_label_name", rename_column(LABELS, "Lung nodule", "Lung nodules")),
    BadInput("ct_clip_duplicate_volume_name", duplicate_row(REPORTS, 1)),
    BadInput("ct_clip_duplicate_label_row", duplicate_row(LABELS, 0)),
    BadInput("ct_clip_report_row_for_missing_volume", report_for_missing_volume),
    BadInput("ct_clip_missing_volume", remove_volume("train_2_a_1")),
    BadInput("ct_clip_malformed_volume_name", cell(REPORTS, 0, "VolumeName", "train_1_1.nii.gz",
                                                   "is not split_patient_scan_recon")),
    BadInput("ct_clip_missing_metadata_row", drop_row(METADATA, 1, "no metadata row for train_2_a_1")),
    BadInput("ct_clip_missing_labels_row", drop_row(LABELS, 2, "no labels row for train_3_a_1")),
    BadInput("ct_clip_empty_report", empty_report(1)),
    BadInput("ct_clip_everything_at_once", several(spacing("[0.7 0.7]", "expected a string", index=0),
                                                   cell(LABELS, 1, "Atelectasis", "yes", "expected 0 or 1"),
                                                   empty_report(2), report_for_missing_volume)),
]


@pytest.fixture(scope="module")
def valid_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_data.write_demo_dataset(tmp_path_factory.mktemp("ct_clip") / "data", **DEMO)


def _preprocess_config(root: Path, manifest: Path, run_dir: Path) -> PreprocessConfig:
    return PreprocessConfig.from_params({"profile": "smoke", "data_root": str(root), "manifest": str(manifest),
                                                  "run_dir": str(run_dir), "n_examples": 1, "real_ct": "none",
                                                  "shape": [16, 16, 8], "spacing": [20.0, 20.0, 40.0]})


@pytest.mark.parametrize("case", DATASET_CASES, ids=lambda c: c.id)
def test_bad_dataset_is_refused_by_01_preprocess(case: BadInput, valid_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(valid_dataset, root)
    expect = case.damage(root)
    manifest, run_dir = tmp_path / "manifests" / "ct_rate.csv", tmp_path / "runs" / "r" / "ct_clip"
    cfg = _preprocess_config(root, manifest, run_dir)
    run = RunFolder.for_stage(cfg)
    assert_refused(lambda: pipeline.preprocess(cfg, run), expect, (run_dir, manifest.parent, root))
    assert not manifest.exists() and not meta_path(manifest).exists()


# ---------------------------------------------------------------------------------------------- undecodable volumes
def volume_bytes(volume: str, change: Callable[[bytes], bytes]) -> Callable[[Path], str]:
    def damage(root: Path) -> str:
        path = root / ct_data.volume_relative_path(volume)
        path.write_bytes(change(path.read_bytes()))
        return volume
    return damage


def nan_voxels(volume: str) -> Callable[[Path], str]:
    def damage(root: Path) -> str:
        path = root / ct_data.volume_relative_path(volume)
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj.get_unscaled()).astype(np.float32)
        data[10:12, 10:12, 3] = np.nan
        nib.save(nib.Nifti1Image(data, image.affine), str(path))
        return volume
    return damage


def corrupt_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0x5A for b in data[middle:middle + 64]) + data[middle + 64:]


VOLUME_CASES = [
    BadInput("ct_clip_volume_nifti_corrupt", volume_bytes("train_1_a_1", corrupt_middle)),
    BadInput("ct_clip_volume_nifti_truncated", volume_bytes("train_2_a_1", lambda b: b[: len(b) // 2])),
    BadInput("ct_clip_volume_not_gzip", volume_bytes("train_3_a_1", lambda b: b"\x00" * 400)),
    BadInput("ct_clip_volume_nan_inf_voxels", nan_voxels("valid_1_a_1")),
]
VOLUME_REASONS = {"ct_clip_volume_nan_inf_voxels": "4 NaN/inf voxels; expected finite values",
                  "ct_clip_volume_nifti_corrupt": "CRC check failed", "ct_clip_volume_nifti_truncated": "EOFError",
                  "ct_clip_volume_not_gzip": "Not a gzipped file"}


@pytest.mark.parametrize("case", VOLUME_CASES, ids=lambda c: c.id)
def test_undecodable_volume_is_named_and_left_out_of_the_manifest(case: BadInput, valid_dataset: Path,
                                                                  tmp_path: Path, capsys: pytest.CaptureFixture):
    root = tmp_path / "data"
    shutil.copytree(valid_dataset, root)
    volume = case.damage(root)
    manifest, run_dir = tmp_path / "manifests" / "ct_rate.csv", tmp_path / "runs" / "r" / "ct_clip"
    cfg = _preprocess_config(root, manifest, run_dir)
    result = pipeline.preprocess(cfg, RunFolder.for_stage(cfg))

    failed = result.status[result.status.status == "failed"]
    assert list(failed.volume) == [volume]
    assert VOLUME_REASONS[case.id] in failed.reason.iloc[0]
    assert f"FAILED {volume}: " in capsys.readouterr().out
    assert volume in (run_dir / "preprocessing_status.csv").read_text()
    written = pd.read_csv(manifest)
    assert volume not in set(written.volume) and len(written) == 3
    assert not (root / "preprocessed" / f"{volume}.npz").exists()  # nothing half-made is left for 02_train


# ---------------------------------------------------------------------------------------------- manifest cases
MANIFEST_CASES = [
    BadInput("ct_clip_manifest_moved_away_from_data_root", manifest_moved_from_its_data),
    BadInput("ct_clip_manifest_duplicate_volume", manifest_duplicate(1, "volume")),
    BadInput("ct_clip_manifest_spacing_list_string", manifest_cell(0, "spacing_x", "[0.7 0.7]", "expected a number")),
    BadInput("ct_clip_manifest_spacing_empty", manifest_cell(1, "spacing_y", "", "expected a number")),
    BadInput("ct_clip_manifest_spacing_zero", manifest_cell(2, "spacing_z", "0", "expected a voxel size > 0 mm")),
    BadInput("ct_clip_manifest_spacing_negative", manifest_cell(0, "spacing_z", "-2", "voxel size > 0 mm, got -2")),
    BadInput("ct_clip_manifest_label_outside_0_1", manifest_cell(1, "Cardiomegaly", "-1", "expected 0 or 1")),
    BadInput("ct_clip_manifest_empty_report", manifest_cell(2, "report", "", "empty cell")),
]


@pytest.fixture(scope="module")
def valid_manifest(valid_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A dataset copy preprocessed once (the npz files) and its manifest; cases copy both."""
    folder = tmp_path_factory.mktemp("ct_manifest")
    root = folder / "data"
    shutil.copytree(valid_dataset, root)
    cfg = _preprocess_config(root, folder / "manifests" / "ct_rate.csv", folder / "run" / "ct_clip")
    pipeline.preprocess(cfg, RunFolder.for_stage(cfg))
    return root, folder / "manifests" / "ct_rate.csv"


@pytest.mark.parametrize("case", MANIFEST_CASES, ids=lambda c: c.id)
def test_bad_manifest_is_refused_by_02_train_before_training(case: BadInput, valid_manifest: tuple[Path, Path],
                                                             tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(valid_manifest[0], root)
    frame = pd.read_csv(valid_manifest[1], dtype=str, keep_default_na=False)
    run_dir = assert_02_train_refuses(case, pipeline, frame, ct_data.CT_CLIP_SCHEMA, root, tmp_path)
    assert not (run_dir / "model_spec.json").exists()


# ---------------------------------------------------------------------------------------------- parameter cases
PARAMETER_CASES = (parameter_cases("ct_clip", TrainConfig, "lr", "learning_rate")
                   + parameter_cases("ct_clip_01", PreprocessConfig, "hu_min", "hu_minimum"))


@pytest.mark.parametrize("case", PARAMETER_CASES, ids=lambda c: c.id)
def test_bad_parameters_are_refused_by_from_params(case: BadInput, tmp_path: Path) -> None:
    assert_parameters_refused(case, tmp_path / "run")


CASES = DATASET_CASES + VOLUME_CASES + MANIFEST_CASES + PARAMETER_CASES
