"""Reading published weight files and loading them into our networks, with one report line per load.

Every load of pretrained weights, in every system, goes through :func:`load_into` (a state dict from a file or
folder we read ourselves) or :func:`report_hf_load` (a Hugging Face ``from_pretrained``). Both print one line::

    /models/tinysam_42.3.pth: loaded 381 of 381 tensors (0 missing, 0 unexpected)

where the path is the file or folder the user gave, never a cache it was converted into. A tensor that is
missing, unexpected or of another shape is an error naming the tensors, unless the caller explicitly allows it
by name pattern (and then the allowed ones are listed in the line).

Files are read without running code: safetensors, or ``torch.load(weights_only=True)`` for the ``.pth`` /
``.bin`` / ``.pt`` files that published checkpoints still ship (SAM, TinySAM, torchvision, llm2vec4cxr).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

Log = Callable[[str], None]
TORCH_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
MAX_NAMED = 12  # tensors named per category in an error or report line


class WeightsMismatchError(ValueError):
    """A checkpoint's tensors do not fit the network: missing, unexpected or of another shape."""


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What one load did. ``loaded`` counts tensors copied into the network; ``expected`` its tensor count."""

    source: str
    loaded: int
    expected: int
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()  # "name: checkpoint (a, b) vs network (c, d)"

    def line(self) -> str:
        text = (f"{self.source}: loaded {self.loaded} of {self.expected} tensors "
                f"({len(self.missing)} missing, {len(self.unexpected)} unexpected")
        if self.mismatched:
            text += f", {len(self.mismatched)} of another shape"
        text += ")"
        for what, names in (("allowed missing", self.missing), ("allowed unexpected", self.unexpected)):
            if names:
                text += f"; {what}: {_names(names)}"
        return text


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_NAMED])
    return shown + (f" ... and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else "")


# ---------------------------------------------------------------------------------------------- reading
def read_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a weight file or folder, on the CPU, without running any code from it.

    Args:
        path: a ``.safetensors`` file; a ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` file (read with
            ``torch.load(weights_only=True)``); or a folder holding ``model.safetensors``, a sharded
            ``model.safetensors.index.json``, or ``pytorch_model.bin``.
        key: for a pickled file whose top level is a dict of containers (``{"model": {...}, "epoch": 3}``),
            the entry holding the tensors; None: the file itself must be a name -> tensor mapping.

    Raises:
        FileNotFoundError: nothing readable at ``path``.
        ValueError: the file holds pickled objects other than tensors and containers, or no tensors at ``key``.
    """
    path = Path(path)
    if path.is_dir():
        return read_state_dict(_weights_in_folder(path), key)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weight file")
    if path.name.endswith(".safetensors.index.json"):
        index = json.loads(path.read_text(encoding="utf-8"))
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(read_state_dict(path.parent / shard))
        return state
    if path.suffix == ".safetensors":
        import safetensors.torch

        return safetensors.torch.load_file(str(path), device="cpu")
    if path.suffix in TORCH_PICKLE_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError for foreign objects, RuntimeError for a damaged zip
            first = str(err).splitlines()[0] if str(err) else ""
            raise ValueError(f"{path}: cannot be read as tensors ({type(err).__name__}: {first}); only tensors, "
                             "numbers and containers are loaded (weights_only=True), never pickled objects") from err
        if key is not None:
            if not isinstance(obj, Mapping) or key not in obj:
                found = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
                raise ValueError(f"{path}: expected an entry {key!r} holding the tensors, found {found}")
            obj = obj[key]
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, Mapping) else {}
        if not tensors:
            raise ValueError(f"{path}: holds no name -> tensor mapping{f' under {key!r}' if key else ''}")
        return tensors
    raise ValueError(f"{path}: unknown weight file type {path.suffix!r}; expected .safetensors or one of "
                     f"{', '.join(TORCH_PICKLE_SUFFIXES)}")


def _weights_in_folder(folder: Path) -> Path:
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.iterdir())[:10]
    raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin "
                            f"(found: {', '.join(found) or 'nothing'})")


# ---------------------------------------------------------------------------------------------- loading
def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _checked_report(source: str | os.PathLike, what: str, expected: int, missing: Sequence[str],
                    unexpected: Sequence[str], mismatched: Sequence[str], allow_missing: Sequence[str],
                    allow_unexpected: Sequence[str], log: Log | None) -> LoadReport:
    """The report of one load, or the error naming every tensor that is wrong and not allowed."""
    bad_missing = [k for k in missing if not _matches(k, allow_missing)]
    bad_unexpected = [k for k in unexpected if not _matches(k, allow_unexpected)]
    if bad_missing or bad_unexpected or mismatched:
        problems = []
        if bad_missing:
            problems.append(f"{len(bad_missing)} missing: {_names(bad_missing)}")
        if bad_unexpected:
            problems.append(f"{len(bad_unexpected)} unexpected: {_names(bad_unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} of another shape: {_names(mismatched)}")
        raise WeightsMismatchError(f"{source}: does not fit {what} ({expected} tensors): " + "; ".join(problems))
    report = LoadReport(str(source), expected - len(missing), expected, tuple(missing), tuple(unexpected))
    if log is not None:
        log(report.line())
    return report


def load_into(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str | os.PathLike,
              allow_missing: Sequence[str] = (), allow_unexpected: Sequence[str] = (), log: Log | None = print,
              assign: bool = False) -> LoadReport:
    """Copy ``state_dict`` into ``module`` and print the one-line report.

    Args:
        module: the network (its parameters and persistent buffers are the expected tensors).
        state_dict: name -> tensor, already renamed to the network's names.
        source: the file or folder the user gave, named in the report and in errors.
        allow_missing / allow_unexpected: ``fnmatch`` patterns of tensor names that may be absent from the
            checkpoint (they keep their initialisation) or present without a place in the network (ignored).
        log: where the report line goes (``print``; None: nowhere).
        assign: ``load_state_dict(assign=True)``: take the checkpoint's tensors (e.g. into a meta-device network).

    Raises:
        WeightsMismatchError: naming every missing, unexpected or wrongly shaped tensor that is not allowed; the
            network is left untouched.
    """
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    mismatched = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs network {tuple(own[k].shape)}"
                        for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape))
    report = _checked_report(source, type(module).__name__, len(own), missing, unexpected, mismatched,
                             allow_missing, allow_unexpected, log=None)
    module.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False, assign=assign)
    if log is not None:
        log(report.line())
    return report


def report_hf_load(source: str | os.PathLike, model: torch.nn.Module, loading_info: Mapping[str, Any],
                   allow_missing: Sequence[str] = (), allow_unexpected: Sequence[str] = (),
                   log: Log | None = print) -> LoadReport:
    """The report of a ``from_pretrained(..., output_loading_info=True)``, with the same rules as :func:`load_into`.

    Args:
        source: the folder or hub id the user gave.
        model: the loaded model.
        loading_info: the dict ``from_pretrained`` returned (``missing_keys``, ``unexpected_keys``,
            ``mismatched_keys``).
    """
    mismatched = sorted(f"{m[0]}: checkpoint {tuple(m[1])} vs network {tuple(m[2])}" if isinstance(m, tuple)
                        else str(m) for m in (loading_info.get("mismatched_keys") or ()))
    return _checked_report(source, type(model).__name__, len(model.state_dict()),
                           sorted(loading_info.get("missing_keys") or ()),
                           sorted(loading_info.get("unexpected_keys") or ()), mismatched, allow_missing,
                           allow_unexpected, log)
