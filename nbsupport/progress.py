"""Progress bars that stay readable in a papermill log as well as in JupyterLab.

In a notebook with a live frontend (or a terminal) this is an ordinary tqdm bar. Headless (papermill, CI,
``nbsupport run``), a bar redrawn with carriage returns turns every refresh into a new log line
(papermill#765) and ``tqdm.auto`` may never advance (papermill#617), so there each refresh is one plain line,
at most every ``NBSUPPORT_PROGRESS_INTERVAL`` seconds (default 15), starting with :data:`LINE_PREFIX`::

    progress: train 120/480 [25%] 0.52 s/it, ETA 03:07 (loss=0.41, lr=0.002)

``nbsupport run`` picks these lines out of the kernel's output as they arrive and shows them on the console.
:class:`PhaseClock` adds up where a long loop's time goes (the training loop prints its summary as such a line).
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")
LINE_PREFIX = "progress: "


def is_headless() -> bool:
    """True under ``nbsupport run`` / the test-suite (``NBSUPPORT_HEADLESS=1``) or when stderr is not a TTY
    outside a kernel."""
    if os.environ.get("NBSUPPORT_HEADLESS") == "1":
        return True
    if "ipykernel" in sys.modules:
        return False
    return not sys.stderr.isatty()


class LineProgress(tqdm):
    """tqdm that writes each refresh as one whole line (no carriage returns, no bar), and the final count once."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if self.disable or msg == "":  # msg="": tqdm clearing its bar, which a line log has not drawn
            return True
        d = self.format_dict
        n, total = d["n"], d["total"]
        done = f"{n}/{total} [{100 * n / total:.0f}%]" if total else f"{n}"
        rate = d["rate"] or (n / d["elapsed"] if d["elapsed"] else None)
        speed = "" if not rate else (f" {rate:.2f} it/s" if rate >= 1 else f" {1 / rate:.2f} s/it")
        eta = f", ETA {self.format_interval((total - n) / rate)}" if rate and total else ""
        post = f" ({d['postfix']})" if d.get("postfix") else ""
        desc = f"{self.desc} " if self.desc else ""
        self.fp.write(f"{LINE_PREFIX}{desc}{done}{speed}{eta}{post}\n")
        self.fp.flush()
        self._shown_n = n
        return True

    def close(self) -> None:
        if not self.disable and getattr(self, "_shown_n", None) != self.n:
            self.display()
        self.leave = False  # tqdm's own last display and newline are not wanted
        super().close()


class _WholeLines:
    """A stream that passes on what tqdm writes except bare newlines and carriage returns."""

    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(text) if text.strip() else len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable[T] | None, desc: str = "", total: int | None = None, **kwargs: Any) -> "tqdm[T]":
    """tqdm over ``iterable`` with settings that read well headless."""
    if is_headless():
        interval = float(os.environ.get("NBSUPPORT_PROGRESS_INTERVAL", "15"))
        kwargs = {"mininterval": interval, "maxinterval": interval * 4, "file": _WholeLines(sys.stdout), **kwargs}
        return LineProgress(iterable, desc=desc, total=total, **kwargs)
    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, **kwargs)


class PhaseClock:
    """Wall seconds of the loop per phase: waiting for the data loader, the task's forward + loss, backward, the
    optimizer (clipping, step, schedule), evaluation, checkpoints, and the rest (loss reduction, logging, progress).

    Each :meth:`lap` charges the time since the previous one to a phase, so the phases add up to the loop's time.
    On a GPU the kernels run asynchronously: a phase then holds the host's time until it could go on, and work
    queued by one phase may be waited for in a later one (the split is exact on a CPU).
    """

    PHASES = ("data", "forward", "backward", "optimizer", "evaluation", "checkpoints", "other")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now

    def summary(self) -> str:
        """``train time 312 s: forward 101 s (32 %), backward 150 s (48 %), ...`` (phases of 0.5 s or more)."""
        total = sum(self.seconds.values())
        parts = [f"{name} {sec:.0f} s ({100 * sec / total:.0f} %)" for name, sec in self.seconds.items()
                 if sec >= 0.5]
        return f"train time {total:.0f} s: " + ", ".join(parts)
