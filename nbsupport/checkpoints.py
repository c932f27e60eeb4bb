"""Checkpoint storage: crash-safe checkpoint folders, their ``meta.json``, weights and RNG states.

A checkpoint folder holds ``model.safetensors``, ``meta.json`` and (for ``last``) ``training_state.pt``. It is
written into ``checkpoints/.<name>.tmp-*``, every file fsynced, ``meta.json`` last, then renamed into place; a
folder whose ``meta.json`` is missing or whose files do not have the sizes it lists is never loaded. The training
loop (:mod:`nbsupport.train`) writes them; :func:`load_weights` and :func:`load_model` read them back.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import random
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import safetensors.torch
import torch
from accelerate.utils import set_seed

from nbsupport.runs import atomic_write_json, read_json

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "nbsupport.train/1"  # the format name checkpoints carry since the first release; do not change
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
META_FILE = "meta.json"
SPEC_FILE = "model_spec.json"  # in the training run folder, next to checkpoints/


def write_checkpoint(target: Path, meta: dict[str, Any], write_files: Any) -> None:
    """Write a checkpoint directory crash-safely: temp dir, fsync, ``meta.json`` last, rename into place.

    A kill at any point leaves ``target`` either as it was or complete; at worst a complete ``.<name>.*``
    leftover that :func:`find_resumable` also accepts.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    write_files(tmp)
    files = {}
    for path in sorted(tmp.iterdir()):
        _fsync(path)
        files[path.name] = path.stat().st_size
    meta = {"format": CHECKPOINT_FORMAT, **meta, "files": files,
            "time": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    atomic_write_json(tmp / META_FILE, meta)  # last: its presence (with matching sizes) marks the dir complete
    _fsync(tmp)
    old = None
    if target.exists():
        # A non-empty directory cannot be replaced in one rename: move the old one aside first.
        old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
        os.rename(target, old)
    os.rename(tmp, target)
    _fsync(target.parent)
    # This write's `old`, and leftovers of killed writes of this checkpoint (one process writes, one checkpoint at a
    # time). Only this name's: a resume may have just read a complete `.last.*` leftover that a repair of `best`
    # must not delete before the next `last` is in place.
    for stale in target.parent.glob(f".{target.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint_meta(checkpoint_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``meta.json`` of a complete checkpoint, or None when it is missing, unreadable, or a file it lists
    is missing or has another size (a write that was killed)."""
    checkpoint_dir = Path(checkpoint_dir)
    try:
        meta = read_json(checkpoint_dir / META_FILE)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        return None
    for name, size in meta.get("files", {}).items():
        path = checkpoint_dir / name
        if not path.is_file() or path.stat().st_size != size:
            return None
    return meta


def find_resumable(ckpt_dir: Path) -> Path | None:
    """The complete 'last' checkpoint with the highest step: ``last`` itself, or a complete leftover of a write
    killed between its two renames."""
    candidates = []
    for path in [ckpt_dir / "last", *sorted(ckpt_dir.glob(".last.*"))]:
        meta = read_checkpoint_meta(path) if path.is_dir() else None
        if meta is not None and (path / STATE_FILE).is_file():
            candidates.append((meta["step"], path.name == "last", path))
        elif path.exists():
            logger.warning("ignoring incomplete checkpoint %s (its write was interrupted)", path)
    return max(candidates)[2] if candidates else None


def load_training_state(path: Path) -> dict[str, Any]:
    """``training_state.pt`` through ``torch.load(weights_only=True)``: tensors, numbers and containers only, so a
    tampered file cannot run code; anything else is refused with the file named."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for foreign objects, RuntimeError for a damaged zip
        raise ValueError(f"cannot resume from {path}: it is not a training state this trainer wrote "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); only tensors, "
                         "numbers and containers are loaded (weights_only=True), never pickled objects") from err


def repair_best(best: Path, source_meta: Mapping[str, Any], step: int, best_step: int | None,
                model: torch.nn.Module, trainable_only: bool | None) -> None:
    """Make ``best`` hold the step the resumed progress calls best.

    'last' is written before 'best' at the same step, so a kill during the 'best' write leaves a 'last' whose
    best step is itself while ``best`` is missing or still the previous best. The model just loaded from 'last'
    *is* that best: write it again. An uninterrupted run would otherwise end with another best checkpoint.
    """
    if best_step is None:
        return
    current = read_checkpoint_meta(best)
    if current is not None and current.get("step") == best_step:
        for stale in best.parent.glob(f".{best.name}.*"):  # what a kill after the swap left behind
            shutil.rmtree(stale, ignore_errors=True)
        return
    if best_step != step:
        logger.warning("checkpoint %s holds step %s, not the best step %d; it is kept as it is",
                       best, None if current is None else current.get("step"), best_step)
        return
    logger.warning("rewriting %s from step %d: its write was interrupted", best, step)
    meta = {k: v for k, v in source_meta.items() if k not in ("kind", "files", "format", "time")}
    write_checkpoint(best, {**meta, "kind": "best"},
                      lambda tmp: save_weights(model, tmp / WEIGHTS_FILE, meta, trainable_only))


def save_weights(model: torch.nn.Module, path: Path, meta: Mapping[str, Any], trainable_only: bool | None) -> None:
    """``model.safetensors``: every tensor, or with ``trainable_only`` the trainable parameters and the buffers
    (None: only for models holding bitsandbytes-quantized weights, which cannot be reloaded)."""
    header = {"config_hash": str(meta["config_hash"]), "step": str(meta["step"])}
    if trainable_only is None:
        # 4-/8-bit weights (QLoRA bases) do not load back into a freshly built model; they are frozen anyway.
        trainable_only = any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters())
    if not trainable_only:
        # save_model drops the duplicates of tied tensors, which safetensors' save_file refuses.
        safetensors.torch.save_model(model, str(path), metadata={**header, "weights": "full"})
        return
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name for name, _ in model.named_buffers()}
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()
               if name in trainable or name in buffers}
    safetensors.torch.save_file(tensors, str(path), metadata={**header, "weights": "trainable"})


