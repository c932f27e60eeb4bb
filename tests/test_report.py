"""nbsupport.report: offline HTML export of executed notebooks and the index across runs."""
from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import nbformat
import pytest

from nbsupport.report import export_notebook_html, flatten_metrics, write_index

# A 1x1 PNG, so figures need no plotting library.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def _external_loads(page: str) -> list[str]:
    """Every script/stylesheet/image the page would fetch from the network."""
    return (re.findall(r'<script[^>]*\bsrc="(https?:[^"]*)"', page)
            + re.findall(r'<link[^>]*\bhref="(https?:[^"]*)"', page)
            + re.findall(r'<img[^>]*\bsrc="(https?:[^"]*)"', page)
            + re.findall(r'@import\s+(?:url\()?["\']?(https?:[^"\')]*)', page))


def _executed_notebook(path: Path) -> Path:
    buf = io.BytesIO(PNG)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "nbsupport", "display_name": "Python (nbsupport)", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Dice by epoch\nThe loss is $1 - \\mathrm{Dice}$."),
        nbformat.v4.new_code_cell("print('training')", execution_count=1, outputs=[
            nbformat.v4.new_output("stream", name="stdout", text="epoch 1 dice=0.71\n"),
            nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(buf.getvalue()).decode(),
                                                         "text/plain": "<Figure>"}),
        ]),
        nbformat.v4.new_code_cell("1/0", execution_count=2, outputs=[
            nbformat.v4.new_output("error", ename="ZeroDivisionError", evalue="division by zero",
                                   traceback=["ZeroDivisionError: division by zero"]),
        ]),
    ]
    nbformat.write(nb, path)
    return path


def test_export_notebook_html_is_self_contained(tmp_path):
    ipynb = _executed_notebook(tmp_path / "02_train.ipynb")
    html_path = export_notebook_html(ipynb)
    assert html_path == tmp_path / "02_train.html"
    page = html_path.read_text(encoding="utf-8")
    assert "epoch 1 dice=0.71" in page and "ZeroDivisionError" in page and "Dice by epoch" in page
    assert "data:image/png;base64," in page, "figures must be embedded"
    assert _external_loads(page) == [], "the page must not need the network"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["02_train.html", "02_train.ipynb"], "temp file left"

    # Exporting again replaces the page (a re-export after the notebook changed).
    nb = nbformat.read(ipynb, as_version=4)
    nb.cells[1].outputs[0]["text"] = "epoch 1 dice=0.93\n"
    nbformat.write(nb, ipynb)
    assert "dice=0.93" in export_notebook_html(ipynb).read_text(encoding="utf-8")


def test_flatten_metrics_keeps_finite_numbers_only():
    metrics = {"train": {"dice": 0.8, "epochs": 3, "per_class": {"liver": 0.9}, "ok": True, "name": "x",
                         "curve": [1, 2], "bad": float("nan")}, "infer": {"hd95_mm": 4.5}}
    assert flatten_metrics(metrics) == [("train.dice", 0.8), ("train.epochs", 3.0), ("train.per_class.liver", 0.9),
                                        ("infer.hd95_mm", 4.5)]


def _system_folder(outputs: Path, run_id: str, system: str, status: dict | None, metrics: dict,
                   figures: int = 0, pages: tuple[str, ...] = ()) -> Path:
    folder = outputs / "runs" / run_id / system
    (folder / "figures").mkdir(parents=True)
    if status is not None:
        (folder / "run_status.json").write_text(json.dumps(status))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "config.json").write_text(json.dumps({"01_preprocess": {"profile": "demo"}}))
    (folder / "provenance.json").write_text(json.dumps({"01_preprocess": {"git": {"commit": "f" * 40, "dirty": True},
                                                                          "time": "2026-01-01T10:00:00+00:00"}}))
    for i in range(figures):
        (folder / "figures" / f"overlay {i:02d}.png").write_bytes(PNG)
    for name in pages:
        (folder / f"{name}.html").write_text("<html></html>")
    return folder


@pytest.fixture
def outputs(tmp_path) -> Path:
    ok = {"status": "ok", "profile": "smoke", "started": "2026-03-02T09:00:00+00:00", "duration_s": 42.0,
          "git": {"commit": "0123456789abcdef0123", "dirty": False}}
    failed = {"status": "failed", "profile": "demo", "started": "2026-03-03T09:00:00+00:00", "duration_s": 7.0,
              "git": {"commit": "abcdef0123456789abcd", "dirty": False},
              "failure": {"notebook": "02_train", "cell": 4, "cells": 9, "ename": "ValueError",
                          "evalue": "<b>mask</b> shape (1, 2) != (3, 4)"}}
    many = {f"m{i}": i / 10 for i in range(9)}
    _system_folder(tmp_path, "older-run", "seg2d", ok, {"02_train": {"dice": 0.81234, "loss": 0.2}},
                   figures=10, pages=("01_preprocess", "02_train"))
    _system_folder(tmp_path, "older-run", "ct_clip", ok, {"02_train": many})
    _system_folder(tmp_path, "newer-run", "seg2d", failed, {"01_preprocess": {"cases": 4}}, pages=("01_preprocess",))
    _system_folder(tmp_path, "by-hand", "seg2d", None, {})  # a notebook run from JupyterLab
    return tmp_path


