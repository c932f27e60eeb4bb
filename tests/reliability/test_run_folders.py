"""Run folders under concurrency and failure: separate processes started at the same instant, a re-used id, a
notebook that fails inside papermill (through the real ``nbsupport run`` console command)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from nbsupport.paths import project_root

# Every worker waits for the GO file, then acts at once; prints one JSON line with what happened.
WORKER = r"""
import json, os, sys, time
from pathlib import Path
go, action, root, arg = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
while not go.exists():
    time.sleep(0.001)
from nbsupport.runs import RunExistsError, RunFolder
from nbsupport.runner import create_run_folders
try:
    if action == "new_run":
        run_id, folders = create_run_folders(["seg2d"], None if arg == "-" else arg, root)
        print(json.dumps({"ok": run_id}))
    elif action == "stage":
        import dataclasses
        from nbsupport.config import StageConfig
        stage, run_dir = arg.split("@", 1)
        cls = dataclasses.make_dataclass("Stage", [], bases=(StageConfig,), frozen=True,
                                         namespace={"SYSTEM": "seg2d", "STAGE": stage})
        run = RunFolder.for_stage(cls.from_params({"profile": "smoke", "run_dir": run_dir}))
        run.write_metrics(stage, {"pid": os.getpid()})
        print(json.dumps({"ok": stage}))
except RunExistsError as err:
    print(json.dumps({"refused": str(err)}))
