"""Where the project, its data, its outputs and its model cache live.

Relative paths in notebook parameters are resolved against the project root (the checkout holding
``pyproject.toml``), not against the notebook's folder, so the same parameter works from JupyterLab,
papermill and the command line.
"""
from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """``NBSUPPORT_HOME``, else the checkout this package was installed from, else the working directory."""
    env = os.environ.get("NBSUPPORT_HOME")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").exists() and (here / "nbsupport").is_dir():
        return here
    return Path.cwd().resolve()


def resolve_path(path: str | os.PathLike) -> Path:
    """An absolute path: ``~`` expanded, relative paths taken from the project root."""
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else (project_root() / p)


def demo_data_root() -> Path:
    """Where ``nbsupport demo-data`` writes its datasets (``NBSUPPORT_DATA`` or ``<project>/data/demo``)."""
    return Path(os.environ.get("NBSUPPORT_DATA") or project_root() / "data" / "demo")


def model_cache_dir() -> Path:
    """Where ``nbsupport prepare-models`` puts converted weights (``NBSUPPORT_CACHE`` or ``~/.cache/nbsupport``)."""
    return Path(os.environ.get("NBSUPPORT_CACHE") or Path.home() / ".cache" / "nbsupport") / "models"
