"""Bad inputs for cxr_report (CheXpert Plus layout + CheXbert labels, or the seed CSV; JPEG / PNG / DICOM images),
through the real stage verbs: dataset cases through ``cxr_report.preprocess`` (01_preprocess), manifest cases
through ``cxr_report.train`` (02_train, whose first act is reading the manifest), parameter cases through
``from_params``. See catalogue.py for what each case must show. Also: a run of 01_preprocess on a DICOM full of
patient identifiers leaks none of them into any file it writes.
"""
from __future__ import annotations

import json
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from nbsupport.cxr_report import data as cxr_data
from nbsupport.cxr_report import pipeline
from nbsupport.cxr_report.demo_data import write_demo_dataset
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
from test_dicom_privacy import FORBIDDEN, IDENTIFIERS, write_dicom

CSV = cxr_data.CHEXPERT_PLUS_CSV
LABELS_JSON = cxr_data.CHEXBERT_FILES["findings"]
N_PATIENTS = 6  # 6 patients, one or more frontal 64x64 JPEGs each


# ---------------------------------------------------------------------------------------------- damage helpers
def chexpert(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / CSV, dtype=str, keep_default_na=False)


def image_path(root: Path, index: int) -> Path:
    return root / chexpert(root).loc[index, "path_to_image"]


def jpeg_bytes(index: int, change: Callable[[bytes], bytes], says: str) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(root: Path) -> tuple[Expect, ...]:
        path = image_path(root, index)
        path.write_bytes(change(path.read_bytes()))
        return (Expect(CSV, "path_to_image", says, line=index + 2),)
    return damage


def as_png(index: int, change: Callable[[bytes], bytes], says: str) -> Callable[[Path], tuple[Expect, ...]]:
    """The PNG release of row ``index`` (the .jpg named in the CSV is absent, its .png is read), then damaged."""
    def damage(root: Path) -> tuple[Expect, ...]:
        jpg = image_path(root, index)
        ok, encoded = cv2.imencode(".png", cv2.imread(str(jpg), cv2.IMREAD_UNCHANGED))
        assert ok
        jpg.unlink()
        jpg.with_suffix(".png").write_bytes(change(encoded.tobytes()))
        return (Expect(CSV, "path_to_image", says, line=index + 2),)
    return damage


def as_dicom(index: int, cut: float, says: str) -> Callable[[Path], tuple[Expect, ...]]:
    """Row ``index``'s radiograph as a DICOM file (.dcm beside the absent .jpg), cut to ``cut`` of its bytes."""
    def damage(root: Path) -> tuple[Expect, ...]:
        jpg = image_path(root, index)
        pixels = cv2.imread(str(jpg), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 16
        jpg.unlink()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = write_dicom(jpg.with_suffix(".dcm"), pixels=pixels)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * cut)])
        return (Expect(CSV, "path_to_image", says, line=index + 2),)
    return damage


def remove_image(index: int) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(root: Path) -> tuple[Expect, ...]:
        image_path(root, index).unlink()
        return (Expect(CSV, "path_to_image", "does not exist under .*expected the image file", line=index + 2),)
    return damage


def csv_cell(index: int, column: str, value: str, field: str, says: str,
             line: int | None = None) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(root: Path) -> tuple[Expect, ...]:
        table = chexpert(root)
        table.loc[index, column] = value
        table.to_csv(root / CSV, index=False, lineterminator="\n")
        return (Expect(CSV, field, says, line=line or index + 2),)
    return damage


def duplicate_row(index: int) -> Callable[[Path], tuple[Expect, ...]]:
    def damage(root: Path) -> tuple[Expect, ...]:
        table = chexpert(root)
        pd.concat([table, table.iloc[[index]]], ignore_index=True).to_csv(root / CSV, index=False,
                                                                          lineterminator="\n")
        return (Expect(CSV, "path_to_image", f"duplicate image .*first on line {index + 2}", line=len(table) + 2),)
    return damage


def chexbert(index: int, change: Callable[[dict], dict], field: str, says: str) -> Callable[[Path], tuple[Expect, ...]]:
    """Change JSON line ``index + 1`` of findings_fixed.json."""
    def damage(root: Path) -> tuple[Expect, ...]:
        path = root / LABELS_JSON
        lines = path.read_text().splitlines()
        lines[index] = json.dumps(change(json.loads(lines[index])))
        path.write_text("\n".join(lines) + "\n")
        return (Expect("findings_fixed.json", field, says, line=index + 1),)
    return damage


def set_label(name: str, value: object) -> Callable[[dict], dict]:
    return lambda record: {**record, name: value}


def rename_label(old: str, new: str) -> Callable[[dict], dict]:
    return lambda record: {(new if k == old else k): v for k, v in record.items()}


