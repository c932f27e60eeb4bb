"""Run a system's notebooks headless, in order, with papermill: the engine behind ``nbsupport run``.

For each selected system, ``notebooks/<system>/NN_*.ipynb`` run in name order into a new run folder
``outputs/runs/<run_id>/<system>/``, each as a fresh kernel (``--kernel``, default ``nbsupport``) started in the
notebook's own folder. Every notebook gets ``profile`` and ``run_dir`` plus those ``-p`` parameters its
``parameters`` cell declares; a ``-p`` name no selected notebook declares is an error before anything runs
(papermill itself only warns and runs with defaults). After each notebook the executed copy
``<run_dir>/NN_name.ipynb`` is exported to ``NN_name.html``; on the first failing cell the run stops, keeping
the partial notebook (with papermill's error banner) and its HTML. ``outputs/index.html`` is refreshed at
the end either way.

Per-cell progress comes from a papermill engine registered as ``nbsupport`` (``ProgressEngine``): it hooks the
execution manager's ``cell_start`` / ``cell_complete`` callbacks, which papermill calls around every cell, and
prints one line per code cell in this process. The kernel's own output is not printed unless ``verbose``.

The kernel inherits this process's environment, with ``NBSUPPORT_HEADLESS=1`` (static figures instead of
widgets, sparse progress bars) and ``NBSUPPORT_OUTPUTS`` set to the outputs folder of the run.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbsupport.config import PROFILES
from nbsupport.paths import project_root
from nbsupport.progress import LINE_PREFIX
from nbsupport.report import STATUS_FILE, export_notebook_html, write_index
from nbsupport.runs import RunExistsError, RunFolder, atomic_write_json, git_state, new_run_id, runs_root

ENGINE_NAME = "nbsupport"
NOTEBOOK_PATTERN = re.compile(r"^\d\d_[\w.-]+\.ipynb$")
RUNNER_PARAMETERS = ("profile", "run_dir")  # set by the runner itself, never through ``params``

Log = Callable[[str], None]


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


@dataclass
class RunSummary:
    """What ``run_systems`` did. ``ok`` is False when a notebook failed; ``failure`` says where."""

    run_id: str
    profile: str
    outputs_dir: Path
    systems: list[SystemResult]
    failure: CellFailure | None = None
    index_path: Path | None = None

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


# ---------------------------------------------------------------------------------------------- progress
def _first_line(source: str, width: int = 72) -> str:
    line = next((ln.strip() for ln in source.splitlines() if ln.strip()), "")
    return line if len(line) <= width else line[: width - 3] + "..."


class CellReporter:
    """Prints one line per executed code cell: ``[seg2d 02_train] cell 4/11 ok 12.3s  history = ...``.

    Attached to papermill's ``NotebookExecutionManager`` by ``ProgressEngine``; remembers the cell that was
    running when execution stopped, so a failure can name it even when the kernel died or timed out.
    """

    def __init__(self, system: str, notebook: str, log: Log):
        self.label = f"[{system} {notebook}]"
        self.log = log
        self.ordinal: dict[int, int] = {}
        self.total = 0
        self.current: int | None = None
        self.failed: int | None = None
        self._t0 = 0.0
        self._outer_exc: BaseException | None = None

    def attach(self, nb_man: Any) -> None:
        cells = nb_man.nb.cells
        # Empty code cells are skipped by nbclient; numbering only the others keeps "cell k" = "In [k]".
        code = [i for i, c in enumerate(cells) if c.get("cell_type") == "code" and c.get("source", "").strip()]
        self.ordinal = {index: k for k, index in enumerate(code, start=1)}
        self.total = len(code)
        self._outer_exc = sys.exc_info()[1]
        start, complete = nb_man.cell_start, nb_man.cell_complete

        def cell_start(cell: Any, cell_index: int | None = None, **kwargs: Any) -> Any:
            if cell_index in self.ordinal:
                self.current = cell_index
                self._t0 = time.monotonic()
            return start(cell, cell_index, **kwargs)

        def cell_complete(cell: Any, cell_index: int | None = None, **kwargs: Any) -> Any:
            result = complete(cell, cell_index, **kwargs)
            if cell_index in self.ordinal:
                self._report(cell, cell_index)
            return result

        # Instance attributes shadow the methods the notebook client calls around every cell.
        nb_man.cell_start = cell_start
        nb_man.cell_complete = cell_complete

    def _report(self, cell: Any, cell_index: int) -> None:
        elapsed = time.monotonic() - self._t0
        try:
            meta_failed = cell.get("metadata", {}).get("papermill", {}).get("status") == "failed"
            error_output = any(o.get("output_type") == "error" for o in cell.get("outputs", []))
            # Timeouts and dead kernels propagate as exceptions without marking the cell; we run in their `finally`.
            exc = sys.exc_info()[1]
            failed = meta_failed or error_output or (exc is not None and exc is not self._outer_exc)
            if failed:
                self.failed = cell_index
            status = "FAILED" if failed else "ok"
            self.log(f"{self.label} cell {self.ordinal[cell_index]}/{self.total} {status} {elapsed:.1f}s  "
                     f"{_first_line(cell.get('source', ''))}")
        except Exception as err:  # progress must never break a run
            self.log(f"{self.label} cell {self.ordinal.get(cell_index)}: (progress line failed: {err!r})")

    def failure_cell(self) -> int | None:
        """Ordinal of the failed cell, else of the one running when execution stopped (None: none started)."""
        index = self.failed if self.failed is not None else self.current
        return None if index is None else self.ordinal[index]


class KernelLog:
    """Where a notebook's output goes while it runs: all of it into ``<run folder>/<notebook>.log``, and the
    progress lines (:data:`nbsupport.progress.LINE_PREFIX`) to the console as they arrive, so a long training cell
    shows its step, loss and ETA in a terminal or a cluster's log file. ``verbose`` echoes everything."""

    def __init__(self, path: Path, label: str, log: Log, verbose: bool = False):
        self.file = open(path, "a", encoding="utf-8")
        self.label, self.log, self.verbose = label, log, verbose
        self.stdout, self.stderr = _KernelStream(self, sys.stdout), _KernelStream(self, sys.stderr)

    def close(self) -> None:
        self.file.close()