def load_weights(model: torch.nn.Module, checkpoint_dir: str | os.PathLike,
                 expected_config_hash: str | None = None) -> dict[str, Any]:
    """Load a checkpoint's ``model.safetensors`` into ``model`` (in place) and return its ``meta.json``.

    Raises:
        FileNotFoundError: ``checkpoint_dir`` is not a complete checkpoint.
        ValueError: its config_hash differs from ``expected_config_hash``, or the tensors do not fit ``model``.
    """
    checkpoint_dir = Path(checkpoint_dir)
    meta = read_checkpoint_meta(checkpoint_dir)
    if meta is None:
        raise FileNotFoundError(f"{checkpoint_dir} is not a complete checkpoint: {META_FILE} is missing or a file "
                                "it lists is missing or truncated (a write that was interrupted)")
    if expected_config_hash is not None and meta["config_hash"] != expected_config_hash:
        raise ValueError(f"checkpoint {checkpoint_dir} has config_hash {meta['config_hash']!r} but "
                         f"{expected_config_hash!r} was expected: it comes from another system or config")
    path = checkpoint_dir / WEIGHTS_FILE
    device = next(model.parameters()).device
    header = safetensors.safe_open(str(path), framework="pt").metadata() or {}
    try:
        if header.get("weights") == "trainable":
            missing_ok = model.load_state_dict(safetensors.torch.load_file(str(path), device=str(device)),
                                               strict=False)
            if missing_ok.unexpected_keys:
                raise RuntimeError(f"unexpected tensors {missing_ok.unexpected_keys[:5]}")
        else:
            safetensors.torch.load_model(model, str(path), strict=True, device=str(device))
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit {type(model).__name__}: {err}") from err
    return meta


# ---------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, lists and numbers only (``torch.load(weights_only=True)``)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def restore_rng(states: list[dict[str, Any]], process_index: int, seed: int) -> None:
    if process_index >= len(states):
        # More processes than when the checkpoint was written: the new ones get fresh, distinct streams.
        logger.warning("checkpoint has RNG states for %d processes; process %d is seeded afresh",
                       len(states), process_index)
        set_seed(seed + process_index)
        return
    state = states[process_index]
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))


Model = TypeVar("Model", bound=torch.nn.Module)


def load_model(checkpoint_dir: str | os.PathLike, spec_type: Any, build: Callable[[Any], Model],
               device: str | torch.device = "cpu", system: str = "") -> Model:
    """Rebuild a network from its run's ``model_spec.json`` and load a checkpoint into it, on ``device``.

    Args:
        checkpoint_dir: ``<run>/checkpoints/best`` (or ``last``); the spec is ``<run>/model_spec.json``.
        spec_type: the system's :class:`nbsupport.spec.ModelSpec` subclass.
        build: spec -> network (on the CPU; frozen parts come from their own paths).
        device: where every parameter and buffer ends up.
        system: named in the error when the spec is missing.

    Returns:
        the network in eval mode, with every tensor on ``device``.
    """
    checkpoint_dir = Path(checkpoint_dir)
    spec_path = checkpoint_dir.parent.parent / SPEC_FILE
    if not spec_path.exists():
        raise FileNotFoundError(f"{spec_path} is missing: {checkpoint_dir} is not a {system or 'trained'} "
                                "checkpoint (expected <run>/checkpoints/<name> next to <run>/model_spec.json)")
    spec = spec_type.from_json(spec_path.read_text())
    model = build(spec)
    load_weights(model, checkpoint_dir, expected_config_hash=spec.fingerprint())
    return model.to(device).eval()
