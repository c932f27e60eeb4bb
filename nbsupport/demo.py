"""The folder a synthetic demo dataset is written into, marked so that it is reused, replaced or refused safely.

Every system's ``demo_data.write_demo_dataset(root, ...)`` starts with :func:`start_demo_folder` and ends with
:func:`finish_demo_folder`. The marker ``nbsupport_demo.json`` records the generator's arguments and whether the
write reached its end, so that

* a complete demo written with the same arguments is reused as it is (``start_demo_folder`` returns True);
* a demo written with other arguments, or one whose write was interrupted, is emptied and written again;
* a non-empty folder without the marker (somebody's real data) is never touched: that is an error.
"""
from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nbsupport.runs import atomic_write_json, read_json

DEMO_MARKER = "nbsupport_demo.json"


def read_demo_marker(root: Path) -> dict[str, Any] | None:
    """The marker of a demo folder, or None where ``root`` holds none."""
    return read_json(Path(root) / DEMO_MARKER)


def start_demo_folder(root: Path, params: Mapping[str, Any], required: Sequence[str] = ()) -> bool:
    """Make ``root`` ready for a demo dataset written with ``params``.

    Args:
        root: the dataset folder.
        params: the generator's arguments (JSON-ready), including a ``generator`` name and ``format_version``.
        required: files (relative to ``root``) that a complete demo has; a marker saying "complete" without them
            means the folder was changed since, and it is written again.

    Returns:
        True when ``root`` already holds that complete demo (write nothing); False when it is empty but for a
        marker saying "incomplete", ready to be written.

    Raises:
        FileExistsError: ``root`` is not empty and holds no marker, i.e. it is not a demo folder.
    """
    root = Path(root)
    if root.is_dir() and any(root.iterdir()):
        previous = read_demo_marker(root)
        if previous is None:
            raise FileExistsError(f"{root} is not empty and holds no {DEMO_MARKER}; write the demo into an empty "
                                  "folder (a demo folder is replaced when regenerated)")
        if (previous.get("params") == dict(params) and previous.get("complete")
                and all((root / name).exists() for name in required)):
            return True
        for stale in root.iterdir():
            if stale.name != DEMO_MARKER:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / DEMO_MARKER, {"params": dict(params), "complete": False})
    return False


def finish_demo_folder(root: Path, params: Mapping[str, Any], **summary: Any) -> None:
    """Mark the demo in ``root`` complete (call it after the last file is in place), with a JSON-ready summary."""
    atomic_write_json(Path(root) / DEMO_MARKER, {"params": dict(params), "complete": True, **summary})