class _KernelStream:
    def __init__(self, owner: KernelLog, console: Any):
        self.owner, self.console, self._partial = owner, console, ""

    def write(self, text: str) -> None:
        owner = self.owner
        if owner.file.closed:
            return
        owner.file.write(text)
        owner.file.flush()
        if owner.verbose:
            self.console.write(text)
            self.console.flush()
            return
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            if line.startswith(LINE_PREFIX):
                owner.log(f"{owner.label} {line[len(LINE_PREFIX):]}")

    def flush(self) -> None:
        pass


def _curve_available() -> bool:
    try:
        import zmq
        from jupyter_client.manager import KernelManager
    except ImportError:  # pragma: no cover - both come with nbclient
        return False
    return zmq.has("curve") and KernelManager.class_traits().get("transport_encryption") is not None


def _register_engine() -> None:
    from papermill.engines import NBClientEngine, papermill_engines

    class ProgressEngine(NBClientEngine):
        """papermill's nbclient engine plus a ``cell_reporter`` keyword that reports each cell."""

        @classmethod
        def execute_managed_notebook(cls, nb_man: Any, kernel_name: str, cell_reporter: CellReporter | None = None,
                                     **kwargs: Any) -> Any:
            if cell_reporter is not None:
                cell_reporter.attach(nb_man)
            if "config" not in kwargs and _curve_available():
                # Encrypt kernel traffic where the kernelspec supports it (ipykernel >= 7 does): on a shared
                # cluster node other users can reach localhost ports; it also silences the kernel's warning.
                from traitlets.config import Config

                kwargs["config"] = Config({"KernelManager": {"transport_encryption": "auto"}})
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register(ENGINE_NAME, ProgressEngine)