"""


def _at_once(tmp_path: Path, jobs: list[tuple[str, str]]) -> list[dict]:
    """Start one process per (action, arg), release them together, return their JSON reports."""
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(project_root()), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(go), action, str(tmp_path / "runs"), arg],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for action, arg in jobs]
    time.sleep(0.5)  # let them all reach the wait loop
    go.touch()
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def test_processes_started_at_once_get_distinct_folders_and_one_id_is_claimed_once(tmp_path: Path) -> None:
    reports = _at_once(tmp_path, [("new_run", "-")] * 6 + [("new_run", "shared-id")] * 4)
    fresh = [r["ok"] for r in reports[:6]]
    assert len(set(fresh)) == 6, f"two runs share a folder: {fresh}"
    shared = reports[6:]
    assert sum("ok" in r for r in shared) == 1, shared
    assert all("already exists" in r["refused"] for r in shared if "ok" not in r), shared
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([*fresh, "shared-id"])


def test_stages_recorded_at_once_in_one_run_folder_lose_no_record(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "r1" / "seg2d"
    stages = [f"0{i}_stage" for i in range(1, 4)]  # each process imports torch (provenance): keep them few
    reports = _at_once(tmp_path, [("stage", f"{s}@{run_dir}") for s in stages] + [("stage", f"01_stage@{run_dir}")])
    assert sum(r.get("ok") == "01_stage" for r in reports) == 1, "one stage ran twice in one run folder"
    assert sum("already ran" in r.get("refused", "") for r in reports) == 1, reports
    assert sorted(json.loads((run_dir / "config.json").read_text())) == stages
    assert sorted(json.loads((run_dir / "provenance.json").read_text())) == stages
    assert sorted(json.loads((run_dir / "metrics.json").read_text())) == stages


@pytest.mark.notebook
@pytest.mark.slow
def test_nbsupport_run_with_a_wrongly_typed_parameter_fails_keeps_the_partial_notebook_and_writes_nothing(
        tmp_path: Path) -> None:
    """Through the console command, papermill and the real seg2d kernel: ``-p val_fraction=abc`` (a string for a
    float) must stop 01_preprocess at its config cell, exit non-zero, and keep the executed notebook."""
    outputs, manifest = tmp_path / "outputs", tmp_path / "manifests" / "m.csv"
    # data_root given: the runner writes no demo data for a notebook that is to stop at its config cell.
    command = [sys.executable, "-m", "nbsupport.cli", "run", "seg2d", "--profile", "smoke", "--run-id", "bad-type",
               "--outputs-dir", str(outputs), "-p", f"data_root={tmp_path / 'data'}", "-p", "val_fraction=abc",
               "-p", f"manifest={manifest}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=project_root(), check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED" in done.stdout and "ConfigError" in done.stdout, done.stdout

    run_dir = outputs / "runs" / "bad-type" / "seg2d"
    partial = nbformat.read(run_dir / "01_preprocess.ipynb", as_version=4)
    errors = [o for c in partial.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert [e.ename for e in errors] == ["ConfigError"]
    assert "parameter 'val_fraction'" in errors[0].evalue and "expected a number" in errors[0].evalue
    assert "'abc'" in errors[0].evalue
    assert not (run_dir / "02_train.ipynb").exists(), "notebooks after the failure must not run"
    status = json.loads((run_dir / "run_status.json").read_text())
    assert status["status"] == "failed" and status["failure"]["notebook"] == "01_preprocess"
    # Nothing but the runner's own record: no stage config, no metrics, no figure, no manifest.
    assert not (run_dir / "config.json").exists() and not (run_dir / "metrics.json").exists()
    assert not (run_dir / "figures").exists()
    assert not manifest.exists() and not manifest.parent.exists()

    # A misspelt name is refused before any kernel starts, and the same run id is refused afterwards.
    again = subprocess.run([*command[:-4], "-p", "val_fractoin=0.1"], capture_output=True, text=True, timeout=120,
                           cwd=project_root(), check=False)
    assert again.returncode == 2 and "val_fractoin" in again.stderr, again.stderr
    reuse = subprocess.run(command[:-4], capture_output=True, text=True, timeout=120, cwd=project_root(),
                           check=False)
    assert reuse.returncode == 2 and "already exists" in reuse.stderr, reuse.stderr


@pytest.mark.notebook
@pytest.mark.slow
def test_a_kernel_killed_mid_notebook_is_reported_and_its_partial_notebook_kept(tmp_path: Path) -> None:
    """The OOM killer's SIGKILL to the kernel: the runner reports the cell, keeps what ran, and stops."""
    from nbsupport.runner import run_systems

    folder = tmp_path / "notebooks" / "victim"
    folder.mkdir(parents=True)
    for stem, body in (("01_work", ('print("before the kill", flush=True)\nimport os, signal\n'
                                    'os.kill(os.getpid(), signal.SIGKILL)')),
                       ("02_after", 'print("must not run")')):
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "nbsupport", "display_name": "Python (nbsupport)", "language": "python"}
        params = nbformat.v4.new_code_cell('profile = "smoke"\nrun_dir = ""')
        params.metadata["tags"] = ["parameters"]
        nb.cells = [params, nbformat.v4.new_code_cell(body)]
        nbformat.write(nb, folder / f"{stem}.ipynb")
    lines: list[str] = []
    summary = run_systems(["victim"], "smoke", run_id="killed", notebooks_dir=tmp_path / "notebooks",
                          outputs_dir=tmp_path / "outputs", log=lines.append)

    assert not summary.ok and summary.failure.notebook == "01_work", "\n".join(lines)
    failure = summary.failure
    assert failure.ename == "DeadKernelError" and failure.cell == failure.cells == 3, failure  # + injected cell
    assert failure.source == 'print("before the kill", flush=True)'
    run_dir = tmp_path / "outputs" / "runs" / "killed" / "victim"
    partial = nbformat.read(run_dir / "01_work.ipynb", as_version=4)  # a valid notebook, not a torn file
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in partial.cells)
    assert any("FAILED at cell 3/3" in line and "DeadKernelError" in line for line in lines), lines
    assert not (run_dir / "02_after.ipynb").exists()
    status = json.loads((run_dir / "run_status.json").read_text())
    assert status["status"] == "failed" and status["failure"]["ename"] == "DeadKernelError"
