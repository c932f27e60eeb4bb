"""Run folders, provenance and atomic writes.

A run is ``outputs/runs/<run_id>/<system>/``: executed notebooks and their HTML, ``config.json`` (one entry
per notebook stage), ``metrics.json`` (idem), ``provenance.json``, ``checkpoints/`` and ``figures/``.
Nothing in a run folder is overwritten: creating a run whose id exists, or writing a stage's config twice,
is an error. Every file is written to a temporary name in the same folder and renamed into place, so a
killed process leaves either the old state or the new one, never half a file.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nbsupport.paths import project_root, resolve_path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TRACKED_PACKAGES = (
    "nbsupport", "torch", "monai", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "numpy",
    "pandas", "opencv-python", "papermill", "safetensors",
)


LOCK_FILE = ".records.lock"
HEADLINE_FILE = "headline.json"  # the headline result the index shows first (RunFolder.write_headline)


class RunExistsError(FileExistsError):
    """A run folder, or a stage's record inside it, already exists; runs are never overwritten."""


# ---------------------------------------------------------------------------------------------- atomic I/O
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``.

    On an exception the temporary file is removed and ``path`` is untouched. With ``overwrite=False`` an
    existing ``path`` is an error (checked before and, via ``os.link``, atomically at the end).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise RunExistsError(f"{path} exists and is never overwritten")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; results are shared like any file written normally
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp_path, path)
        else:
            try:
                os.link(tmp_path, path)  # fails if path appeared meanwhile
            except FileExistsError as err:
                raise RunExistsError(f"{path} exists and is never overwritten") from err
            tmp_path.unlink()
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, overwrite: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n", overwrite)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    path = Path(path)
    if not path.exists():
        return default
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- run folders
def runs_root() -> Path:
    """``outputs/runs`` under the project root (``NBSUPPORT_OUTPUTS`` moves ``outputs``)."""
    return Path(os.environ.get("NBSUPPORT_OUTPUTS") or project_root() / "outputs") / "runs"


