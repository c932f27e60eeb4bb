"""CT-RATE layout adapter: names, XYSpacing strings, joining the CSVs, all-at-once errors, demo data content."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nbsupport.ct_clip import data as ct_data
from nbsupport.ct_clip import preprocessing as ct_pre
from nbsupport.manifest import ManifestError


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory):
    return ct_data.write_demo_dataset(tmp_path_factory.mktemp("ctrate") / "data", n_train_patients=5,
                                      n_valid_patients=3, scale=0.2)


def test_volume_names_follow_ct_rate():
    assert ct_data.parse_volume_name("valid_53_a_1.nii.gz") == {
        "source_split": "valid", "patient": "valid_53", "scan": "valid_53_a", "volume": "valid_53_a_1"}
    assert ct_data.volume_relative_path("train_1_b_2") == "train_fixed/train_1/train_1_b/train_1_b_2.nii.gz"
    with pytest.raises(ValueError, match="split_patient_scan_recon"):
        ct_data.parse_volume_name("test_1_a")


def test_xy_spacing_string_is_parsed_like_ct_clip():
    assert ct_data.parse_xy_spacing("[0.341796875, 0.341796875]") == (0.341796875, 0.341796875)
    assert ct_data.parse_xy_spacing("[0.7,0.75]") == (0.7, 0.75)
    for bad in ("0.7, 0.7", "[0.7]", "[-1, 1]"):
        with pytest.raises(ValueError):
            ct_data.parse_xy_spacing(bad)


def test_scan_dataset_joins_reports_metadata_and_labels(demo_root):
    volumes = ct_data.scan_dataset(demo_root)
    assert len(volumes) == 8 and set(volumes.source_split) == {"train", "valid"}
    assert set(ct_data.LABELS) <= set(volumes.columns)
    assert volumes[list(ct_data.LABELS)].isin([0, 1]).all().all()
    assert set(volumes.rescale_intercept) <= {-1024.0, -1000.0}
    meta = pd.read_csv(demo_root / ct_data.METADATA_FILES["train"])
    assert list(meta.columns) == list(ct_data.METADATA_COLUMNS)
    first = volumes.iloc[0]
    assert f"[{first.xy_spacing_row}, {first.xy_spacing_col}]" == meta.XYSpacing.iloc[0]


def test_every_problem_is_reported_at_once_with_file_line_and_column(demo_root, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(demo_root, root)
    meta_path = root / ct_data.METADATA_FILES["train"]
    meta = pd.read_csv(meta_path, dtype=str, keep_default_na=False)
    meta.loc[1, "XYSpacing"] = "0.7 0.7"
    meta = meta.drop(index=2)
    meta.to_csv(meta_path, index=False)
    labels_path = root / ct_data.LABEL_FILES["valid"]
    labels = pd.read_csv(labels_path, dtype=str, keep_default_na=False)
    labels.loc[0, "Cardiomegaly"] = "yes"
    labels.to_csv(labels_path, index=False)
    (root / ct_data.volume_relative_path("valid_2_a_1")).unlink()
    with pytest.raises(ManifestError) as err:
        ct_data.scan_dataset(root)
    text = str(err.value)
    assert "train_metadata.csv, line 3, column 'XYSpacing'" in text
    assert "no metadata row for train_3_a_1" in text
    assert "valid_predicted_labels.csv, line 2, column 'Cardiomegaly': expected 0 or 1" in text
    assert "valid_2_a_1.nii.gz does not exist" in text
    assert len(err.value.problems) == 4


def test_splits_keep_patients_apart_and_valid_is_test(demo_root):
    volumes = ct_data.scan_dataset(demo_root)
    split = ct_data.assign_splits(volumes, val_fraction=0.4, seed=0)
    assert (split[volumes.source_split == "valid"] == "test").all()
    assert set(split[volumes.source_split == "train"]) == {"train", "val"}
    assert volumes.groupby("patient").apply(lambda g: split[g.index].nunique()).max() == 1


def test_demo_reports_state_the_drawn_findings_with_negations(demo_root):
    volumes = ct_data.scan_dataset(demo_root)
    for row in volumes.itertuples():
        text = row.findings.lower()
        negated = "no pleural effusion" in text or "pleural effusion is not observed" in text
        assert negated != bool(getattr(row, "_" + str(list(volumes.columns).index("Pleural effusion") + 1))), text
    assert volumes[list(ct_data.LABELS)].sum().loc[list(set(ct_data.LABELS) - set(ct_data.DEMO_LABELS))].sum() == 0


def test_demo_reports_name_every_finding_by_its_term_present_and_absent():
    """Like CT-RATE's reports, the demo names each finding by its canonical term in some reports where it is present
    and some where it is absent (besides descriptive sentences), and never with a negation when present."""
    named = {name: {True: 0, False: 0} for name in ct_data.DEMO_LABELS}
    for k in range(200):
        rng = np.random.default_rng([7, k])
        case = ct_data._demo_case(rng)
        findings, impressions = ct_data._demo_report(case, rng)
        sentences = findings.split(". ")[1:-1]  # one sentence per demo label, in DEMO_LABELS order
        assert len(sentences) == len(ct_data.DEMO_LABELS), findings
        for name, sentence in zip(ct_data.DEMO_LABELS, sentences):
            present = case["present"][name]
            negated = sentence.lower().startswith("no ") or " not " in sentence or "normal" in sentence
            assert negated != present, (name, present, sentence)
            named[name][present] += name.lower() in sentence.lower()
            assert (name in impressions) == present, (name, impressions)
    assert all(count[True] >= 10 and count[False] >= 10 for count in named.values()), named


def test_demo_nodules_lie_in_aerated_lung():
    """Every nodule centre is lung air in the volume drawn without the nodules (not heart, effusion, consolidation)."""
    shape, spacing = (64, 64, 48), (5.0, 5.0, 8.0)
    checked = 0
    for k in range(40):
        case = ct_data._demo_case(np.random.default_rng([3, k]))
        if not case["present"]["Lung nodule"]:
            continue
        without = {**case, "noise": 0.0, "present": {**case["present"], "Lung nodule": False}}
        hu = ct_data._render_demo_volume(without, shape, spacing, np.random.default_rng(0))
        for x, y, z, _ in case["nodules"]:
            i, j, kk = (round(x / spacing[0] + (shape[0] - 1) / 2), round(y / spacing[1] + (shape[1] - 1) / 2),
                        round(z / spacing[2] + (shape[2] - 1) / 2))
            assert hu[i, j, kk] < -500, (k, x, y, z, hu[i, j, kk])
            checked += 1
    assert checked >= 10


def test_demo_volumes_hold_the_findings_in_hounsfield_units(demo_root):
    volumes = ct_data.scan_dataset(demo_root)
    for row in volumes.itertuples():
        ct = ct_pre.load_ct(demo_root / row.nifti, row.rescale_slope, row.rescale_intercept)
        hu = ct.stored.astype(np.float32) * ct.slope + ct.intercept
        assert np.percentile(hu, 1) < -900  # air outside the body
        metal = volumes.loc[volumes.volume == row.volume, "Medical material"].item()
        assert (hu.max() > 2000) == bool(metal), row.volume
