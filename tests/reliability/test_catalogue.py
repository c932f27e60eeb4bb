"""The catalogue itself: every adapter's table is collected, case ids are unique, and it covers the issue's list."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).parent


def catalogue_tables() -> dict[str, list]:
    """``CASES`` of every test module in this folder, by module name."""
    tables = {}
    for path in sorted(HERE.glob("test_*.py")):
        if "CASES" not in path.read_text(encoding="utf-8"):
            continue
        # pytest has usually imported it already (collection); importing it again costs seconds.
        module = next((m for m in list(sys.modules.values())
                       if getattr(m, "__file__", None) and Path(m.__file__).resolve() == path.resolve()), None)
        if module is None:
            spec = importlib.util.spec_from_file_location(f"_catalogue_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        if hasattr(module, "CASES"):
            tables[path.stem] = list(module.CASES)
    return tables


def test_catalogue_has_unique_cases_covering_the_listed_kinds() -> None:
    tables = catalogue_tables()
    ids = [case.id for cases in tables.values() for case in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert len(ids) >= 25, f"only {len(ids)} bad inputs in {sorted(tables)}"
    kinds = ("png_corrupt", "png_truncated", "dicom_truncated", "missing_image", "rle_odd", "rle_overlapping",
             "rle_run_past", "duplicate", "unknown_class", "png_8bit", "png_3_channels", "spacing_zero",
             "spacing_negative", "spacing_list_string", "spacing_empty", "spacing_text", "param_misspelt",
             "param_string_for_float", "moved_away")
    missing = [k for k in kinds if not any(k in i for i in ids)]
    assert missing == [], f"no case for {missing}"


# Issue 8's list, per adapter where it applies (a case id of that adapter must contain each kind).
KINDS_PER_ADAPTER = {
    "textseg3d": ("nifti_corrupt", "nifti_truncated", "npz_corrupt", "npz_truncated", "missing_image",
                  "missing_mask", "shape_mismatch", "affine_mismatch", "nan_inf_voxels", "spacing_zero",
                  "spacing_negative", "duplicate", "empty_report", "report_row_for_missing_case",
                  "manifest_spacing_list_string", "manifest_spacing_empty", "manifest_spacing_text", "moved_away",
                  "param_misspelt", "param_string_for_float", "everything_at_once"),
    "prs_med": ("png_corrupt", "png_truncated", "missing_image", "missing_mask", "size_mismatch", "non_binary",
                "png_3_channels", "png_16bit", "unknown_task", "empty_answer", "duplicate", "moved_away",
                "param_misspelt", "param_string_for_float", "everything_at_once"),
    "cxr_report": ("png_corrupt", "png_truncated", "dicom_truncated", "missing_image", "duplicate",
                   "label_outside_0_1_-1_null", "unknown_label_name", "empty_report", "moved_away", "param_misspelt",
                   "param_string_for_float", "at_once"),
    "ct_clip": ("nifti_corrupt", "nifti_truncated", "nan_inf_voxels", "spacing_list_string", "spacing_empty",
                "spacing_text", "spacing_zero", "spacing_negative", "label_outside_0_1", "unknown_label_name",
                "duplicate", "report_row_for_missing_volume", "empty_report", "moved_away", "param_misspelt",
                "param_string_for_float", "everything_at_once"),
}


def test_every_adapter_covers_the_kinds_that_apply_to_it() -> None:
    tables = catalogue_tables()
    missing = {}
    for adapter, kinds in KINDS_PER_ADAPTER.items():
        ids = [case.id for case in tables.get(f"test_bad_inputs_{adapter}", [])]
        assert all(i.startswith(adapter) for i in ids), f"{adapter}: case ids must start with the adapter's name"
        missing[adapter] = [k for k in kinds if not any(k in i for i in ids)]
    assert missing == {a: [] for a in KINDS_PER_ADAPTER}, f"kinds without a case: {missing}"
