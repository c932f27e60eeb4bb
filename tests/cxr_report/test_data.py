"""CheXpert Plus / seed CSV / DICOM adapters and the manifest (on the synthetic demo dataset)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nbsupport.cxr_report import data as cxr_data
from nbsupport.cxr_report.demo_data import write_demo_dataset
from nbsupport.cxr_report.labeler import LABELS, label_report
from nbsupport.manifest import ManifestError, read_manifest, write_manifest


def test_manifest_splits_by_patient_and_keeps_valid_for_test(demo_root: Path, tmp_path: Path) -> None:
    manifest = cxr_data.build_manifest(demo_root, val_fraction=0.2, seed=0)
    shipped = pd.read_csv(demo_root / cxr_data.CHEXPERT_PLUS_CSV, dtype=str)
    valid_patients = set(shipped.loc[shipped.split == "valid", "deid_patient_id"])
    assert set(manifest.loc[manifest.split == "test", "patient"]) == valid_patients
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(manifest.loc[manifest.split == a, "patient"]) & set(manifest.loc[manifest.split == b, "patient"])
    resized = cxr_data.write_resized_images(manifest, demo_root, 64, "preprocessed_64")
    path = write_manifest(resized, tmp_path / "m.csv", cxr_data.CXR_SCHEMA, demo_root)
    back, root = read_manifest(path, cxr_data.CXR_SCHEMA)
    assert root == demo_root.resolve() and len(back) == len(manifest)
    assert back["image"].str.startswith("preprocessed_64/").all()
    rgb = cxr_data.ReportImageDataset(back, root, 64)[0]["image"]
    assert rgb.shape == (3, 64, 64) and abs(float(rgb.mean())) < 3


def test_png_release_is_found_for_a_jpg_path(tmp_path: Path) -> None:
    root = write_demo_dataset(tmp_path / "d", n_patients=3, image_size=64, seed=0)
    df = pd.read_csv(root / cxr_data.CHEXPERT_PLUS_CSV, dtype=str)
    first = root / df["path_to_image"][0]
    import cv2

    cv2.imwrite(str(first.with_suffix(".png")), cxr_data.read_xray(first))
    first.unlink()
    manifest = cxr_data.build_manifest(root)
    assert str(manifest["source_image"][0]).endswith(".png")


@pytest.mark.parametrize("tree", ["PNG", "PNG/PNG"])
def test_chexpert_plus_png_release_as_it_unpacks(tmp_path: Path, tree: str) -> None:
    """CheXpert Plus' PNG release: images under PNG/ (some unpackings: PNG/PNG/) as .png, while path_to_image in the
    CSV still says train/patientN/studyM/view1_frontal.jpg."""
    import cv2

    root = write_demo_dataset(tmp_path / "d", n_patients=4, image_size=64, seed=0)
    for jpg in sorted(root.glob("*/patient*/study*/*.jpg")):
        target = root / tree / jpg.relative_to(root).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), cxr_data.read_xray(jpg))
        jpg.unlink()
    shipped = pd.read_csv(root / cxr_data.CHEXPERT_PLUS_CSV, dtype=str)
    assert shipped["path_to_image"].str.endswith(".jpg").all()
    manifest = cxr_data.build_manifest(root)
    assert len(manifest) == len(shipped)
    for row in manifest.itertuples():
        assert Path(row.source_image) == root / tree / f"{row.id}.png"
    (root / tree / f"{manifest['id'][0]}.png").unlink()
    with pytest.raises(ManifestError, match=r"does not exist .*tried .jpg, .png, .dcm directly and under PNG/, "
                                            r"PNG/PNG/"):
        cxr_data.build_manifest(root)


def test_bad_chexbert_lines_are_all_reported(tmp_path: Path) -> None:
    path = tmp_path / "findings_fixed.json"
    path.write_text('{"path_to_image": "a.jpg", "Cardiomegaly": 2}\nnot json\n{"Edema": 1}\n')
    with pytest.raises(ManifestError) as err:
        cxr_data.read_chexbert_labels(path)
    text = str(err.value)
    assert "line 1" in text and "'Cardiomegaly'" in text and "line 2" in text and "line 3" in text
    assert "3 problems" in text


def test_missing_chexpert_columns_are_named(tmp_path: Path) -> None:
    pd.DataFrame({"path_to_image": ["a.jpg"]}).to_csv(tmp_path / cxr_data.CHEXPERT_PLUS_CSV, index=False)
    with pytest.raises(ManifestError, match="section_findings"):
        cxr_data.build_manifest(tmp_path)


def test_seed_csv_format(demo_root: Path, tmp_path: Path) -> None:
    shipped = pd.read_csv(demo_root / cxr_data.CHEXPERT_PLUS_CSV, dtype=str, keep_default_na=False).head(6)
    seed = pd.DataFrame({"image_path": [str(demo_root / p) for p in shipped["path_to_image"]],
                         "diagnostic_prompt": "Describe the findings in this chest X-ray.",
                         "target_report": shipped["section_findings"]})
    seed.to_csv(tmp_path / "final_dataset_latest.csv", index=False)
    manifest = cxr_data.build_manifest(tmp_path, test_fraction=0.3)
    assert len(manifest) == 6 and (manifest["prompt"] == "Describe the findings in this chest X-ray.").all()
    assert set(manifest["split"]) <= {"train", "val", "test"} and (manifest.split == "test").any()
    first = label_report(shipped["section_findings"][0])
    stored = [None if pd.isna(v) else v for v in manifest.loc[0, list(cxr_data.LABEL_COLUMNS)]]
    assert stored == [first[name] for name in LABELS]
    seed.loc[1, "target_report"] = ""
    seed.to_csv(tmp_path / "final_dataset_latest.csv", index=False)
    with pytest.raises(ManifestError, match="line 3, column 'target_report'"):
        cxr_data.build_manifest(tmp_path)


def test_real_dicom_is_inverted_and_windowed() -> None:
    import pydicom

    path = cxr_data.real_cxr_path()
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    image = cxr_data.read_dicom(path)
    raw = ds.pixel_array.astype(float)
    assert image.shape == raw.shape and 0 <= image.min() and image.max() <= 1
    assert np.corrcoef(image[::8, ::8].ravel(), raw[::8, ::8].ravel())[0, 1] < -0.9  # MONOCHROME1: inverted
    # The window (centre 15000, width 30000 here) is applied: with it the display range is the window's.
    assert cxr_data.read_xray(path).dtype == np.uint8
