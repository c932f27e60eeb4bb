"""Every notebook: parameters cell matches its config, stored without outputs, and runs end to end (smoke)."""
from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import nbformat
import papermill
import pytest

from nbsupport.config import StageConfig, parameters_cell
from nbsupport.paths import project_root

NOTEBOOKS = sorted((project_root() / "notebooks").glob("*/[0-9][0-9]_*.ipynb"))
SYSTEMS = sorted({p.parent.name for p in NOTEBOOKS})


def stage_config(notebook: Path) -> type[StageConfig]:
    """The config class of a notebook: the system's StageConfig subclass whose STAGE is the notebook's stem."""
    module = importlib.import_module(f"nbsupport.{notebook.parent.name}")
    matches = [obj for obj in vars(module).values()
               if isinstance(obj, type) and issubclass(obj, StageConfig) and obj.STAGE == notebook.stem]
    assert len(matches) == 1, f"{notebook}: expected one config class with STAGE={notebook.stem!r}, found {matches}"
    return matches[0]


def test_every_system_has_the_four_stages() -> None:
    assert SYSTEMS, "no notebooks found"
    for system in SYSTEMS:
        stems = sorted(p.stem for p in NOTEBOOKS if p.parent.name == system)
        assert [s[:2] for s in stems] == ["01", "02", "03", "04"], (system, stems)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_parameters_cell_matches_config(notebook: Path) -> None:
    nb = nbformat.read(notebook, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{notebook}: expected exactly one cell tagged 'parameters'"
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells[0] is tagged[0], f"{notebook}: the parameters cell must be the first code cell"
    declared = papermill.inspect_notebook(str(notebook))
    fields = {f.name for f in dataclasses.fields(stage_config(notebook))}
    assert set(declared) == fields, (f"{notebook}: missing {sorted(fields - set(declared))}, "
                                     f"unknown {sorted(set(declared) - fields)}")
    # Documented where users look (papermill --help-notebook): the cell is the one the config generates, with
    # a type and a help text per parameter. Regenerate with `nbsupport params <system> --write-notebooks`.
    assert tagged[0].source == parameters_cell(stage_config(notebook), tagged[0].source), (
        f"{notebook}: parameters cell and config drifted; run nbsupport params {notebook.parent.name} --write-notebooks")
    undocumented = [n for n, p in declared.items() if p["inferred_type_name"] in ("None", None) or not p["help"]]
    assert not undocumented, f"{notebook}: no type or help for {undocumented}"
    # Literals only: papermill does not recompute derived values.
    for line in tagged[0].source.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            value = value.split("  # type:", 1)[0]
            json.loads(value.strip().replace("None", "null").replace("True", "true").replace("False", "false")
                       .replace("(", "[").replace(")", "]"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_stored_without_outputs(notebook: Path) -> None:
    nb = nbformat.read(notebook, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{notebook} cell {i} has outputs"
    assert nb.metadata.get("kernelspec", {}).get("name") == "nbsupport"


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("system", SYSTEMS)
def test_series_runs_end_to_end_on_smoke(system: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """01→04 through papermill and the real kernel, on the system's smoke demo data, into one run folder."""
    from nbsupport.cli import write_demo_data
    from nbsupport.runner import run_systems

    monkeypatch.setenv("NBSUPPORT_DATA", str(tmp_path / "data"))
    write_demo_data([system], root=tmp_path / "data", size="smoke")
    manifest = tmp_path / "manifests" / f"{system}.csv"
    console: list[str] = []
    summary = run_systems([system], "smoke", params={"manifest": str(manifest)}, run_id="nbtest",
                          outputs_dir=tmp_path / "outputs", log=console.append)
    assert summary.ok, summary.failure
    # Live progress: the training loop's lines (step, loss) reach the console before the training cell is done.
    label = f"[{system} 02_train]"
    progress = [i for i, line in enumerate(console) if line.startswith(f"{label} train ") and "loss=" in line]
    train_cell = [i for i, line in enumerate(console) if line.startswith(f"{label} cell ") and ".train(" in line]
    assert progress and train_cell and progress[0] < train_cell[0], "\n".join(console)
    run_dir = tmp_path / "outputs" / "runs" / "nbtest" / system
    notebooks = sorted(p.stem for p in NOTEBOOKS if p.parent.name == system)
    for stem in notebooks:
        assert (run_dir / f"{stem}.ipynb").exists() and (run_dir / f"{stem}.html").exists()
    assert "progress: train " in (run_dir / "02_train.log").read_text()  # and the same lines in the run folder
    assert (run_dir / "export" / "README.md").is_file()  # 02_train's export, with its model card
    for stem in notebooks:  # library messages a reader cannot act on, silenced by their text (nbsupport/__init__.py)
        executed = (run_dir / f"{stem}.ipynb").read_text()
        assert "gemm_4bit_forward" not in executed and "is_gradient_checkpointing" not in executed, stem
        assert "Passing `no_repeat_ngram_size` with `inputs_embeds`" not in executed, stem
    config = json.loads((run_dir / "config.json").read_text())
    assert sorted(config) == notebooks
    assert all(c["profile"] == "smoke" for c in config.values())
    assert list((run_dir / "figures").glob("*.png"))
    index = (tmp_path / "outputs" / "index.html").read_text()
    assert index.count("nbtest") >= 1
    for page in ("03_case_viewer.html", "04_attention_viewer.html"):  # the offline case viewers, linked as views
        assert (run_dir / page).is_file(), f"{system}: {page} was not written"
        assert f'href="runs/nbtest/{system}/{page}"' in index, f"{system}: index.html does not link {page}"