def seed_csv(change: Callable[[pd.DataFrame], pd.DataFrame], field: str, says: str,
             line: int) -> Callable[[Path], tuple[Expect, ...]]:
    """The seed's format (image_path, diagnostic_prompt, target_report) over the same images, then changed."""
    def damage(root: Path) -> tuple[Expect, ...]:
        table = chexpert(root)
        (root / CSV).unlink()
        seed = pd.DataFrame({"image_path": table.path_to_image, "diagnostic_prompt": cxr_data.DEFAULT_PROMPT,
                             "target_report": table.section_findings})
        change(seed).to_csv(root / "final_dataset_latest.csv", index=False, lineterminator="\n")
        return (Expect("final_dataset_latest.csv", field, says, line=line),)
    return damage


def empty_seed_report(seed: pd.DataFrame) -> pd.DataFrame:
    seed.loc[3, "target_report"] = " "
    return seed


def missing_seed_image(seed: pd.DataFrame) -> pd.DataFrame:
    seed.loc[4, "image_path"] = "train/patient00099/study1/view1_frontal.jpg"
    return seed


def cut(fraction: float) -> Callable[[bytes], bytes]:
    return lambda data: data[: int(len(data) * fraction)]


DATASET_CASES = [
    BadInput("cxr_report_jpeg_truncated", jpeg_bytes(0, cut(0.6), "truncated JPEG")),
    BadInput("cxr_report_jpeg_not_an_image", jpeg_bytes(1, lambda b: b"GIF89a not really" * 8, "cannot decode")),
    BadInput("cxr_report_png_corrupt", as_png(2, lambda b: b[:8] + bytes(len(b) - 8), "cannot decode .*\\.png")),
    BadInput("cxr_report_png_truncated", as_png(3, cut(0.5), "cannot decode .*\\.png")),
    BadInput("cxr_report_dicom_truncated", as_dicom(4, 0.9, r"cannot decode .*\.dcm \(DicomError: .*cut off")),
    BadInput("cxr_report_dicom_truncated_header", as_dicom(5, 0.05, r"cannot decode .*\.dcm")),
    BadInput("cxr_report_missing_image", remove_image(6)),
    BadInput("cxr_report_duplicate_image_rows", duplicate_row(2)),
    BadInput("cxr_report_chexbert_label_outside_0_1_-1_null",
             chexbert(1, set_label("Cardiomegaly", 2.0), "Cardiomegaly", r"expected 1.0, 0.0, -1.0 or null, got 2")),
    BadInput("cxr_report_chexbert_label_text", chexbert(2, set_label("Edema", "positive"), "Edema",
                                                        "expected 1.0, 0.0, -1.0 or null, got 'positive'")),
    BadInput("cxr_report_chexbert_label_true", chexbert(3, set_label("Edema", True), "Edema", "got True")),
    BadInput("cxr_report_unknown_label_name", chexbert(4, rename_label("Lung Opacity", "Lung opacity"),
                                                       "Lung opacity", "unknown label name 'Lung opacity'")),
    BadInput("cxr_report_chexbert_not_json", lambda root: _not_json(root, 5)),
    BadInput("cxr_report_missing_csv_column", lambda root: _drop_column(root, "deid_patient_id")),
    BadInput("cxr_report_seed_empty_report", seed_csv(empty_seed_report, "target_report", "empty; expected text", 5)),
    BadInput("cxr_report_seed_missing_image", seed_csv(missing_seed_image, "image_path", "does not exist", 6)),
    # Every problem of the CSV, the label file and the images comes in one error.
    BadInput("cxr_report_undecodable_images_at_once", several(
        jpeg_bytes(0, cut(0.5), "truncated JPEG"), as_png(2, cut(0.3), "cannot decode"),
        as_dicom(4, 0.9, "cannot decode"))),
    BadInput("cxr_report_csv_problems_at_once", several(
        remove_image(1), duplicate_row(3), chexbert(0, set_label("Fracture", 5), "Fracture", "got 5"))),
    BadInput("cxr_report_table_and_image_problems_at_once", several(
        remove_image(1), jpeg_bytes(0, cut(0.5), "truncated JPEG"), as_dicom(4, 0.9, "cannot decode"),
        chexbert(2, set_label("Edema", 3), "Edema", "got 3"))),
]


def _not_json(root: Path, index: int) -> tuple[Expect, ...]:
    path = root / LABELS_JSON
    lines = path.read_text().splitlines()
    lines[index] = lines[index][:40]
    path.write_text("\n".join(lines) + "\n")
    return (Expect("findings_fixed.json", None, "not JSON", line=index + 1),)


def _drop_column(root: Path, column: str) -> tuple[Expect, ...]:
    chexpert(root).drop(columns=[column]).to_csv(root / CSV, index=False, lineterminator="\n")
    return (Expect(CSV, column, "column missing from the header", line=1),)


@pytest.fixture(scope="module")
def valid_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("cxr") / "data", n_patients=N_PATIENTS, image_size=64)


def _preprocess_config(root: Path, manifest: Path, run_dir: Path, n_examples: int = 1) -> pipeline.PreprocessConfig:
    return pipeline.PreprocessConfig.from_params({"profile": "smoke", "data_root": str(root), "manifest": str(manifest),
                                                  "run_dir": str(run_dir), "n_examples": n_examples,
                                                  "image_size": 32})