# ---------------------------------------------------------------------------------------------- running
@contextlib.contextmanager
def kernel_environment(outputs_dir: Path) -> Iterator[None]:
    """Set the variables the kernel inherits for the duration of a run, then restore the old values."""
    changes = {"NBSUPPORT_HEADLESS": "1", "NBSUPPORT_OUTPUTS": str(outputs_dir)}
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
) -> RunSummary:
    """Execute each system's notebooks in order into ``<outputs>/runs/<run_id>/<system>/``.

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

    Returns:
        A ``RunSummary``; ``summary.ok`` is False and ``summary.failure`` names the notebook and cell when a
        cell raised. Notebooks after a failure (and systems after a failing one) are not run.

    Raises:
        RunnerError: before anything runs, for an unknown system, profile or parameter, or a missing kernel.
        RunExistsError: ``run_id`` exists.
    """
    params = dict(params or {})
    if profile not in PROFILES:
        raise RunnerError(f"--profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    outputs_dir = (Path(outputs_dir) if outputs_dir is not None else runs_root().parent).resolve()
    plan = plan_notebooks(systems, notebooks_dir)
    declared = {nb: notebook_parameters(nb) for nbs in plan.values() for nb in nbs}
    check_params(params, declared)
    check_kernel(kernel)
    _register_engine()

    run_id, folders = create_run_folders(list(plan), run_id, outputs_dir / "runs")
    summary = RunSummary(run_id=run_id, profile=profile, outputs_dir=outputs_dir,
                         systems=[SystemResult(s, folders[s].path) for s in plan])
    git = git_state()
    statuses = {s.system: _initial_status(s.system, run_id, profile, params, kernel, git) for s in summary.systems}
    for s in summary.systems:
        atomic_write_json(s.run_dir / STATUS_FILE, statuses[s.system])
    log(f"run {run_id} ({profile}): {', '.join(plan)} -> {outputs_dir / 'runs' / run_id}")

    current: SystemResult | None = None
    try:
        with kernel_environment(outputs_dir):
            for result in summary.systems:
                if summary.failure is not None:
                    result.status = "skipped"
                    _update_status(result, statuses[result.system])
                    continue
                current = result
                result.status = "running"
                started = time.monotonic()
                _update_status(result, statuses[result.system])
                for notebook in plan[result.system]:
                    nb_params = {"profile": profile, "run_dir": str(result.run_dir)}
                    nb_params.update({k: v for k, v in params.items() if k in declared[notebook]})
                    outcome = _run_notebook(result, notebook, nb_params, kernel, log, verbose, start_timeout,
                                            execution_timeout)
                    if isinstance(outcome, CellFailure):
                        summary.failure = outcome
                        result.status = "failed"
                        statuses[result.system]["failure"] = outcome.to_dict()
                        log(outcome.describe())
                        kept = result.notebooks[-1]
                        also = f" (and {kept.html.name})" if kept.html else ""
                        log(f"  partial notebook kept: {kept.ipynb}{also}")
                        break
                else:
                    result.status = "ok"
                statuses[result.system]["duration_s"] = round(time.monotonic() - started, 1)
                _update_status(result, statuses[result.system])
                current = None
    except BaseException:
        # Ctrl-C or an error of the runner itself: record it so the index does not show "running" forever.
        if current is not None:
            current.status = "interrupted"
            _update_status(current, statuses[current.system])
        raise
    finally:
        try:
            summary.index_path = write_index(outputs_dir)
            log(f"index: {summary.index_path}")
        except Exception as err:  # a broken index must not hide the run's own outcome
            log(f"could not write {outputs_dir / 'index.html'}: {type(err).__name__}: {err}")

    if summary.ok:
        log(f"run {run_id}: all notebooks ok")
    elif summary.failure is not None:
        failed = f"{summary.failure.system} {summary.failure.notebook}"
        log(f"run {run_id}: FAILED in {failed}; later notebooks not run")
    return summary


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
        failure = CellFailure(result.system, name, cell, reporter.total, _first_line(err.source), err.ename,
                              _first_line(str(err.evalue), 300), err.exec_count)
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
                              _first_line(str(err), 300))
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
        return _first_line(nbformat.read(ipynb, as_version=4).cells[cell_index].source)
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


def _initial_status(system: str, run_id: str, profile: str, params: Mapping[str, Any], kernel: str,
                    git: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "run_id": run_id, "system": system, "status": "pending", "profile": profile, "params": dict(params),
        "kernel": kernel, "git": dict(git), "command": sys.argv[:],
        "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "finished": None,
        "duration_s": None, "notebooks": [], "failure": None,
    }


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
