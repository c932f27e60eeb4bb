"""nbsupport's papermill engine: one progress line per executed code cell, the kernel's output into a log file.

papermill calls the execution manager's ``cell_start`` / ``cell_complete`` around every cell; ``ProgressEngine``
(registered as :data:`ENGINE_NAME`) hooks them through a :class:`CellReporter`, which prints
``[seg2d 02_train] cell 4/11 ok 12.3s  history = ...`` in this process and remembers where execution stopped.
:class:`KernelLog` takes the kernel's stdout/stderr: all of it into ``<run folder>/<notebook>.log``, and the
training loop's progress lines to the console. Used by :mod:`nbsupport.runner`.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nbsupport.progress import LINE_PREFIX

ENGINE_NAME = "nbsupport"

Log = Callable[[str], None]


def first_line(source: str, width: int = 72) -> str:
    """The first non-blank line of a cell's source (or an error message), cut to ``width`` characters."""
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
                     f"{first_line(cell.get('source', ''))}")
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


def register_engine() -> None:
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
