"""Demo folders: reused when complete with the same arguments, rewritten otherwise, never over real data."""
from __future__ import annotations

from pathlib import Path

import pytest

from nbsupport.demo import DEMO_MARKER, finish_demo_folder, read_demo_marker, start_demo_folder


def test_complete_demo_is_reused_and_changed_arguments_rewrite_it(tmp_path: Path) -> None:
    root, params = tmp_path / "demo", {"n": 2, "generator": "toy", "format_version": 1}
    assert start_demo_folder(root, params, required=["table.csv"]) is False
    (root / "table.csv").write_text("a\n")
    finish_demo_folder(root, params, rows=1)
    assert read_demo_marker(root) == {"params": params, "complete": True, "rows": 1}
    assert start_demo_folder(root, params, required=["table.csv"]) is True
    (root / "table.csv").unlink()  # complete marker but a required file gone: written again
    assert start_demo_folder(root, params, required=["table.csv"]) is False
    (root / "table.csv").write_text("a\n")
    assert start_demo_folder(root, {**params, "n": 3}) is False
    assert sorted(p.name for p in root.iterdir()) == [DEMO_MARKER]


def test_interrupted_demo_is_written_again(tmp_path: Path) -> None:
    root, params = tmp_path / "demo", {"n": 2}
    start_demo_folder(root, params)
    (root / "half.npy").write_bytes(b"x")
    assert start_demo_folder(root, params) is False
    assert not (root / "half.npy").exists()


def test_a_folder_without_marker_is_never_touched(tmp_path: Path) -> None:
    (tmp_path / "mine.csv").write_text("real data\n")
    with pytest.raises(FileExistsError, match=DEMO_MARKER):
        start_demo_folder(tmp_path, {"n": 1})
    assert (tmp_path / "mine.csv").read_text() == "real data\n"
