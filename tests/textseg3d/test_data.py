"""textseg3d adapter: report -> prompt, report tables (.xlsx / .csv), npz and NIfTI layouts, manifest, data lists."""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nbsupport.manifest import ManifestError, read_manifest, write_manifest
from nbsupport.textseg3d.data import (
    REPORT_COLUMNS,
    TEXTSEG3D_SCHEMA,
    ReportError,
    build_manifest,
    case_items,
    canonical_spacing,
    flip_side,
    from_canonical,
    laterality,
    load_case,
    read_report_table,
    report_to_prompt,
    report_variant,
    to_canonical,
)
from nbsupport.textseg3d.demo_data import DEMO_SIZES, write_demo_dataset

SMOKE = DEMO_SIZES["smoke"]


def _row(**values: str) -> dict[str, str]:
    row = {c: "" for c in REPORT_COLUMNS}
    row.update({"Unit No": "P1", "Subsite 1": "Breast, Lt.", "icT": "T2", "icN": "N0", "Remark": "BCS"})
    row.update(values)
    return row


# ---------------------------------------------------------------------------------------------- report -> prompt
@pytest.mark.parametrize("values, expected", [
    ({}, "N0, cT2, breast conserving surgery, left side"),
    ({"Subsite 1": "Breast, Rt.", "icT": "3", "icN": "1", "Remark": "Total mastectomy"},
     "N1, cT3, total mastectomy surgery, right side"),
    ({"icT": "cT1", "icN": "N2", "Remark": "", "RT aim": "Adjuvant RT (MRM)"},
     "N2, cT1, total mastectomy surgery, left side"),
    ({"Remark": "", "RT aim": ""}, "N0, cT2, unknown type surgery, left side"),
    ({"Subsite 1": "right breast", "icT": "2.0"}, "N0, cT2, breast conserving surgery, right side"),
])
def test_report_to_prompt_builds_the_public_codes_text(values: dict, expected: str) -> None:
    assert report_to_prompt(_row(**values)) == expected


@pytest.mark.parametrize("subsite", ["Breast, Both", "", "Breast", "Lt and Rt"])
def test_undeterminable_side_is_an_error_naming_case_and_field(subsite: str) -> None:
    assert laterality(subsite) is None
    with pytest.raises(ReportError, match=r"case 'P7'.*'Subsite 1'"):
        report_to_prompt(_row(**{"Unit No": "P7", "Subsite 1": subsite}))


def test_flip_side_swaps_only_the_side() -> None:
    assert flip_side("N0, cT2, breast conserving surgery, left side") == \
        "N0, cT2, breast conserving surgery, right side"
    assert flip_side("N1, cT3, total mastectomy surgery, right side").endswith("left side")


def test_report_variants() -> None:
    p = "N0, cT2, breast conserving surgery, left side"
    assert report_variant(p, "true") == p
    assert report_variant(p, "flipped").endswith("right side")
    assert report_variant(p, "empty") == ""
    with pytest.raises(ValueError):
        report_variant(p, "shuffled")


def test_xlsx_and_csv_report_tables_read_the_same(tmp_path: Path) -> None:
    rows = [_row(**{"Number": str(i), "Unit No": f"P{i}"}) for i in range(1, 4)]
    frame = pd.DataFrame(rows, columns=list(REPORT_COLUMNS))
    frame.to_excel(tmp_path / "site_report.xlsx", index=False, engine="openpyxl")
    frame.to_csv(tmp_path / "site_report.csv", index=False)
    from_xlsx = read_report_table(tmp_path / "site_report.xlsx")
    from_csv = read_report_table(tmp_path / "site_report.csv")
    pd.testing.assert_frame_equal(from_xlsx, from_csv)
    assert [report_to_prompt(r) for r in from_xlsx.to_dict("records")] == \
        ["N0, cT2, breast conserving surgery, left side"] * 3


def test_report_table_problems_are_listed_together(tmp_path: Path) -> None:
    frame = pd.DataFrame([_row(), _row(), _row(**{"Unit No": ""})], columns=list(REPORT_COLUMNS))
    frame.to_csv(tmp_path / "bad_report.csv", index=False)
    with pytest.raises(ManifestError) as err:
        read_report_table(tmp_path / "bad_report.csv")
    text = str(err.value)
    assert "line 2" in text and "line 3" in text and "line 4" in text and "Unit No" in text
    frame.drop(columns=["icN"]).to_csv(tmp_path / "cols_report.csv", index=False)
    with pytest.raises(ManifestError, match="icN"):
        read_report_table(tmp_path / "cols_report.csv")