def test_index_rows_status_metrics_and_order(outputs):
    page = write_index(outputs).read_text(encoding="utf-8")
    assert page.index("newer-run") < page.index("older-run"), "newest run first"
    older = next(r for r in page.split("<tr")[1:] if "<b>seg2d</b>" in r and "older-run" in r)
    assert "status-ok" in older and "smoke" in older and "0123456789" in older
    assert "02_train.dice = 0.8123" in older and "02_train.loss = 0.2" in older
    newer = next(r for r in page.split("<tr")[1:] if "newer-run" in r)
    assert "status-failed" in newer and "02_train cell 4/9" in newer and "ValueError" in newer
    assert "&lt;b&gt;mask&lt;/b&gt;" in newer and "<b>mask</b>" not in newer, "failure text must be escaped"
    ct_clip = next(r for r in page.split("<tr")[1:] if "<b>ct_clip</b>" in r)
    assert "02_train.m5 = 0.5" in ct_clip and "<details><summary>3 more</summary>" in ct_clip
    by_hand = next(r for r in page.split("<tr")[1:] if "by-hand" in r)
    assert "status-interactive" in by_hand and "demo" in by_hand and "ffffffffff" in by_hand
    assert "+dirty" in by_hand


def test_index_links_are_relative_and_resolve(outputs):
    page = write_index(outputs).read_text(encoding="utf-8")
    links = re.findall(r'(?:href|src)="([^"]+)"', page)
    assert "runs/older-run/seg2d/02_train.html" in links
    assert "runs/older-run/seg2d/figures/overlay%2000.png" in links, "file names are URL-quoted"
    assert page.count('class="thumb"') == 8 and "all 10 figures" in page
    for link in links:
        assert not re.match(r"^(https?:|/)", link), f"{link} is not a relative link"
        target = outputs / link.replace("%20", " ")
        assert target.exists(), f"index links to missing {link}"
    assert _external_loads(page) == []


def test_index_without_runs_says_how_to_make_one(tmp_path):
    page = write_index(tmp_path).read_text(encoding="utf-8")
    assert "No runs yet" in page and "nbsupport run" in page


def test_index_defaults_to_nbsupport_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("NBSUPPORT_OUTPUTS", str(tmp_path))
    assert write_index() == tmp_path / "index.html"


def test_index_lists_case_viewers_and_attention_pages_as_views_and_links_metrics(tmp_path):
    from nbsupport.report import write_index

    run = tmp_path / "runs" / "r1" / "seg2d"
    run.mkdir(parents=True)
    for name in ("03_infer.ipynb", "03_infer.html", "03_case_viewer.html", "04_attention_head_view.html"):
        (run / name).write_text("{}" if name.endswith(".ipynb") else "<html></html>")
    (run / "metrics.json").write_text('{"03_infer": {"test_dice": 0.7}}')
    page = write_index(tmp_path).read_text()
    notebooks_cell, views_cell = page.split("</td><td>")[6:8]
    assert "03_infer.html" in notebooks_cell and "03_case_viewer.html" not in notebooks_cell
    assert 'href="runs/r1/seg2d/03_case_viewer.html"' in views_cell
    assert 'href="runs/r1/seg2d/04_attention_head_view.html"' in views_cell
    assert 'href="runs/r1/seg2d/metrics.json"' in page


def test_index_leads_with_the_headline_result_next_to_its_baseline(tmp_path):
    from nbsupport.runs import RunFolder

    many = {f"m{i}": i / 10 for i in range(12)}
    folder = tmp_path / "runs" / "r1" / "cxr_report"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"01_preprocess": many}))
    run = RunFolder(folder)
    run.write_headline("02_train", "test CE micro-F1", 0.81, "nearest-neighbour report", 0.62, ci95=(0.74, 0.86))
    row = next(r for r in write_index(tmp_path).read_text(encoding="utf-8").split("<tr")[1:] if "r1" in r)
    visible = row.split("<details>")[0]
    assert "test CE micro-F1 0.81 (0.74\u20130.86)" in visible and "nearest-neighbour report 0.62" in visible
    assert visible.index("micro-F1") < visible.index("01_preprocess.m0")
