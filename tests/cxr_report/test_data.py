"""CheXpert Plus / seed CSV / DICOM adapters, the demo generator and the manifest."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nbsupport.cxr_report import data as cxr_data
from nbsupport.cxr_report.labeler import LABELS, label_report
from nbsupport.manifest import ManifestError, read_manifest, write_manifest


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cxr_data.write_demo_dataset(tmp_path_factory.mktemp("cxr") / "demo", n_patients=30, image_size=128,
                                       seed=3)


def test_demo_dataset_has_the_chexpert_plus_layout(demo_root: Path) -> None:
    df = pd.read_csv(demo_root / cxr_data.CHEXPERT_PLUS_CSV, dtype=str, keep_default_na=False)
    assert tuple(df.columns) == cxr_data.CHEXPERT_PLUS_COLUMNS and len(df.columns) == 27
    assert set(df["split"]) <= {"train", "valid"}
    assert df["path_to_image"].str.match(r"^(train|valid)/patient\d{5}/study\d/view1_frontal\.jpg$").all()
    labels = [json.loads(line) for line in (demo_root / cxr_data.CHEXBERT_FILES["findings"]).read_text().splitlines()]
    assert [r["path_to_image"] for r in labels] == list(df["path_to_image"])
    assert all(set(r) == {"path_to_image", *LABELS} for r in labels)
    assert {v for r in labels for k, v in r.items() if k != "path_to_image"} <= {1.0, 0.0, None}
    image = cxr_data.read_xray(demo_root / df["path_to_image"][0])
    assert image.shape == (128, 128) and image.dtype == np.uint8


def test_demo_reports_say_what_their_labels_say(demo_root: Path) -> None:
    """The labels are written from the findings; the rule labeler must read the same from the report text."""
    df = pd.read_csv(demo_root / cxr_data.CHEXPERT_PLUS_CSV, dtype=str, keep_default_na=False)
    records = {json.loads(line)["path_to_image"]: json.loads(line)
               for line in (demo_root / cxr_data.CHEXBERT_FILES["findings"]).read_text().splitlines()}
    for row in df.itertuples():
        expected = {k: v for k, v in records[row.path_to_image].items() if k != "path_to_image"}
        assert label_report(row.section_findings) == expected, row.section_findings
    # varied phrasing and negations, several findings
    assert df["section_findings"].nunique() > len(df) // 2
    assert df["section_findings"].str.contains(r"\bno\b", case=False).any()
    positives = [sum(v == 1.0 for k, v in r.items() if k not in ("path_to_image", "No Finding"))
                 for r in records.values()]
    assert max(positives) >= 3


_STUDY = {"ptx_side": "left", "cons_side": "left", "cons_zone": "lower", "atel_side": "left", "pleural_side": "left",
          "effusion_size": "small", "n_nodules": 1, "device": "ett"}


def _draw(*findings: str) -> np.ndarray:
    """The same synthetic patient (same random stream) with ``findings``, at 128 px, as float."""
    return cxr_data.draw_radiograph({**_STUDY, "findings": list(findings)}, 128, np.random.default_rng(1)).astype(float)


def _region(rows: tuple[float, float], cols: tuple[float, float]) -> tuple[slice, slice]:
    return slice(int(rows[0] * 128), int(rows[1] * 128)), slice(int(cols[0] * 128), int(cols[1] * 128))


def test_findings_are_visible_in_the_images() -> None:
    """Each finding changes the image where a radiologist would look for it, on the patient's side (a PA film shows
    the patient's left on the image's right), and leaves the other side alone."""
    normal = _draw()
    row = int(0.66 * 128)
    assert (_draw("cardiomegaly")[row] > 120).sum() > (normal[row] > 120).sum() + 10
    left_base, right_base = _region((0.68, 0.76), (0.62, 0.8)), _region((0.68, 0.76), (0.2, 0.38))
    effusion = _draw("effusion_left")
    assert effusion[left_base].mean() > normal[left_base].mean() + 30
    assert abs(effusion[right_base].mean() - normal[right_base].mean()) < 3
    upper_mediastinum_edge = _region((0.2, 0.45), (0.38, 0.43))
    assert _draw("mediastinum")[upper_mediastinum_edge].mean() > normal[upper_mediastinum_edge].mean() + 30
    perihilar = [_region((0.42, 0.58), (0.32, 0.42)), _region((0.42, 0.58), (0.58, 0.68))]
    edema = _draw("edema")
    assert all(edema[r].mean() > normal[r].mean() + 10 for r in perihilar)
    rise = lambda image, region: float((image[region] - normal[region]).mean(axis=1).max())  # thin: row means
    band, other_side = _region((0.47, 0.57), (0.62, 0.76)), _region((0.47, 0.57), (0.24, 0.38))
    atelectasis = _draw("atelectasis")
    assert rise(atelectasis, band) > 25 and abs(rise(atelectasis, other_side)) < 3
    apex, other_apex = _region((0.2, 0.34), (0.58, 0.8)), _region((0.2, 0.34), (0.2, 0.42))
    cap = _draw("pleural_thickening")
    assert rise(cap, apex) > 25 and abs(rise(cap, other_apex)) < 3


def test_findings_co_occur_independently() -> None:
    """Findings are drawn independently at their prevalence: many images carry several, some none, and the
    combinations are many (a nearest-neighbour report cannot simply copy one of a few stock reports)."""
    rng = np.random.default_rng(0)
    studies = [cxr_data.sample_findings(rng)["findings"] for _ in range(2000)]
    counts = np.array([len(set(f) - {"devices"}) for f in studies])  # pathologies
    assert 0.1 < (counts == 0).mean() < 0.2 and (counts >= 3).mean() > 0.25
    for name, prevalence in cxr_data.FINDING_PREVALENCE.items():
        assert abs(np.mean([name in f for f in studies]) - prevalence) < 0.04, name
    assert len({tuple(f) for f in studies}) > 300
    cardio = np.array(["cardiomegaly" in f for f in studies])
    effusion = np.array(["effusion_left" in f for f in studies])
    assert abs(effusion[cardio].mean() - effusion[~cardio].mean()) < 0.06  # independent


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
    root = cxr_data.write_demo_dataset(tmp_path / "d", n_patients=3, image_size=64, seed=0)
    df = pd.read_csv(root / cxr_data.CHEXPERT_PLUS_CSV, dtype=str)
    first = root / df["path_to_image"][0]
    import cv2

    cv2.imwrite(str(first.with_suffix(".png")), cxr_data.read_xray(first))
    first.unlink()
    manifest = cxr_data.build_manifest(root)
    assert str(manifest["source_image"][0]).endswith(".png")


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

    from nbsupport.cxr_report.pipeline import real_cxr_path

    path = real_cxr_path()
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    image = cxr_data.read_dicom(path)
    raw = ds.pixel_array.astype(float)
    assert image.shape == raw.shape and 0 <= image.min() and image.max() <= 1
    assert np.corrcoef(image[::8, ::8].ravel(), raw[::8, ::8].ravel())[0, 1] < -0.9  # MONOCHROME1: inverted
    # The window (centre 15000, width 30000 here) is applied: with it the display range is the window's.
    assert cxr_data.read_xray(path).dtype == np.uint8
