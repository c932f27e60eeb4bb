"""CT-RATE layout adapter: names, XYSpacing strings, joining the CSVs, all-at-once errors, splits by patient."""
from __future__ import annotations

import pandas as pd
import pytest

from nbsupport.ct_clip import data as ct_data
from nbsupport.ct_clip import demo_data
from nbsupport.manifest import ManifestError


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory):
    return demo_data.write_demo_dataset(tmp_path_factory.mktemp("ctrate") / "data", n_train_patients=5,
                                      n_valid_patients=3, scale=0.2)


def test_volume_names_follow_ct_rate():
    assert ct_data.parse_volume_name("valid_53_a_1.nii.gz") == {
        "source_split": "valid", "patient": "valid_53", "scan": "valid_53_a", "volume": "valid_53_a_1"}
    assert ct_data.volume_relative_path("train_1_b_2") == "train_fixed/train_1/train_1_b/train_1_b_2.nii.gz"
    assert ct_data.volume_relative_path("valid_3_a_1", "first") == "valid/valid_3/valid_3_a/valid_3_a_1.nii.gz"
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