def new_run_id() -> str:
    """Sortable and unique across concurrent starts: ``20261123-141502-3fa9c1``."""
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class RunFolder:
    """One system's folder inside a run: ``<runs_root>/<run_id>/<system>``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        self.system = self.path.name
        self.run_id = self.path.parent.name

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @classmethod
    def create(cls, system: str, run_id: str | None = None, root: str | os.PathLike | None = None) -> "RunFolder":
        """Create a new run folder for ``system``; an existing ``<run_id>/<system>`` is an error."""
        root = Path(root) if root is not None else runs_root()
        run_id = run_id or new_run_id()
        path = root / run_id / system
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError as err:
            raise RunExistsError(f"run folder {path} already exists; choose another --run-id") from err
        return cls(path)

    @classmethod
    def for_stage(cls, cfg: Any) -> "RunFolder":
        """The run folder a notebook stage writes into: ``cfg.run_dir`` or a new run for ``cfg.SYSTEM``.

        Records the resolved config and the provenance of this stage in the folder.
        """
        if cfg.run_dir:
            path = resolve_path(cfg.run_dir)
            path.mkdir(parents=True, exist_ok=True)
            run = cls(path)
        else:
            run = cls.create(cfg.SYSTEM)
        run.record_stage(cfg)
        return run

    # ------------------------------------------------------------------ records
    def file(self, relative: str) -> Path:
        """A path inside the run folder (parents created)."""
        p = self.path / relative
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    @contextlib.contextmanager
    def _records_locked(self) -> Iterator[None]:
        """Hold this folder's lock while a shared record (config/provenance/metrics.json) is read and rewritten.

        Two stages (or two notebooks started by mistake with the same ``run_dir``) updating one JSON file at
        the same time would otherwise each write back what they read, and one update would be lost.
        """
        if fcntl is None:  # pragma: no cover - Windows: atomic writes only
            yield
            return
        with open(self.path / LOCK_FILE, "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def record_stage(self, cfg: Any) -> None:
        """Add the stage's resolved config to ``config.json`` and its provenance to ``provenance.json``.

        A stage is recorded once per folder; a stage config with ``resume=True`` (02_train continuing an
        interrupted run in its ``run_dir``) replaces its earlier record instead.
        """
        stage = cfg.STAGE
        info = provenance(seed=cfg.seed, device=cfg.device)  # outside the lock: it runs git
        with self._records_locked():
            configs = read_json(self.path / "config.json", {})
            if stage in configs and not getattr(cfg, "resume", False):
                raise RunExistsError(
                    f"stage {stage} already ran in {self.path}; a run folder is never overwritten (use a new run_dir)"
                )
            configs[stage] = cfg.to_dict()
            atomic_write_json(self.path / "config.json", configs)
            prov = read_json(self.path / "provenance.json", {})
            prov[stage] = info
            atomic_write_json(self.path / "provenance.json", prov)

    def write_metrics(self, stage: str, metrics: dict[str, Any]) -> Path:
        """Merge ``metrics`` under ``stage`` into ``metrics.json``."""
        with self._records_locked():
            allm = read_json(self.path / "metrics.json", {})
            allm.setdefault(stage, {}).update(metrics)
            return atomic_write_json(self.path / "metrics.json", allm)

    def metrics(self) -> dict[str, Any]:
        return read_json(self.path / "metrics.json", {})

    def write_headline(self, stage: str, metric: str, value: float, baseline: str, baseline_value: float,
                       ci95: Any = None) -> Path:
        """Record the run's headline result next to its baseline (``headline.json``), which the run index shows
        first; a later stage's headline replaces an earlier one (03_infer's over 02_train's)."""
        return atomic_write_json(self.path / HEADLINE_FILE, {
            "stage": stage, "metric": metric, "value": float(value), "ci95": list(ci95) if ci95 else None,
            "baseline": baseline, "baseline_value": float(baseline_value)})

    def save_figure(self, fig: Any, name: str, dpi: int = 110) -> Path:
        """Save a matplotlib figure as ``figures/<name>.png`` atomically."""
        target = self.file(f"figures/{name}.png")
        with atomic_path(target) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
        return target


# ---------------------------------------------------------------------------------------------- provenance
def git_state(root: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the project checkout (``None`` outside git)."""
    root = root or project_root()
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10, check=True).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": sha, "dirty": dirty}


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(seed: int, device: str) -> dict[str, Any]:
    """What produced a result: code version, environment, seed and device."""
    info: dict[str, Any] = {
        "time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git": git_state(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "packages": package_versions(),
        "seed": seed,
        "device": device,
    }
    try:
        import torch

        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return info


def find_checkpoint(checkpoint: str, run: RunFolder, system: str, model: str = "") -> Path:
    """Resolve a notebook's ``checkpoint`` parameter: explicit path, else this run's best, else the newest run's best.

    Args:
        checkpoint: a checkpoint folder ('' = look it up).
        run: the stage's run folder (``outputs/runs/<id>/<system>``).
        system: the system whose runs are searched.
        model: a second model trained in the same run, in a sub-folder of it (e.g. textseg3d's ``"image_only"``
            baseline); with an explicit ``checkpoint`` its sibling under that sub-folder is taken.
    """
    if checkpoint:
        path = resolve_path(checkpoint)
        if model:
            path = path.parent.parent / model / "checkpoints" / path.name
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return path
    sub = f"{model}/" if model else ""
    own = run.path / sub / "checkpoints" / "best"
    if (own / "meta.json").exists():
        return own
    candidates = sorted(runs_root().glob(f"*/{system}/{sub}checkpoints/best/meta.json"),
                        key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"no trained {system} {model + ' ' if model else ''}checkpoint in {run.path} or "
                                f"under {runs_root()}; run 02_train first or set the `checkpoint` parameter")
    print(f"using the newest checkpoint: {candidates[-1].parent}")
    return candidates[-1].parent
