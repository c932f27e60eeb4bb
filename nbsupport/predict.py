"""Scoring a user's own files with a trained run: ``nbsupport predict <system> --run R -i INPUT [-o OUT]``.

Every system's ``pipeline.predict_files(checkpoint, inputs, out_dir, device=..., overwrite=..., **system_args)``
does the system-specific part: it reads the trained run's own preprocessing from the run folder (the configs the
run recorded), needs no manifest, and writes its outputs under ``out_dir``. This module holds what is the same for
all five: finding the checkpoint of a run folder, expanding inputs into files, a progress bar over them, carrying
on past a file that fails (named with its reason), and never overwriting an output unless asked.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from nbsupport.paths import resolve_path
from nbsupport.progress import progress
from nbsupport.runs import read_json


class PredictError(ValueError):
    """The inputs or the run cannot be used (nothing was written)."""


@dataclasses.dataclass
class PredictSummary:
    """What a ``predict_files`` call wrote and which inputs failed (with why)."""

    out_dir: Path
    written: list[Path] = dataclasses.field(default_factory=list)
    failed: list[tuple[Path, str]] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def lines(self) -> list[str]:
        out = [f"wrote {len(self.written)} file(s) under {self.out_dir}"]
        out += [f"FAILED {path}: {reason}" for path, reason in self.failed]
        return out


def training_run(run_or_checkpoint: str | os.PathLike) -> tuple[Path, Path]:
    """``(run folder, checkpoint folder)`` from a run folder (``outputs/runs/<id>/<system>``: its best checkpoint;
    the run folder itself where each training stage keeps its own checkpoints in a sub-folder) or from a checkpoint
    folder (``.../checkpoints/best``)."""
    path = resolve_path(run_or_checkpoint)
    if (path / "meta.json").is_file() and path.parent.name == "checkpoints":
        return path.parent.parent, path
    best = path / "checkpoints" / "best"
    if (best / "meta.json").is_file():
        return path, best
    last = path / "checkpoints" / "last"
    if (last / "meta.json").is_file():
        return path, last
    if any(path.glob("*/checkpoints/best/meta.json")):  # one checkpoint per stage (cxr_report: vision/, report/)
        return path, path
    raise PredictError(f"{path} is neither a trained run folder (holding checkpoints/best) nor a checkpoint folder; "
                       "pass --run outputs/runs/<run_id>/<system>")


def run_config(run_dir: Path, stage: str = "02_train") -> dict[str, Any]:
    """The config a stage of the run recorded (``config.json``): the preprocessing the model was trained with."""
    configs = read_json(run_dir / "config.json", {}) or {}
    if stage not in configs:
        raise PredictError(f"{run_dir / 'config.json'} has no {stage} entry: not a folder 02_train ran in")
    return configs[stage]


def expand_inputs(inputs: Sequence[str | os.PathLike], suffixes: Sequence[str],
                  series_folders: bool = False) -> list[Path]:
    """Files with one of ``suffixes`` (lower case, e.g. ``.png``, ``.nii.gz``) among ``inputs`` and, recursively,
    inside the folders among them. With ``series_folders`` a folder of DICOM files is one input (a series)."""
    found: list[Path] = []
    for item in inputs:
        path = resolve_path(item)
        if not path.exists():
            raise PredictError(f"input {path} does not exist")
        if path.is_file():
            found.append(path)
            continue
        if series_folders and _is_dicom_series(path):
            found.append(path)
            continue
        for child in sorted(path.rglob("*")):
            name = child.name.lower()
            if child.is_file() and any(name.endswith(s) for s in suffixes):
                found.append(child)
            elif series_folders and child.is_dir() and _is_dicom_series(child):
                found.append(child)
    if not found:
        raise PredictError(f"no input files ({', '.join(suffixes)}) in {', '.join(map(str, inputs))}")
    return found


def _is_dicom_series(folder: Path) -> bool:
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return len(files) > 1 and all(_has_dicom_preamble(p) for p in files[:3])


def _has_dicom_preamble(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(132)[128:132] == b"DICM"


def check_outputs_free(paths: Iterable[Path], overwrite: bool) -> None:
    """Refuse to overwrite: every existing path is named (unless ``overwrite``)."""
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        shown = ", ".join(map(str, existing[:5])) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        verb = "exists" if len(existing) == 1 else "exist"
        raise PredictError(f"{shown} already {verb}; choose another -o folder or pass --overwrite")


def for_each_input(files: Sequence[Path], predict_one: Callable[[Path], list[Path]], out_dir: Path,
                   desc: str = "predict") -> PredictSummary:
    """Run ``predict_one(file) -> written paths`` over ``files`` with a progress bar; a file that fails is
    recorded with its reason and the others go on."""
    summary = PredictSummary(out_dir)
    for path in progress(files, desc=desc):
        try:
            summary.written += predict_one(path)
        except PredictError:
            raise
        except Exception as err:  # one bad file must not stop the others; its reason is reported
            summary.failed.append((path, f"{type(err).__name__}: {err}"))
    return summary
