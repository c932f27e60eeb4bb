"""``python -m nbsupport.launch`` that freezes at one chosen moment of a checkpoint write, for a test to SIGKILL.

Usage::

    python fault_trainer.py --phase PHASE --nth N --marker FILE -- <arguments of python -m nbsupport.launch>

The trainer runs normally until the N-th time it reaches PHASE (see ``PHASES``); there it writes ``FILE`` (a JSON
line saying where it stopped) and sleeps, so that the test's SIGKILL lands exactly at that point of the write.
Nothing else of the run is changed: the checkpoint code under test is the real one in ``nbsupport.checkpoints``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Where a write can be cut, in the order they happen in nbsupport.checkpoints.write_checkpoint.
PHASES = {
    "last_weights_half_written": "half of model.safetensors of a 'last' checkpoint is on disk",
    "last_state_half_written": "model.safetensors complete, half of training_state.pt on disk",
    "last_files_without_meta": "both files complete and fsynced, meta.json not yet written",
    "last_old_moved_aside": "the previous 'last' renamed to .last.old-*, the new one not yet in place",
    "last_swapped_before_cleanup": "new 'last' in place, the previous one still lying as .last.old-*",
    "best_files_without_meta": "model.safetensors of a 'best' checkpoint complete, meta.json not yet written",
    "best_old_moved_aside": "the previous 'best' renamed to .best.old-*, the new one not yet in place",
}
FROZEN_S = 300  # far longer than any test waits; the test kills the process first


def install(phase: str, nth: int, marker: Path) -> None:
    """Wrap the functions nbsupport.checkpoints calls so that the ``nth`` arrival at ``phase`` freezes the process."""
    import safetensors.torch
    import torch

    from nbsupport import checkpoints

    if phase not in PHASES:
        raise SystemExit(f"unknown phase {phase!r}; expected one of {sorted(PHASES)}")
    arrivals = {"n": 0}

    def arrive(where: str, **info: Any) -> bool:
        """True when this is the arrival to freeze at."""
        if where != phase:
            return False
        arrivals["n"] += 1
        return arrivals["n"] == nth

    def freeze(**info: Any) -> None:
        # temp + rename: the test polls for the marker and must never read it half-written
        partial = marker.with_name(marker.name + ".partial")
        partial.write_text(json.dumps({"phase": phase, "nth": nth, **info}) + "\n")
        partial.replace(marker)
        time.sleep(FROZEN_S)
        raise SystemExit("fault_trainer: not killed in time")

    def half_write(path: Path, payload: bytes, **info: Any) -> None:
        with open(path, "wb") as fh:
            fh.write(payload[: len(payload) // 2])
            fh.flush()
            os.fsync(fh.fileno())
        freeze(file=str(path), size=len(payload), **info)

    save_model = safetensors.torch.save_model

    def save_model_hooked(model: Any, filename: str, metadata: Any = None, **kwargs: Any) -> None:
        path = Path(filename)
        kind = "last" if path.parent.name.startswith(".last.tmp") else "best"
        if arrive(f"{kind}_weights_half_written"):
            save_model(model, filename, metadata=metadata, **kwargs)
            half_write(path, path.read_bytes(), step=metadata.get("step") if metadata else None)
        save_model(model, filename, metadata=metadata, **kwargs)

    torch_save = torch.save

    def torch_save_hooked(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(f, (str, os.PathLike)) and arrive("last_state_half_written"):
            buffer = io.BytesIO()
            torch_save(obj, buffer, *args, **kwargs)
            half_write(Path(f), buffer.getvalue(), step=obj["progress"]["step"])
        torch_save(obj, f, *args, **kwargs)

    write_json: Callable[..., Path] = checkpoints.atomic_write_json

    def write_json_hooked(path: Any, obj: Any, *args: Any, **kwargs: Any) -> Path:
        path = Path(path)
        if path.name == checkpoints.META_FILE:
            kind = "last" if path.parent.name.startswith(".last.tmp") else "best"
            if arrive(f"{kind}_files_without_meta"):
                freeze(step=obj.get("step"), folder=str(path.parent))
        return write_json(path, obj, *args, **kwargs)

    rename = os.rename

    def rename_hooked(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        rename(src, dst, *args, **kwargs)
        src, dst = Path(src), Path(dst)
        if src.name in ("last", "best") and dst.name.startswith(f".{src.name}.old-"):
            if arrive(f"{src.name}_old_moved_aside"):
                freeze(moved=str(dst))
        if dst.name == "last" and src.name.startswith(".last.tmp") and arrive("last_swapped_before_cleanup"):
            freeze(swapped=str(dst))

    safetensors.torch.save_model = save_model_hooked
    torch.save = torch_save_hooked
    checkpoints.atomic_write_json = write_json_hooked
    os.rename = rename_hooked


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", required=True, choices=sorted(PHASES))
    parser.add_argument("--nth", type=int, required=True, help="freeze at the nth arrival at the phase (1-based)")
    parser.add_argument("--marker", required=True, type=Path, help="file written when frozen")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then python -m nbsupport.launch arguments")
    args = parser.parse_args()
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    install(args.phase, args.nth, args.marker)
    from nbsupport.launch import main as train_main

    return train_main(train_args)


if __name__ == "__main__":
    sys.exit(main())