# ---------------------------------------------------------------------------------------------- orientation
def test_canonical_orientation_round_trips_any_axis_order() -> None:
    rng = np.random.default_rng(0)
    volume = rng.random((5, 6, 7))
    # stored as (x, z, y) with x flipped: a LIA-like affine with spacing 2, 3, 4 mm
    affine = np.array([[-2.0, 0, 0, 0], [0, 0, 4.0, 0], [0, 3.0, 0, 0], [0, 0, 0, 1]])
    canonical = to_canonical(volume, affine)
    assert canonical.shape == (6, 7, 5)  # (D along z, H along y, W along x)
    assert canonical_spacing(affine) == (3.0, 4.0, 2.0)
    np.testing.assert_array_equal(from_canonical(canonical, affine), volume)
    # stored x index grows towards the patient's left (affine -2): canonical axis 2 keeps it; stored z (+3, towards
    # the head) and y (+4, anterior) are reversed into I and P
    expected = np.transpose(volume, (1, 2, 0))[::-1, ::-1, :]
    np.testing.assert_array_equal(canonical, expected)


def test_npz_and_nifti_layouts_load_to_the_same_canonical_arrays(tmp_path: Path) -> None:
    a = write_demo_dataset(tmp_path / "npz", layout="npz", table="xlsx", **SMOKE)
    b = write_demo_dataset(tmp_path / "nifti", layout="nifti", table="csv", **SMOKE)
    ma, mb = build_manifest(a).manifest, build_manifest(b).manifest
    pd.testing.assert_frame_equal(ma.drop(columns=["image", "label", "layout"]),
                                  mb.drop(columns=["image", "label", "layout"]))
    assert set(ma.layout) == {"npz"} and set(mb.layout) == {"nifti"}
    case = ma.iloc[0]
    ca = load_case(a / case.image, a / case.label)
    cb = load_case(b / mb.iloc[0].image, b / mb.iloc[0].label)
    np.testing.assert_array_equal(ca["image"], cb["image"])
    np.testing.assert_array_equal(ca["label"], cb["label"])
    assert ca["spacing"] == cb["spacing"] == SMOKE["spacing"]
    stored = nib.load(str(b / mb.iloc[0].image))
    assert stored.shape == tuple(reversed(SMOKE["shape"]))  # RAS order on disk: (W, H, D)
    np.testing.assert_allclose(np.diag(stored.affine)[:3], list(reversed(SMOKE["spacing"])))


# ---------------------------------------------------------------------------------------------- manifest
def test_manifest_splits_per_side_and_lists_the_bilateral_case(tmp_path: Path) -> None:
    root = write_demo_dataset(tmp_path / "d", **SMOKE)
    table = build_manifest(root, val_fraction=0.25, test_fraction=0.25)
    m = table.manifest
    assert len(m) == SMOKE["n_cases"] and list(table.excluded["case"]) == [f"BC{SMOKE['n_cases'] + 1:03d}"]
    assert "Subsite 1" in table.excluded.iloc[0]["reason"]
    for side, part in m.groupby("side"):
        ordered = part.sort_values("case")
        assert list(ordered.split) == ["train", "train", "val", "test"], side
    write_manifest(m, tmp_path / "m.csv", TEXTSEG3D_SCHEMA, root)
    back, back_root = read_manifest(tmp_path / "m.csv", TEXTSEG3D_SCHEMA)
    assert back_root == root and list(back.prompt) == list(m.prompt)


def test_shape_mismatch_and_missing_report_rows_are_reported_together(tmp_path: Path) -> None:
    root = write_demo_dataset(tmp_path / "d", **SMOKE)
    np.savez_compressed(root / "BC001" / "label.npz", label=np.zeros((4, 4, 4), dtype=np.uint8))
    shutil.copytree(root / "BC002", root / "XYZ9")
    with pytest.raises(ManifestError) as err:
        build_manifest(root)
    text = str(err.value)
    assert "'BC001'" in text and "label shape (4, 4, 4)" in text
    assert "'XYZ9'" in text and "report row" in text


def test_case_items_carry_the_prompt_of_each_report_variant(tmp_path: Path) -> None:
    root = write_demo_dataset(tmp_path / "d", **SMOKE)
    manifest = build_manifest(root).manifest.head(2)
    true, flipped = case_items(manifest, root), case_items(manifest, root, "flipped")
    assert [i["case"] for i in true] == list(manifest["case"]) and true[0]["image"] == str(root / manifest.iloc[0].image)
    assert [i["prompt"] for i in flipped] == [flip_side(p) for p in manifest["prompt"]]

