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