def test_the_undamaged_dataset_passes(valid_dataset: Path, tmp_path: Path) -> None:
    """The control: every failure below is the damage's doing."""
    root = tmp_path / "data"
    shutil.copytree(valid_dataset, root)
    cfg = _preprocess_config(root, tmp_path / "m.csv", tmp_path / "run" / "cxr_report")
    result = pipeline.preprocess(cfg, RunFolder.for_stage(cfg))
    frontal = pd.read_csv(root / CSV, dtype=str)["frontal_lateral"].str.lower().eq("frontal").sum()
    assert frontal >= N_PATIENTS and len(result.manifest) == frontal
    assert "_source_line" not in result.manifest.columns


@pytest.mark.parametrize("case", DATASET_CASES, ids=lambda c: c.id)
def test_bad_dataset_is_refused_by_01_preprocess(case: BadInput, valid_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(valid_dataset, root)
    expect = case.damage(root)
    manifest, run_dir = tmp_path / "manifests" / "cxr.csv", tmp_path / "runs" / "r" / "cxr_report"
    cfg = _preprocess_config(root, manifest, run_dir)
    run = RunFolder.for_stage(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the cut-off files it is refusing
        assert_refused(lambda: pipeline.preprocess(cfg, run), expect, (run_dir, manifest.parent))
    assert not manifest.exists() and not meta_path(manifest).exists()


def test_01_preprocess_of_a_dicom_full_of_identifiers_leaks_none(valid_dataset: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """Every file the stage writes (manifest, sidecar, resized image, run folder: metrics, figures, tables) and
    what it prints is searched for the identifiers the DICOM carries (PatientName, ID, birth date, accession
    number, institution, referring physician, study date)."""
    root = tmp_path / "data"
    shutil.copytree(valid_dataset, root)
    jpg = image_path(root, 0)
    pixels = cv2.imread(str(jpg), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dicom = write_dicom(jpg.with_suffix(".dcm"), pixels=pixels)
    jpg.unlink()
    assert all(v.encode() in dicom.read_bytes() for v in IDENTIFIERS.values()), "the input must carry them"
    manifest, run_dir = tmp_path / "manifests" / "cxr.csv", tmp_path / "runs" / "r" / "cxr_report"
    cfg = _preprocess_config(root, manifest, run_dir, n_examples=9)  # every image drawn, the DICOM too
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pipeline.preprocess(cfg, RunFolder.for_stage(cfg))
    assert str(dicom.relative_to(root)) in set(result.manifest.source_image.astype(str))
    written = [p for folder in (run_dir, manifest.parent, root / "preprocessed_32") for p in folder.rglob("*")
               if p.is_file()]
    assert any(p.suffix == ".png" for p in written) and manifest in written
    printed = capsys.readouterr().out + "\n".join(str(w.message) for w in caught)
    texts = [p.read_bytes().lower() for p in written] + [printed.lower().encode()]
    leaks = [value for value in FORBIDDEN for text in texts if value.lower().encode() in text]
    assert leaks == []


# ---------------------------------------------------------------------------------------------- manifest cases
MANIFEST_CASES = [
    BadInput("cxr_report_manifest_moved_away_from_data_root", manifest_moved_from_its_data),
    BadInput("cxr_report_manifest_duplicate_id", manifest_duplicate(2, "id")),
    BadInput("cxr_report_manifest_label_outside_0_1_-1_null", manifest_cell(1, "label_edema", "2",
                                                                             r"expected one of \[1.0, 0.0, -1.0\]")),
    BadInput("cxr_report_manifest_label_text", manifest_cell(2, "label_cardiomegaly", "yes", "expected a number")),
    BadInput("cxr_report_manifest_empty_report", manifest_cell(3, "report", "", "empty cell")),
    BadInput("cxr_report_manifest_unknown_split", manifest_cell(4, "split", "valid", r"expected one of \['train'")),
]


@pytest.fixture(scope="module")
def valid_manifest(valid_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    folder = tmp_path_factory.mktemp("cxr_manifest")
    cfg = _preprocess_config(valid_dataset, folder / "m.csv", folder / "run" / "cxr_report")
    return pipeline.preprocess(cfg, RunFolder.for_stage(cfg)).manifest


@pytest.mark.parametrize("case", MANIFEST_CASES, ids=lambda c: c.id)
def test_bad_manifest_is_refused_by_02_train_before_training(case: BadInput, valid_dataset: Path,
                                                             valid_manifest: pd.DataFrame, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(valid_dataset, root)
    run_dir = assert_02_train_refuses(case, pipeline, valid_manifest, cxr_data.CXR_SCHEMA, root, tmp_path)
    assert not (run_dir / "model_spec.json").exists()


# ---------------------------------------------------------------------------------------------- parameter cases
PARAMETER_CASES = parameter_cases("cxr_report", pipeline.TrainConfig, "vision_lr", "learning_rate")


@pytest.mark.parametrize("case", PARAMETER_CASES, ids=lambda c: c.id)
def test_bad_parameters_are_refused_by_from_params(case: BadInput, tmp_path: Path) -> None:
    assert_parameters_refused(case, tmp_path / "run")


CASES = DATASET_CASES + MANIFEST_CASES + PARAMETER_CASES
