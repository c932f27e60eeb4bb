"""nbsupport.runner through real papermill and the real `nbsupport` kernel, on three tiny notebooks.

The notebooks (built here with nbformat) follow the workbench's rules: a literal `parameters` cell, a config
built with StageConfig.from_params, records written with RunFolder. `02_train` raises in its third cell when
run with fail=True.
"""
from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import nbformat
import pytest

from nbsupport.runner import RunnerError, create_run_folders, format_duration, run_systems
from nbsupport.runs import RunExistsError
from nbsupport.seeds import run_seeds

pytestmark = pytest.mark.notebook
SYSTEM = "demo_sys"

_CONFIG_CELL = '''import dataclasses, os
from nbsupport.config import StageConfig, notebook_params, param
from nbsupport.runs import RunFolder

@dataclasses.dataclass(frozen=True)
class Cfg(StageConfig):
    SYSTEM = "demo_sys"
    STAGE = "{stage}"
{fields}

cfg = Cfg.from_params(notebook_params(globals()))
run = RunFolder.for_stage(cfg)'''


def _notebook(cells: list[str]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "nbsupport", "display_name": "Python (nbsupport)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, source in enumerate(cells):
        if source.startswith("## "):
            nb.cells.append(nbformat.v4.new_markdown_cell(source))
            continue
        cell = nbformat.v4.new_code_cell(source)
        if i == 0:
            cell.metadata["tags"] = ["parameters"]
        nb.cells.append(cell)
    return nb


def make_demo_notebooks(root: Path) -> Path:
    """``root/demo_sys/01_prepare, 02_train, 03_infer`` (and a markdown cell, and an empty code cell)."""
    folder = root / SYSTEM
    folder.mkdir(parents=True)
    nbformat.write(_notebook([
        'profile = "smoke"\nrun_dir = ""\nseed = 0\ndevice = "cpu"\nn_items = 3',
        _CONFIG_CELL.format(stage="01_prepare", fields='    n_items: int = param(3, "number of items")'),
        "## Prepare",
        'from nbsupport.runs import atomic_write_json\n'
        'atomic_write_json(run.file("kernel_env.json"), {k: os.environ.get(k) for k in '
        '("NBSUPPORT_HEADLESS", "NBSUPPORT_OUTPUTS")} | {"cwd": os.getcwd()})\n'
        'run.write_metrics(cfg.STAGE, {"items": cfg.n_items * 2, "note": "not a number"})\n'
        'print("prepared", cfg.n_items)',
        "",
    ]), folder / "01_prepare.ipynb")
    nbformat.write(_notebook([
        'profile = "smoke"\nrun_dir = ""\nseed = 0\ndevice = "cpu"\nepochs = 1\nfail = False',
        _CONFIG_CELL.format(stage="02_train", fields='    epochs: int = param(1, "epochs")\n'
                                                     '    fail: bool = param(False, "raise in cell 3")'),
        'if cfg.fail:\n    raise RuntimeError("failure requested by -p fail=True")',
        'import matplotlib\nmatplotlib.use("Agg")\nimport matplotlib.pyplot as plt\n'
        'fig, ax = plt.subplots(figsize=(2, 2))\nax.plot([0, 1], [1.0, 1.0 / cfg.epochs])\n'
        'run.save_figure(fig, "loss_curve")\n'
        'run.write_metrics(cfg.STAGE, {"dice": 0.5 + 0.1 * cfg.epochs, "loss": 1.0 / cfg.epochs})',
    ]), folder / "02_train.ipynb")
    nbformat.write(_notebook([
        'profile = "smoke"\nrun_dir = ""\nseed = 0\ndevice = "cpu"',
        _CONFIG_CELL.format(stage="03_infer", fields="    pass"),
        'run.write_metrics(cfg.STAGE, {"accuracy": 0.9 - 0.01 * cfg.seed, "accuracy_ci95": [0.8, 1.0]})\n'
        'run.write_headline(cfg.STAGE, "accuracy", 0.9 - 0.01 * cfg.seed, "chance", 0.5)',
    ]), folder / "03_infer.ipynb")
    nbformat.write(_notebook(["x = 1"]), folder / "notes.ipynb")  # not NN_*: never run
    return root


@pytest.fixture(scope="module")
def notebooks_dir(tmp_path_factory) -> Path:
    return make_demo_notebooks(tmp_path_factory.mktemp("notebooks"))


@pytest.fixture(scope="module")
def outputs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def success(notebooks_dir, outputs_dir):
    """One successful run, outputs located through NBSUPPORT_OUTPUTS (the default path of the runner)."""
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NBSUPPORT_OUTPUTS", str(outputs_dir))
        mp.delenv("NBSUPPORT_HEADLESS", raising=False)
        summary = run_systems([SYSTEM], "smoke", {"epochs": 2, "n_items": 4}, notebooks_dir=notebooks_dir,
                              log=lines.append)
        env_after = os.environ.get("NBSUPPORT_HEADLESS")
    return summary, lines, env_after


def test_successful_run_writes_executed_notebooks_html_and_records(success, outputs_dir):
    summary, lines, _ = success
    assert summary.ok, "\n".join(lines)
    run_dir = outputs_dir / "runs" / summary.run_id / SYSTEM
    assert summary.systems[0].run_dir == run_dir.resolve()
    for name in ("01_prepare", "02_train", "03_infer"):
        executed = nbformat.read(run_dir / f"{name}.ipynb", as_version=4)
        assert executed.metadata.papermill.parameters["run_dir"] == str(run_dir.resolve())
        assert executed.metadata.papermill.parameters["profile"] == "smoke"
        page = (run_dir / f"{name}.html").read_text(encoding="utf-8")
        assert re.search(r"<script[^>]+src=\"https?:", page) is None, f"{name}.html loads a script from the network"
    assert not (run_dir / "notes.ipynb").exists()

    configs = json.loads((run_dir / "config.json").read_text())
    assert list(configs) == ["01_prepare", "02_train", "03_infer"]
    assert configs["01_prepare"]["n_items"] == 4 and configs["02_train"]["epochs"] == 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["02_train"]["dice"] == pytest.approx(0.7)
    assert (run_dir / "figures" / "loss_curve.png").stat().st_size > 0

    status = json.loads((run_dir / "run_status.json").read_text())
    assert status["status"] == "ok" and status["profile"] == "smoke" and status["failure"] is None
    assert [nb["name"] for nb in status["notebooks"]] == ["01_prepare", "02_train", "03_infer"]
    assert status["params"] == {"epochs": 2, "n_items": 4}


def test_each_param_goes_only_to_the_notebooks_that_declare_it(success, outputs_dir):
    summary, _, _ = success
    run_dir = outputs_dir / "runs" / summary.run_id / SYSTEM
    given = {n: nbformat.read(run_dir / f"{n}.ipynb", as_version=4).metadata.papermill.parameters
             for n in ("01_prepare", "02_train", "03_infer")}
    assert "n_items" in given["01_prepare"] and "epochs" not in given["01_prepare"]
    assert "epochs" in given["02_train"] and "n_items" not in given["02_train"]
    assert set(given["03_infer"]) == {"profile", "run_dir"}


def test_kernel_gets_headless_env_and_runs_in_the_notebook_folder(success, outputs_dir, notebooks_dir):
    summary, _, env_after = success
    env = json.loads((outputs_dir / "runs" / summary.run_id / SYSTEM / "kernel_env.json").read_text())
    assert env["NBSUPPORT_HEADLESS"] == "1"
    assert Path(env["NBSUPPORT_OUTPUTS"]) == outputs_dir.resolve()
    assert Path(env["cwd"]) == (notebooks_dir / SYSTEM).resolve()
    assert env_after is None, "the runner must restore the caller's environment"


def test_progress_is_one_line_per_code_cell_without_cell_output(success):
    _, lines, _ = success
    train = [ln for ln in lines if ln.startswith("[demo_sys 02_train] cell ")]
    # parameters, injected parameters, config, fail check, figure
    assert [ln.split()[3] for ln in train] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
    assert all(" ok " in ln for ln in train)
    assert re.search(r"cell 4/5 ok \d+\.\ds  if cfg\.fail:", train[3])
    prepare = [ln for ln in lines if ln.startswith("[demo_sys 01_prepare] cell ")]
    assert len(prepare) == 4, "the empty code cell and the markdown cell are not reported"
    assert not any("prepared 4" in ln for ln in lines), "cell output is only streamed with verbose=True"
    assert any(ln.startswith("index: ") for ln in lines)


def test_index_lists_the_run_its_metrics_and_links(success, outputs_dir):
    summary, _, _ = success
    assert summary.index_path == outputs_dir.resolve() / "index.html"
    page = summary.index_path.read_text(encoding="utf-8")
    assert summary.run_id in page and SYSTEM in page
    assert "02_train.dice = 0.7" in page and "01_prepare.items = 8" in page
    assert "not a number" not in page
    for href in re.findall(r'(?:href|src)="([^"]+)"', page):
        assert not href.startswith(("http:", "https:", "/")), f"index link {href} is not relative"
        assert (outputs_dir / href).exists(), f"index links to missing {href}"
    assert f"runs/{summary.run_id}/{SYSTEM}/02_train.html" in page
    assert f"runs/{summary.run_id}/{SYSTEM}/figures/loss_curve.png" in page


def test_last_lines_give_each_system_its_status_and_wall_time_then_the_total(success):
    summary, lines, _ = success
    assert lines[-3] == f"run {summary.run_id}: all notebooks ok"
    system_line = re.fullmatch(r"  demo_sys  ok  +(\d+):(\d\d)", lines[-2])
    total_line = re.fullmatch(r"total (\d+):(\d\d)", lines[-1])
    assert system_line and total_line, lines[-3:]
    seconds = int(system_line[1]) * 60 + int(system_line[2])
    assert seconds == round(summary.systems[0].duration_s) > 0
    assert seconds <= int(total_line[1]) * 60 + int(total_line[2]) == round(summary.duration_s)
    status = json.loads((summary.systems[0].run_dir / "run_status.json").read_text())
    assert status["duration_s"] == summary.systems[0].duration_s


def test_durations_read_as_minutes_or_hours():
    assert [format_duration(s) for s in (0, 59.6, 275.4, 3599, 3725, None)] == [
        "0:00", "1:00", "4:35", "59:59", "1:02:05", "\u2013"]


def test_existing_run_id_is_an_error_and_nothing_is_overwritten(success, notebooks_dir, outputs_dir):
    summary, _, _ = success
    run_dir = outputs_dir / "runs" / summary.run_id / SYSTEM
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    with pytest.raises(RunExistsError, match=summary.run_id):
        run_systems([SYSTEM], "smoke", run_id=summary.run_id, notebooks_dir=notebooks_dir, outputs_dir=outputs_dir,
                     log=lambda _: None)
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_unknown_parameter_is_an_error_before_anything_runs(notebooks_dir, tmp_path):
    with pytest.raises(RunnerError) as err:
        run_systems([SYSTEM], "smoke", {"epochz": 3}, notebooks_dir=notebooks_dir, outputs_dir=tmp_path,
                    log=lambda _: None)
    message = str(err.value)
    assert "'epochz'" in message and "did you mean 'epochs'" in message
    assert "Allowed parameters: device, epochs, fail, n_items, seed" in message
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_runner_owned_parameters_unknown_system_and_kernel_are_errors(notebooks_dir, tmp_path):
    quiet = {"notebooks_dir": notebooks_dir, "outputs_dir": tmp_path, "log": lambda _: None}
    with pytest.raises(RunnerError, match="run_dir"):
        run_systems([SYSTEM], "smoke", {"run_dir": "/tmp/x"}, **quiet)
    with pytest.raises(RunnerError, match=r"no_such_system.*available: demo_sys"):
        run_systems(["no_such_system"], "smoke", **quiet)
    with pytest.raises(RunnerError, match="profile"):
        run_systems([SYSTEM], "huge", **quiet)
    with pytest.raises(RunnerError, match="ipykernel install"):
        run_systems([SYSTEM], "smoke", kernel="no-such-kernel-nbsupport-test", **quiet)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_notebook_without_run_dir_parameter_is_rejected(tmp_path):
    folder = tmp_path / "nbs" / "bad_sys"
    folder.mkdir(parents=True)
    nbformat.write(_notebook(['profile = "smoke"\nseed = 0', "print(1)"]), folder / "01_a.ipynb")
    with pytest.raises(RunnerError, match=r"01_a\.ipynb.*lacks run_dir"):
        run_systems(["all"], "smoke", notebooks_dir=tmp_path / "nbs", outputs_dir=tmp_path / "out", log=print)


def test_failing_cell_stops_the_run_and_is_reported(notebooks_dir, tmp_path, capsys):
    lines: list[str] = []
    summary = run_systems([SYSTEM], "smoke", {"fail": True}, run_id="will-fail", notebooks_dir=notebooks_dir,
                          outputs_dir=tmp_path, log=lines.append, verbose=True)
    assert not summary.ok
    failure = summary.failure
    assert (failure.notebook, failure.cell, failure.cells) == ("02_train", 4, 5)
    assert failure.ename == "RuntimeError" and "failure requested" in failure.evalue
    assert failure.source == "if cfg.fail:"
    report = "\n".join(lines)
    assert "[demo_sys 02_train] FAILED at cell 4/5 (In [4]): RuntimeError: failure requested" in report
    assert "[demo_sys 02_train] cell 4/5 FAILED" in report

    run_dir = tmp_path / "runs" / "will-fail" / SYSTEM
    partial = nbformat.read(run_dir / "02_train.ipynb", as_version=4)
    errors = [o for c in partial.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert [e.ename for e in errors] == ["RuntimeError"]
    assert any("papermill-error-cell-tag" in c.metadata.get("tags", []) for c in partial.cells)
    assert "RuntimeError" in (run_dir / "02_train.html").read_text(encoding="utf-8")
    assert not (run_dir / "03_infer.ipynb").exists(), "notebooks after a failure must not run"
    assert json.loads((run_dir / "metrics.json").read_text()) == {"01_prepare": {"items": 6, "note": "not a number"}}

    status = json.loads((run_dir / "run_status.json").read_text())
    assert status["status"] == "failed"
    assert status["failure"]["notebook"] == "02_train" and status["failure"]["cell"] == 4
    assert [(nb["name"], nb["status"]) for nb in status["notebooks"]] == [("01_prepare", "ok"), ("02_train", "failed")]
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    row = next(r for r in page.split("<tr") if "will-fail" in r)
    assert "status-failed" in row and "02_train cell 4/5" in row and "RuntimeError" in row

    assert "prepared 3" in capsys.readouterr().out, "verbose=True streams the cells' stdout"
    assert lines[-3] == "run will-fail: FAILED in demo_sys 02_train; later notebooks not run"
    assert re.fullmatch(r"  demo_sys  failed +\d+:\d\d", lines[-2]) and lines[-1].startswith("total ")


def _demo_reader_notebooks(root: Path) -> Path:
    """``root/prs_med/01_preprocess``: records whether the demo dataset was complete when the notebook started."""
    folder = root / "prs_med"
    folder.mkdir(parents=True)
    nbformat.write(_notebook([
        'profile = "smoke"\nrun_dir = ""\nseed = 0\ndata_root = ""',
        "import json, pathlib\nfrom nbsupport.paths import demo_data_root\nfrom nbsupport.runs import atomic_write_json\n"
        'marker = demo_data_root() / "prs_med" / "nbsupport_demo.json"\n'
        'seen = json.loads(marker.read_text()) if marker.exists() else {}\n'
        'atomic_write_json(pathlib.Path(run_dir) / "seen.json", {"complete": seen.get("complete", False)})',
    ]), folder / "01_preprocess.ipynb")
    return root


def test_missing_demo_data_is_written_before_the_notebooks_that_read_it(tmp_path, monkeypatch):
    """A fresh checkout: `nbsupport run prs_med --profile smoke` without `nbsupport demo-data` first."""
    notebooks = _demo_reader_notebooks(tmp_path / "nbs")
    monkeypatch.setenv("NBSUPPORT_DATA", str(tmp_path / "data"))
    quiet = {"notebooks_dir": notebooks, "outputs_dir": tmp_path / "out"}

    lines: list[str] = []
    summary = run_systems(["prs_med"], "smoke", run_id="fresh", log=lines.append, **quiet)
    assert summary.ok, "\n".join(lines)
    written = [ln for ln in lines if ln.startswith("prs_med: demo data missing at")]
    assert len(written) == 1 and "nbsupport demo-data prs_med --size smoke" in written[0]
    assert lines.index(written[0]) < next(i for i, ln in enumerate(lines) if ln.startswith("[prs_med 01_preprocess]"))
    assert json.loads((tmp_path / "out" / "runs" / "fresh" / "prs_med" / "seen.json").read_text()) == {"complete": True}
    marker = json.loads((tmp_path / "data" / "prs_med" / "nbsupport_demo.json").read_text())
    assert marker["complete"] and marker["params"]["n_train"] == 4, "the smoke size, for the smoke profile"

    lines.clear()
    assert run_systems(["prs_med"], "smoke", run_id="again", log=lines.append, **quiet).ok
    assert not [ln for ln in lines if "demo data" in ln], "a complete demo is used as it is"

    # With data_root given, the notebook reads the user's data: nothing is written.
    monkeypatch.setenv("NBSUPPORT_DATA", str(tmp_path / "data2"))
    lines.clear()
    assert run_systems(["prs_med"], "smoke", {"data_root": str(tmp_path / "mine")}, run_id="own", log=lines.append,
                       **quiet).ok
    assert not (tmp_path / "data2").exists() and not [ln for ln in lines if "demo data" in ln]


def test_concurrent_starts_get_distinct_run_folders(tmp_path):
    ids: list[str] = []
    errors: list[BaseException] = []

    def start(run_id: str | None) -> None:
        try:
            ids.append(create_run_folders(["a", "b"], run_id, tmp_path)[0])
        except BaseException as err:  # collected and checked below
            errors.append(err)

    threads = [threading.Thread(target=start, args=(None,)) for _ in range(8)]
    threads += [threading.Thread(target=start, args=("same",)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 9 and len(set(ids)) == 9 and ids.count("same") == 1
    assert len(errors) == 3 and all(isinstance(e, RunExistsError) for e in errors)
    assert all((tmp_path / i / s).is_dir() for i in ids for s in ("a", "b"))


def test_seeds_run_the_series_once_per_seed_and_summarise_the_spread(notebooks_dir, tmp_path):
    lines: list[str] = []
    series = run_seeds([SYSTEM], "smoke", [0, 2], {"epochs": 2}, run_id="series", notebooks_dir=notebooks_dir,
                       outputs_dir=tmp_path, log=lines.append)
    assert series.ok, "\n".join(lines)
    for seed in (0, 2):
        run_dir = tmp_path / "runs" / f"series-seed{seed}" / SYSTEM
        assert json.loads((run_dir / "config.json").read_text())["03_infer"]["seed"] == seed
    summary = json.loads((tmp_path / "seeds" / "series" / "seeds_summary.json").read_text())
    assert summary["seeds"] == [0, 2] and summary["complete"] and summary["runs"]["2"] == "runs/series-seed2"
    metrics = summary["systems"][SYSTEM]["metrics"]
    assert set(metrics) == {"02_train.dice", "02_train.loss", "03_infer.accuracy"}, "01 and the _ci95 left out"
    accuracy = metrics["03_infer.accuracy"]
    assert accuracy["mean"] == pytest.approx(0.89) and accuracy["sd"] == pytest.approx(0.02 ** 0.5 / 10)
    assert (accuracy["min"], accuracy["max"], accuracy["n"]) == (pytest.approx(0.88), pytest.approx(0.9), 2)
    assert metrics["02_train.dice"]["sd"] == 0.0
    assert summary["systems"][SYSTEM]["headline"]["metric"] == "accuracy"
    assert lines[-2] == f"  {SYSTEM}  accuracy 0.89 \u00b1 0.014 (0.88\u20130.9, n=2)"
    assert lines[-1].startswith("series total ")
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "Seed series" in page and "<b>0.89 \u00b1 0.014 (0.88\u20130.9, n=2)</b>" in page
    assert 'href="seeds/series/seeds_summary.json"' in page

    with pytest.raises(RunExistsError, match="series"):
        run_seeds([SYSTEM], "smoke", [0], run_id="series", notebooks_dir=notebooks_dir, outputs_dir=tmp_path)
    with pytest.raises(RunnerError, match="--seeds sets"):
        run_seeds([SYSTEM], "smoke", [0], {"seed": 3}, notebooks_dir=notebooks_dir, outputs_dir=tmp_path)
    with pytest.raises(RunnerError, match="distinct"):
        run_seeds([SYSTEM], "smoke", [1, 1], notebooks_dir=notebooks_dir, outputs_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["series-seed0", "series-seed2"]


# ---------------------------------------------------------------------------------------------- --jobs
_MEET_CELL = '''import json, os, time
from pathlib import Path
me, other = "{me}", "{other}"
shared = Path(shared)
(shared / me).write_text(os.environ.get("OMP_NUM_THREADS") or "unset")
deadline = time.monotonic() + 60
while other and not (shared / other).exists() and time.monotonic() < deadline:
    time.sleep(0.1)
met = bool(other) and (shared / other).exists()
Path(run_dir, "met.json").write_text(json.dumps({{"met": met, "omp": os.environ.get("OMP_NUM_THREADS")}}))
if fail:
    raise RuntimeError(me + " fails on request")
while wait_for_failure and json.loads(Path(wait_for_failure).read_text())["status"] != "failed":
    time.sleep(0.1)'''


def _meeting_notebooks(root: Path, pairs: dict[str, str]) -> Path:
    """One notebook per system that leaves a flag in ``shared`` and waits (up to 60 s) for the other system's flag:
    run one after another, the first system never meets the second."""
    for me, other in pairs.items():
        (root / me).mkdir(parents=True)
        nbformat.write(_notebook([
            'profile = "smoke"\nrun_dir = ""\nshared = ""\nfail = False\nwait_for_failure = ""',
            _MEET_CELL.format(me=me, other=other)]), root / me / "01_meet.ipynb")
    return root


def test_jobs_runs_systems_side_by_side_with_the_cores_shared(tmp_path, monkeypatch):
    from nbsupport.runner import kernel_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    notebooks = _meeting_notebooks(tmp_path / "nbs", {"left": "right", "right": "left"})
    (tmp_path / "shared").mkdir()
    lines: list[str] = []
    summary = run_systems(["left", "right"], "smoke", {"shared": str(tmp_path / "shared")}, notebooks_dir=notebooks,
                          outputs_dir=tmp_path / "out", log=lines.append, jobs=2)
    assert summary.ok, "\n".join(lines)
    for result in summary.systems:
        met = json.loads((result.run_dir / "met.json").read_text())
        assert met == {"met": True, "omp": str(kernel_threads(2))}, result.system
    assert "2 systems side by side" in lines[0] or any("2 systems side by side" in ln for ln in lines)
    assert [ln.split()[0] for ln in lines[-3:-1]] == ["left", "right"] and lines[-1].startswith("total ")
    assert "OMP_NUM_THREADS" not in os.environ, "the runner must restore the caller's environment"


def test_jobs_one_runs_in_order_and_a_user_thread_count_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    notebooks = _meeting_notebooks(tmp_path / "nbs", {"first": "second", "second": "first"})
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "second").write_text("pretend")  # lets `first` go on alone
    summary = run_systems(["first", "second"], "smoke", {"shared": str(tmp_path / "shared")},
                          notebooks_dir=notebooks, outputs_dir=tmp_path / "out", log=lambda _: None)
    assert summary.ok
    assert json.loads((summary.systems[0].run_dir / "met.json").read_text()) == {"met": True, "omp": "3"}


def test_jobs_a_failure_lets_the_running_system_finish_and_starts_no_other(tmp_path):
    notebooks = _meeting_notebooks(tmp_path / "nbs", {"bad": "good", "good": "bad", "later": ""})
    (tmp_path / "shared").mkdir()
    out = tmp_path / "out"
    # `good` finishes only once `bad` is recorded as failed, so `later` could start only if a failure did not stop
    # the queue.
    bad_status = out / "runs" / "r" / "bad" / "run_status.json"
    (notebooks / "bad" / "01_meet.ipynb").write_text(
        (notebooks / "bad" / "01_meet.ipynb").read_text().replace("fail = False", "fail = True"))
    lines: list[str] = []
    summary = run_systems(["bad", "good", "later"], "smoke",
                          {"shared": str(tmp_path / "shared"), "wait_for_failure": str(bad_status)},
                          run_id="r", notebooks_dir=notebooks, outputs_dir=out, log=lines.append, jobs=2)
    assert not summary.ok and summary.failure.system == "bad"
    assert [(s.system, s.status) for s in summary.systems] == [("bad", "failed"), ("good", "ok"),
                                                               ("later", "skipped")]
    assert json.loads((out / "runs" / "r" / "later" / "run_status.json").read_text())["status"] == "skipped"
    assert "FAILED in bad 01_meet" in "\n".join(lines)


def test_jobs_below_one_is_an_error(notebooks_dir, tmp_path):
    with pytest.raises(RunnerError, match="--jobs must be at least 1, got 0"):
        run_systems([SYSTEM], "smoke", notebooks_dir=notebooks_dir, outputs_dir=tmp_path, log=lambda _: None, jobs=0)
