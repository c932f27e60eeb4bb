"""Cached preprocessing results, keyed by a fingerprint of everything that produced them.

A system that preprocesses once and reuses the result (resampled volumes, tokenised reports, embeddings) calls
:func:`cached_folder` with the parameters that determine the result: the relevant fields of its config, the
input files, and a version string it bumps when the preprocessing code changes. The folder's name carries the
sha256 fingerprint of all three, so a changed parameter, a changed input file (size or modification time) or a
new code version is a different folder and is built afresh; stale folders are never read again.

Layout under the cache root (``NBSUPPORT_CACHE`` or ``~/.cache/nbsupport``, then ``preprocessed/``)::

    <name>-<fingerprint>/           complete: built, then key.json written last, then renamed into place
      key.json                      what the fingerprint was computed from (readable, for debugging)
    .<name>-<fingerprint>.tmp-*     a build in progress, or one that was killed (removed after an hour)

Builds are crash-safe like checkpoints: a killed build never becomes a cache entry, and two processes building
the same entry at once both succeed, the second one discarding its copy.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from nbsupport.runs import atomic_write_json, read_json

logger = logging.getLogger(__name__)

KEY_FILE = "key.json"
STALE_BUILD_S = 3600
FINGERPRINT_CHARS = 16  # 64 bits of sha256: collisions are not a concern at the scale of one cache folder


def preprocess_cache_dir() -> Path:
    """``$NBSUPPORT_CACHE/preprocessed`` (default ``~/.cache/nbsupport/preprocessed``)."""
    return Path(os.environ.get("NBSUPPORT_CACHE") or Path.home() / ".cache" / "nbsupport") / "preprocessed"


def _canonical(value: Any) -> Any:
    """A JSON-ready, order-independent form of configs, dataclasses, paths, tuples and mappings."""
    if hasattr(value, "to_dict") and callable(value.to_dict):
        value = value.to_dict()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot fingerprint a {type(value).__name__} ({value!r}); pass literals, mappings, lists, "
                    "paths or dataclasses")


def fingerprint(value: Any) -> str:
    """Hex sha256 prefix of the canonical JSON of ``value`` (key order does not matter; 1 and 1.0 differ)."""
    text = json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:FINGERPRINT_CHARS]


def input_signature(paths: Iterable[str | os.PathLike]) -> list[list[Any]]:
    """``[path, size in bytes, modification time in ns]`` per input file, sorted by path.

    Raises:
        FileNotFoundError: an input does not exist (a cache key over a missing file would never be valid).
    """
    signature = []
    for path in sorted({str(Path(p).resolve()) for p in paths}):
        stat = os.stat(path)
        signature.append([path, stat.st_size, stat.st_mtime_ns])
    return signature


def cache_key(name: str, params: Any, inputs: Iterable[str | os.PathLike] = (), version: str = "1") -> dict[str, Any]:
    """Everything a cached result depends on, as stored in ``key.json``."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"cache name must be a plain folder name, got {name!r}")
    return {"name": name, "version": str(version), "params": _canonical(params),
            "inputs": input_signature(inputs)}


def cached_folder(name: str, params: Any, build: Callable[[Path], None], inputs: Iterable[str | os.PathLike] = (),
                  version: str = "1", root: str | os.PathLike | None = None) -> Path:
    """The folder holding the result of ``build`` for these ``params`` and ``inputs``, built only when missing.

    Args:
        name: what is cached (e.g. ``"textseg3d-volumes"``); the folder is ``<name>-<fingerprint>``.
        params: the values that determine the result (e.g. ``{k: cfg.k for k in ("spacing", "roi")}``, or a whole
            config); anything else of the config should be left out, or it needlessly invalidates the cache.
        build: writes the result into the (empty, temporary) folder it is given.
        inputs: files the result is computed from; a change of size or modification time invalidates it.
        version: bump it when the preprocessing code changes what it writes.
        root: cache root (default :func:`preprocess_cache_dir`).

    Returns:
        The complete entry's folder (read-only by convention).
    """
    root = Path(root) if root is not None else preprocess_cache_dir()
    key = cache_key(name, params, inputs, version)
    target = root / f"{name}-{fingerprint(key)}"
    if read_json(target / KEY_FILE) == key:
        return target
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{target.name}.tmp-*"):
        # Killed earlier builds; a recent one may be another process building right now, so it is left alone.
        try:
            if time.time() - stale.stat().st_mtime > STALE_BUILD_S:
                shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:
            pass
    if target.exists():  # a folder without a matching key.json is not a cache entry: set it aside, rebuild
        logger.warning("cache folder %s is incomplete or foreign; building it again", target)
        shutil.rmtree(target)
    tmp = root / f".{target.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        build(tmp)
        atomic_write_json(tmp / KEY_FILE, key)  # last: its presence marks a complete build
        try:
            os.rename(tmp, target)
        except OSError:
            if read_json(target / KEY_FILE) != key:  # not a concurrent builder's identical result
                raise
            logger.info("cache entry %s was built concurrently; keeping that copy", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
