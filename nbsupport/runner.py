"""Run a system's notebooks headless, in order, with papermill: the engine behind ``nbsupport run``.

For each selected system, ``notebooks/<system>/NN_*.ipynb`` run in name order into a new run folder
``outputs/runs/<run_id>/<system>/``, each as a fresh kernel (``--kernel``, default ``nbsupport``) started in the
notebook's own folder. Every notebook gets ``profile`` and ``run_dir`` plus those ``-p`` parameters its
``parameters`` cell declares; a ``-p`` name no selected notebook declares is an error before anything runs
(papermill itself only warns and runs with defaults). After each notebook the executed copy
``<run_dir>/NN_name.ipynb`` is exported to ``NN_name.html``; on the first failing cell the run stops, keeping
the partial notebook (with papermill's error banner) and its HTML. ``outputs/index.html`` is refreshed at
the end either way.

Per-cell progress comes from the papermill engine of :mod:`nbsupport.notebook_engine`: one line per code cell in
this process. The kernel's own output is not printed unless ``verbose``. Before a system's notebooks its demo
dataset is written where the run would read it and it is missing; after the run, one line per system gives its
status and wall time, then the total.

The kernel inherits this process's environment, with ``NBSUPPORT_HEADLESS=1`` (static figures instead of
widgets, sparse progress bars) and ``NBSUPPORT_OUTPUTS`` set to the outputs folder of the run.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbsupport.config import PROFILES
from nbsupport.notebook_engine import ENGINE_NAME, CellReporter, KernelLog, Log, first_line, register_engine
from nbsupport.paths import project_root
from nbsupport.report import STATUS_FILE, export_notebook_html, write_index
from nbsupport.runs import RunExistsError, RunFolder, atomic_write_json, git_state, new_run_id, runs_root

NOTEBOOK_PATTERN = re.compile(r"^\d\d_[\w.-]+\.ipynb$")
RUNNER_PARAMETERS = ("profile", "run_dir")  # set by the runner itself, never through ``params``
PREPROCESS_NOTEBOOK = "01_preprocess"  # reads the demo dataset when no data_root is given (stages.PreprocessStage)


class RunnerError(ValueError):
    """A run cannot start: unknown system or parameter, malformed notebook, missing kernel."""


# ---------------------------------------------------------------------------------------------- results
@dataclass
class CellFailure:
    """Where and how a notebook failed; ``cell`` counts non-empty code cells from 1, as the progress lines do."""

    system: str
    notebook: str
    cell: int | None
    cells: int | None
    source: str
    ename: str
    evalue: str
    exec_count: int | None = None

    def describe(self) -> str:
        where = f"cell {self.cell}/{self.cells}" if self.cell is not None else "before the first cell"
        if self.exec_count is not None:
            where += f" (In [{self.exec_count}])"
        line = f"\n    {self.source}" if self.source else ""
        return f"[{self.system} {self.notebook}] FAILED at {where}: {self.ename}: {self.evalue}{line}"

    def to_dict(self) -> dict[str, Any]:
        return {"notebook": self.notebook, "cell": self.cell, "cells": self.cells, "exec_count": self.exec_count,
                "source": self.source, "ename": self.ename, "evalue": self.evalue}


@dataclass
class NotebookResult:
    name: str
    status: str  # ok | failed | interrupted
    duration_s: float
    ipynb: Path
    html: Path | None


@dataclass
class SystemResult:
    system: str
    run_dir: Path
    status: str = "pending"  # pending | running | ok | failed | interrupted | skipped
    notebooks: list[NotebookResult] = field(default_factory=list)
    duration_s: float | None = None  # wall time of the system, its demo data included; None: it did not run


@dataclass
class RunSummary:
    """What ``run_systems`` did. ``ok`` is False when a notebook failed; ``failure`` says where."""

    run_id: str
    profile: str
    outputs_dir: Path
    systems: list[SystemResult]
    failure: CellFailure | None = None
    index_path: Path | None = None
    duration_s: float | None = None  # wall time from the first system's start to the index written

    @property
    def ok(self) -> bool:
        return self.failure is None and all(s.status == "ok" for s in self.systems)


# ---------------------------------------------------------------------------------------------- planning
def available_systems(notebooks_dir: str | os.PathLike | None = None) -> list[str]:
    """Subfolders of the notebooks folder that hold ``NN_*.ipynb`` notebooks."""
    root = Path(notebooks_dir) if notebooks_dir is not None else project_root() / "notebooks"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _system_notebooks(p))


def _system_notebooks(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and NOTEBOOK_PATTERN.match(p.name))


def plan_notebooks(systems: Sequence[str], notebooks_dir: str | os.PathLike | None = None) -> dict[str, list[Path]]:
    """System name -> its notebooks in run order; ``["all"]`` selects every system with notebooks.

    Raises:
        RunnerError: naming an unknown system and the available ones.
    """
    root = Path(notebooks_dir) if notebooks_dir is not None else project_root() / "notebooks"
    available = available_systems(root)
    if not systems:
        raise RunnerError(f"no system given; available under {root}: {', '.join(available) or 'none'}")
    selected = available if list(systems) == ["all"] else list(dict.fromkeys(systems))
    unknown = [s for s in selected if s not in available]
    if unknown or not selected:
        raise RunnerError(
            f"no notebooks for system(s) {', '.join(unknown) or '(none)'} under {root} "
            f"(expected {root}/<system>/NN_name.ipynb); available: {', '.join(available) or 'none'}"
        )
    return {s: _system_notebooks(root / s) for s in selected}


def notebook_parameters(notebook: Path) -> dict[str, Any]:
    """The names (and papermill's inferred defaults) of a notebook's ``parameters`` cell.

    Raises:
        RunnerError: the notebook has no ``parameters``-tagged cell or lacks ``profile`` / ``run_dir``.
    """
    import papermill

    try:
        params = papermill.inspect_notebook(str(notebook))
    except Exception as err:  # papermill raises plain ValueError/KeyError for malformed notebooks
        raise RunnerError(f"{notebook}: cannot read its parameters cell ({type(err).__name__}: {err})") from err
    if not params:
        raise RunnerError(f"{notebook}: no cell tagged 'parameters' (or it assigns nothing); "
                          "cell 1 must be the parameters cell")
    missing = [p for p in RUNNER_PARAMETERS if p not in params]
    if missing:
        raise RunnerError(f"{notebook}: its parameters cell lacks {', '.join(missing)}; every notebook must declare "
                          f"{' and '.join(RUNNER_PARAMETERS)} so the runner can point it at the run folder")
    return params


def check_params(params: Mapping[str, Any], declared: Mapping[Path, Mapping[str, Any]]) -> None:
    """Every ``params`` name must be declared by at least one selected notebook.

    Raises:
        RunnerError: listing the unknown names and the allowed ones.
    """
    reserved = [n for n in params if n in RUNNER_PARAMETERS]
    if reserved:
        raise RunnerError(f"parameter(s) {', '.join(reserved)} are set by the runner: use --profile, and the run "
                          "folder is outputs/runs/<run_id>/<system> (choose the id with --run-id)")
    allowed = sorted({name for names in declared.values() for name in names} - set(RUNNER_PARAMETERS))
    unknown = sorted(n for n in params if n not in allowed)
    if unknown:
        import difflib

        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, allowed, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise RunnerError(f"unknown parameter(s) {', '.join(hints)}: no selected notebook declares them.\n"
                          f"Allowed parameters: {', '.join(allowed)}")


def check_kernel(kernel: str) -> None:
    """Raises RunnerError, with the install command, when no Jupyter kernel named ``kernel`` exists."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(kernel)
    except NoSuchKernel as err:
        raise RunnerError(
            f"no Jupyter kernel named {kernel!r}. Register this environment's Python as that kernel with\n"
            f"  {sys.executable} -m ipykernel install --prefix {sys.prefix} --name {kernel} "
            f'--display-name "Python ({kernel})"\n(`make setup` does this), or pass --kernel NAME '
            "(see `jupyter kernelspec list`)"
        ) from err


def create_run_folders(systems: Sequence[str], run_id: str | None = None,
                       runs_dir: str | os.PathLike | None = None) -> tuple[str, dict[str, RunFolder]]:
    """Claim ``<runs_dir>/<run_id>/`` and create one folder per system inside it.

    The claim is a single ``mkdir``, so two runs started at the same moment never share a folder: a given
    ``run_id`` that exists is an error, a generated one is drawn again.

    Raises:
        RunExistsError: ``run_id`` was given and ``<runs_dir>/<run_id>`` exists.
    """
    runs_dir = Path(runs_dir) if runs_dir is not None else runs_root()
    runs_dir.mkdir(parents=True, exist_ok=True)
    if run_id is not None:
        if not run_id or "/" in run_id or run_id.startswith(".") or run_id != run_id.strip():
            raise RunnerError(f"--run-id {run_id!r} must be a plain folder name")
        try:
            (runs_dir / run_id).mkdir()
        except FileExistsError as err:
            raise RunExistsError(f"run {runs_dir / run_id} already exists and is never overwritten; "
                                 "choose another --run-id (or leave it out for a fresh one)") from err
    else:
        for _ in range(100):
            run_id = new_run_id()
            try:
                (runs_dir / run_id).mkdir()
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - 100 collisions of 24 random bits within one second
            raise RunExistsError(f"could not draw a free run id under {runs_dir}")
    return run_id, {s: RunFolder.create(s, run_id, root=runs_dir) for s in systems}


# ---------------------------------------------------------------------------------------------- running
def kernel_threads(jobs: int) -> int:
    """OpenMP threads per kernel when ``jobs`` systems run side by side: this process's cores shared evenly.

    At the demo's sizes one thread per system beats two threads per system one after another: the models' steps
    gain little from a second thread (benchmarks/RESULTS.md), two systems on two cores gain nearly 2x.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // jobs)


@contextlib.contextmanager
def kernel_environment(outputs_dir: Path, threads: int | None = None) -> Iterator[None]:
    """Set the variables the kernel inherits for the duration of a run, then restore the old values.

    ``threads`` sets ``OMP_NUM_THREADS`` (torch's intra-op threads) for the kernels, unless the user set it.
    """
    changes = {"NBSUPPORT_HEADLESS": "1", "NBSUPPORT_OUTPUTS": str(outputs_dir)}
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:
        changes["OMP_NUM_THREADS"] = str(threads)
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass(frozen=True)
class _RunOptions:
    """How every notebook of a run is executed (the arguments of ``run_systems`` past the plan)."""

    profile: str
    params: Mapping[str, Any]
    kernel: str
    log: Log
    verbose: bool
    start_timeout: int
    execution_timeout: int | None


def check_run(systems: Sequence[str], profile: str, params: Mapping[str, Any], kernel: str = "nbsupport",
              notebooks_dir: str | os.PathLike | None = None) -> tuple[dict[str, list[Path]], dict[Path, Any]]:
    """Everything ``run_systems`` checks before it creates a folder: the profile, the systems, each notebook's
    parameters cell, the ``params`` names and the kernel. Returns the plan and each notebook's declared parameters.

    Raises:
        RunnerError: naming what is wrong and what is allowed.
    """
    if profile not in PROFILES:
        raise RunnerError(f"--profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    plan = plan_notebooks(systems, notebooks_dir)
    declared = {nb: notebook_parameters(nb) for nbs in plan.values() for nb in nbs}
    check_params(params, declared)
    check_kernel(kernel)
    return plan, declared


def run_systems(
    systems: Sequence[str],
    profile: str,
    params: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    kernel: str = "nbsupport",
    notebooks_dir: str | os.PathLike | None = None,
    outputs_dir: str | os.PathLike | None = None,
    log: Log = print,
    verbose: bool = False,
    start_timeout: int = 120,
    execution_timeout: int | None = None,
    jobs: int = 1,
) -> RunSummary:
    """Execute each system's notebooks in order into ``<outputs>/runs/<run_id>/<system>/``.

    A system's missing demo dataset is written before its notebooks (:func:`nbsupport.cli.ensure_demo_data`); the
    last lines give each system's status and wall time, and the total (:func:`time_table`).

    Args:
        systems: system names (folders of ``notebooks_dir``), or ``["all"]``.
        profile: ``smoke`` / ``demo`` / ``full``, passed to every notebook.
        params: extra notebook parameters (name -> literal); each goes to the notebooks that declare it.
        run_id: the run folder's name; default: a fresh ``YYYYmmdd-HHMMSS-xxxxxx``. An existing one is an error.
        kernel: Jupyter kernel name the notebooks run on.
        notebooks_dir: folder holding ``<system>/NN_*.ipynb``; default ``<project>/notebooks``.
        outputs_dir: folder holding ``runs/`` and ``index.html``; default ``$NBSUPPORT_OUTPUTS`` or
            ``<project>/outputs``.
        log: where progress lines go.
        verbose: also stream the cells' stdout/stderr.
        start_timeout: seconds to wait for a kernel to start (raise on slow shared filesystems).
        execution_timeout: seconds one cell may run; default: no limit.
        jobs: systems run side by side (each system's notebooks still in order), each kernel with
            :func:`kernel_threads` OpenMP threads unless ``OMP_NUM_THREADS`` is set. Systems start in the order
            given, the next one whenever one finishes.

    Returns:
        A ``RunSummary``; ``summary.ok`` is False and ``summary.failure`` names the notebook and cell when a
        cell raised. Notebooks after a failure (and systems not yet started when one fails) are not run.

    Raises:
        RunnerError: before anything runs, for an unknown system, profile or parameter, or a missing kernel.
        RunExistsError: ``run_id`` exists.
    """
    params = dict(params or {})
    if jobs < 1:
        raise RunnerError(f"--jobs must be at least 1, got {jobs}")
    plan, declared = check_run(systems, profile, params, kernel, notebooks_dir)
    outputs_dir = (Path(outputs_dir) if outputs_dir is not None else runs_root().parent).resolve()
    register_engine()
    options = _RunOptions(profile, params, kernel, log, verbose, start_timeout, execution_timeout)

    run_id, folders = create_run_folders(list(plan), run_id, outputs_dir / "runs")
    summary = RunSummary(run_id=run_id, profile=profile, outputs_dir=outputs_dir,
                         systems=[SystemResult(s, folders[s].path) for s in plan])
    statuses = _initial_statuses(summary, params, kernel)
    log(f"run {run_id} ({profile}): {', '.join(plan)} -> {outputs_dir / 'runs' / run_id}")

    threads = kernel_threads(jobs) if jobs > 1 else None
    if threads is not None:
        log(f"{jobs} systems side by side, {os.environ.get('OMP_NUM_THREADS') or threads} OpenMP thread(s) per kernel")
    started = time.monotonic()
    running: set[str] = set()
    try:
        with kernel_environment(outputs_dir, threads):
            _run_queue(summary, plan, declared, options, statuses, jobs, running)
    except BaseException:
        # Ctrl-C or an error of the runner itself: record it so the index does not show "running" forever.
        for result in summary.systems:
            if result.system in running:
                result.status = "interrupted"
                _update_status(result, statuses[result.system])
        raise
    finally:
        summary.duration_s = round(time.monotonic() - started, 1)
        try:
            summary.index_path = write_index(outputs_dir)
            log(f"index: {summary.index_path}")
        except Exception as err:  # a broken index must not hide the run's own outcome
            log(f"could not write {outputs_dir / 'index.html'}: {type(err).__name__}: {err}")

    for line in outcome_lines(summary):
        log(line)
    return summary


def _run_queue(summary: RunSummary, plan: Mapping[str, Sequence[Path]], declared: Mapping[Path, Mapping[str, Any]],
               options: _RunOptions, statuses: Mapping[str, dict[str, Any]], jobs: int, running: set[str]) -> None:
    """Run the systems in order, ``jobs`` at a time (``1``: in this thread); ``running`` names those under way.

    After a failure no further system starts (those under way finish) and the rest are marked skipped; the first
    failure is the run's. A worker thread's own error (not a notebook's) is raised here once the others are done.
    """
    waiting = list(summary.systems)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        while True:
            with lock:
                if not waiting or summary.failure is not None or errors:
                    return
                result = waiting.pop(0)
                running.add(result.system)
            try:
                failure = _run_system(result, plan[result.system], declared, options, statuses[result.system])
            except BaseException as err:
                if jobs == 1:
                    raise
                with lock:
                    errors.append(err)
                return
            with lock:
                running.discard(result.system)
                if failure is not None and summary.failure is None:
                    summary.failure = failure

    if jobs == 1:
        work()
    else:
        workers = [threading.Thread(target=work, name=f"nbsupport-run-{k}", daemon=True)
                   for k in range(min(jobs, len(waiting)))]
        for worker in workers:
            worker.start()
        for worker in workers:
            while worker.is_alive():  # a timed join lets Ctrl-C reach this thread
                worker.join(0.5)
        if errors:
            raise errors[0]
    for result in waiting:
        result.status = "skipped"
        _update_status(result, statuses[result.system])


def _run_system(result: SystemResult, notebooks: Sequence[Path], declared: Mapping[Path, Mapping[str, Any]],
                options: _RunOptions, status: dict[str, Any]) -> CellFailure | None:
    """One system's notebooks in order into ``result.run_dir`` (its demo data first, where it is missing);
    records the outcome in ``result`` and its ``run_status.json``. Returns the failure that stopped it, if any."""
    result.status = "running"
    started = time.monotonic()
    _update_status(result, status)
    failure = _demo_data_failure(result, notebooks, declared, options)
    for notebook in notebooks if failure is None else ():
        nb_params = {"profile": options.profile, "run_dir": str(result.run_dir)}
        nb_params.update({k: v for k, v in options.params.items() if k in declared[notebook]})
        outcome = _run_notebook(result, notebook, nb_params, options.kernel, options.log, options.verbose,
                                options.start_timeout, options.execution_timeout)
        if isinstance(outcome, CellFailure):
            failure = outcome
            kept = result.notebooks[-1]
            also = f" (and {kept.html.name})" if kept.html else ""
            options.log(outcome.describe())
            options.log(f"  partial notebook kept: {kept.ipynb}{also}")
            break
    result.status = "ok" if failure is None else "failed"
    if failure is not None:
        status["failure"] = failure.to_dict()
    result.duration_s = status["duration_s"] = round(time.monotonic() - started, 1)
    _update_status(result, status)
    return failure


def _demo_data_failure(result: SystemResult, notebooks: Sequence[Path], declared: Mapping[Path, Mapping[str, Any]],
                       options: _RunOptions) -> CellFailure | None:
    """Write the system's demo dataset before its notebooks when ``01_preprocess`` would read it (no ``data_root``
    given) and it is missing; a write that fails stops the system like a failing cell, naming the command."""
    from nbsupport.cli import ensure_demo_data

    reads_demo = any(nb.stem == PREPROCESS_NOTEBOOK and "data_root" in declared[nb] for nb in notebooks)
    if not reads_demo or options.params.get("data_root"):
        return None
    try:
        ensure_demo_data(result.system, options.profile, log=options.log)
    except Exception as err:  # the notebook would stop on the missing files anyway; say why here instead
        failure = CellFailure(result.system, "demo-data", None, None, f"nbsupport demo-data {result.system}",
                              type(err).__name__, first_line(str(err), 300))
        options.log(failure.describe())
        return failure
    return None


def format_duration(seconds: float | None) -> str:
    """``275.4`` -> ``4:35``, ``3725`` -> ``1:02:05``; None (a system that never ran) -> ``–``."""
    if seconds is None:
        return "\u2013"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def outcome_lines(summary: RunSummary) -> list[str]:
    """The run's last lines: whether it passed (or where it failed), then :func:`time_table`."""
    if summary.ok:
        verdict = f"run {summary.run_id}: all notebooks ok"
    elif summary.failure is not None:
        failed = f"{summary.failure.system} {summary.failure.notebook}"
        verdict = f"run {summary.run_id}: FAILED in {failed}; later notebooks not run"
    else:  # pragma: no cover - a system not ok without a failure was interrupted, which raises instead
        verdict = f"run {summary.run_id}: not complete"
    return [verdict, *time_table(summary)]


def time_table(summary: RunSummary) -> list[str]:
    """The run's last lines: each system's status and wall time (its demo data, kernels and notebooks), then the
    run's total, e.g. ``  seg2d      ok      4:35`` ... ``total 21:04``."""
    name_width = max((len(s.system) for s in summary.systems), default=0)
    status_width = max((len(s.status) for s in summary.systems), default=0)
    lines = [f"  {s.system:<{name_width}}  {s.status:<{status_width}}  {format_duration(s.duration_s):>7}"
             for s in summary.systems]
    return lines + [f"total {format_duration(summary.duration_s)}"]


def _run_notebook(result: SystemResult, notebook: Path, nb_params: dict[str, Any], kernel: str, log: Log,
                  verbose: bool, start_timeout: int, execution_timeout: int | None) -> NotebookResult | CellFailure:
    """Execute one notebook into ``result.run_dir`` and export its HTML; a failing cell returns a CellFailure."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    name = notebook.stem
    out_ipynb = result.run_dir / notebook.name
    reporter = CellReporter(result.system, name, log)
    log(f"[{result.system} {name}] start ({kernel} kernel, cwd {notebook.parent})")
    started = time.monotonic()
    failure: CellFailure | None = None
    status = "ok"
    kernel_log = KernelLog(result.run_dir / f"{name}.log", f"[{result.system} {name}]", log, verbose)
    try:
        papermill.execute_notebook(
            str(notebook), str(out_ipynb), parameters=nb_params, kernel_name=kernel, cwd=str(notebook.parent),
            engine_name=ENGINE_NAME, cell_reporter=reporter, log_output=False, progress_bar=False,
            start_timeout=start_timeout, execution_timeout=execution_timeout,
            stdout_file=kernel_log.stdout, stderr_file=kernel_log.stderr,
        )
    except PapermillExecutionError as err:
        status = "failed"
        cell = reporter.failure_cell()
        failure = CellFailure(result.system, name, cell, reporter.total, first_line(err.source), err.ename,
                              first_line(str(err.evalue), 300), err.exec_count)
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except Exception as err:  # dead kernel (OOM), cell timeout, kernel that never started
        status = "failed"
        cell = reporter.failure_cell()
        source = ""
        if out_ipynb.exists() and reporter.current is not None:
            source = _source_of(out_ipynb, reporter.current)
        failure = CellFailure(result.system, name, cell, reporter.total or None, source, type(err).__name__,
                              first_line(str(err), 300))
    finally:
        kernel_log.close()
        html = _export(out_ipynb, log)
        result.notebooks.append(NotebookResult(name, status, round(time.monotonic() - started, 1), out_ipynb, html))
    if failure is None:
        log(f"[{result.system} {name}] done in {result.notebooks[-1].duration_s:.1f}s -> {html or out_ipynb}")
        return result.notebooks[-1]
    return failure


def _source_of(ipynb: Path, cell_index: int) -> str:
    import nbformat

    try:
        return first_line(nbformat.read(ipynb, as_version=4).cells[cell_index].source)
    except Exception:  # the partial notebook may be unreadable; the failure message does without the line
        return ""


def _export(ipynb: Path, log: Log) -> Path | None:
    if not ipynb.exists():
        return None
    try:
        return export_notebook_html(ipynb)
    except Exception as err:  # the executed .ipynb is the record; its HTML is a convenience
        log(f"could not export {ipynb} to HTML: {type(err).__name__}: {err}")
        return None


def _initial_statuses(summary: RunSummary, params: Mapping[str, Any], kernel: str) -> dict[str, dict[str, Any]]:
    """Write each system's ``run_status.json`` as "pending" (what the index shows until it runs); system -> status."""
    git = git_state()
    statuses = {}
    for result in summary.systems:
        statuses[result.system] = {
            "run_id": summary.run_id, "system": result.system, "status": "pending", "profile": summary.profile,
            "params": dict(params), "kernel": kernel, "git": dict(git), "command": sys.argv[:],
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "finished": None,
            "duration_s": None, "notebooks": [], "failure": None,
        }
        atomic_write_json(result.run_dir / STATUS_FILE, statuses[result.system])
    return statuses


def _update_status(result: SystemResult, status: dict[str, Any]) -> None:
    status["status"] = result.status
    status["notebooks"] = [
        {"name": nb.name, "status": nb.status, "duration_s": nb.duration_s, "ipynb": nb.ipynb.name,
         "html": nb.html.name if nb.html else None}
        for nb in result.notebooks
    ]
    if result.status not in ("pending", "running"):
        status["finished"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    atomic_write_json(result.run_dir / STATUS_FILE, status)
