"""Progress bars that stay readable in a papermill log as well as in JupyterLab.

In a notebook with a live frontend (or a terminal) this is an ordinary tqdm bar. Headless (papermill, CI,
``nbsupport run``), a bar redrawn with carriage returns turns every refresh into a new log line
(papermill#765) and ``tqdm.auto`` may never advance (papermill#617), so there we use plain tqdm in ASCII that
refreshes at most every ``NBSUPPORT_PROGRESS_INTERVAL`` seconds (default 15): a few readable lines per loop.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def is_headless() -> bool:
    """True under ``nbsupport run`` / the test-suite (``NBSUPPORT_HEADLESS=1``) or when stderr is not a TTY
    outside a kernel."""
    if os.environ.get("NBSUPPORT_HEADLESS") == "1":
        return True
    if "ipykernel" in sys.modules:
        return False
    return not sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None, **kwargs: Any) -> "tqdm[T]":
    """tqdm over ``iterable`` with settings that read well headless."""
    if is_headless():
        interval = float(os.environ.get("NBSUPPORT_PROGRESS_INTERVAL", "15"))
        kwargs = {"ascii": True, "mininterval": interval, "maxinterval": interval * 4, "ncols": 100,
                  "file": sys.stdout, **kwargs}
    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=not is_headless(), **kwargs)
