"""The synthetic demo dataset: CheXpert Plus layout, reports that say what their labels say, findings visible in
the images, and the shared demo-folder marker (reused, replaced, refused)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nbsupport.cxr_report import data as cxr_data
from nbsupport.cxr_report import demo_data
from nbsupport.cxr_report.labeler import LABELS, label_report
from nbsupport.demo import DEMO_MARKER


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
    study = {**_STUDY, "findings": list(findings)}
    return demo_data.draw_radiograph(study, 128, np.random.default_rng(1)).astype(float)


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
    studies = [demo_data.sample_findings(rng)["findings"] for _ in range(2000)]
    counts = np.array([len(set(f) - {"devices"}) for f in studies])  # pathologies
    assert 0.1 < (counts == 0).mean() < 0.2 and (counts >= 3).mean() > 0.25
    for name, prevalence in demo_data.FINDING_PREVALENCE.items():
        assert abs(np.mean([name in f for f in studies]) - prevalence) < 0.04, name
    assert len({tuple(f) for f in studies}) > 300
    cardio = np.array(["cardiomegaly" in f for f in studies])
    effusion = np.array(["effusion_left" in f for f in studies])
    assert abs(effusion[cardio].mean() - effusion[~cardio].mean()) < 0.06  # independent


def test_a_demo_folder_is_reused_replaced_or_refused(tmp_path: Path) -> None:
    root = demo_data.write_demo_dataset(tmp_path / "d", n_patients=2, image_size=32, seed=0)
    csv = root / cxr_data.CHEXPERT_PLUS_CSV
    marker = json.loads((root / DEMO_MARKER).read_text())
    assert marker["complete"] and marker["params"]["n_patients"] == 2
    written = csv.stat().st_mtime_ns
    demo_data.write_demo_dataset(root, n_patients=2, image_size=32, seed=0)
    assert csv.stat().st_mtime_ns == written  # the same arguments: reused as it is
    (root / "preprocessed_32").mkdir()  # what 01_preprocess adds to the folder
    demo_data.write_demo_dataset(root, n_patients=3, image_size=32, seed=0)
    assert not (root / "preprocessed_32").exists()  # other arguments: replaced, stale resized images too
    assert len(pd.read_csv(csv)["deid_patient_id"].unique()) == 3
    real = tmp_path / "real"
    real.mkdir()
    (real / cxr_data.CHEXPERT_PLUS_CSV).write_text("path_to_image\n")
    with pytest.raises(FileExistsError, match=DEMO_MARKER):
        demo_data.write_demo_dataset(real, n_patients=2, image_size=32)
