"""Dataset manifests: the CSV contract between preprocessing and training.

A manifest is one CSV per dataset under ``data_manifests/``, one row per sample. File paths inside it are
*relative* to a data root, so the manifest moves with its data: copy the data folder elsewhere and pass the new
``data_root`` to :func:`read_manifest`. Next to ``<name>.csv`` a sidecar ``<name>.meta.json`` records the
dataset, the absolute data root it was written against, the row count, the columns, when it was written and
the sha256 of the CSV.

Each system describes its manifest with a :class:`ManifestSchema` (columns, kinds, allowed values, the unique
key and, per path column, a reader that proves a file can be opened). :func:`validate_manifest` reports every
problem at once, each naming the CSV line (the header is line 1), the column and what was expected, so a
researcher fixes a broken manifest in one pass rather than one error per run.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from nbsupport.paths import resolve_path
from nbsupport.progress import progress
from nbsupport.runs import atomic_path, atomic_write_json, read_json

SPLITS = ("train", "val", "test")
BUILTIN_KINDS = ("str", "int", "float", "bool", "path", "split")
MAX_PRINTED_PROBLEMS = 50
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}

# A custom column kind: called with the cell value (a non-empty string or a Python value); returns ``None`` when
# the value is fine, otherwise a short "expected ..." message (raising ValueError works as well).
ValueCheck = Callable[[Any], "str | None"]
# A per-row check: called with {column: typed value} of a row whose cells are all valid; yields
# (column, message) pairs for cross-column problems (e.g. an RLE that runs past width x height).
RowCheck = Callable[[Mapping[str, Any]], Iterable[tuple[str, str]]]


@dataclasses.dataclass(frozen=True)
class Column:
    """One manifest column.

    Attributes:
        name: CSV header.
        kind: "str", "int", "float", "bool", "path" (relative to the data root), "split" (train/val/test), or a
            :data:`ValueCheck` callable for a custom check of a string cell.
        required: the column must be present in the CSV.
        allowed: if given, the only values a cell may take.
        nullable: an empty cell is allowed (it means "none", e.g. an empty mask).
        help: what the column means, for documentation and error messages.
    """

    name: str
    kind: str | ValueCheck = "str"
    required: bool = True
    allowed: tuple[Any, ...] | None = None
    nullable: bool = False
    help: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.kind, str) and self.kind not in BUILTIN_KINDS:
            raise ValueError(f"column {self.name!r}: kind must be one of {BUILTIN_KINDS} or a callable, "
                             f"got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class ManifestSchema:
    """What a dataset's manifest must contain.

    Attributes:
        dataset: dataset name, written into the sidecar and error messages.
        columns: the columns, in the order they are written.
        key: a column whose values identify a row and must be unique.
        readers: path column -> callable that opens a file (given its absolute path) and raises on a bad file.
        row_check: optional cross-column check (see :data:`RowCheck`), run on rows whose cells are all valid.
    """

    dataset: str
    columns: tuple[Column, ...]
    key: str
    readers: Mapping[str, Callable[[Path], Any]] = dataclasses.field(default_factory=dict)
    row_check: RowCheck | None = None

    def __post_init__(self) -> None:
        names = [c.name for c in self.columns]
        if self.key not in names:
            raise ValueError(f"schema {self.dataset!r}: key {self.key!r} is not one of its columns {names}")
        for name in self.readers:
            if name not in names or self.column(name).kind != "path":
                raise ValueError(f"schema {self.dataset!r}: reader given for {name!r}, which is not a path column")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def path_columns(self) -> list[str]:
        return [c.name for c in self.columns if c.kind == "path"]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"schema {self.dataset!r} has no column {name!r}")


@dataclasses.dataclass(frozen=True)
class ManifestProblem:
    """One thing wrong with a manifest (or a dataset file): where, in which column, and what was expected.

    ``line`` is the CSV line number (header = line 1, first row = line 2); ``None`` for whole-file problems.
    ``file`` names another file the problem is about (e.g. an image), when there is one.
    """

    line: int | None
    column: str | None
    message: str
    file: str | None = None

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(self.file)
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.column:
            where.append(f"column {self.column!r}")
        return (", ".join(where) + ": " if where else "") + self.message


class ManifestError(ValueError):
    """A manifest (or a dataset file a manifest is built from) has problems; the message lists all of them."""

    def __init__(self, problems: list[ManifestProblem], source: str | os.PathLike, hint: str = ""):
        self.problems = list(problems)
        self.source = str(source)
        self.hint = hint
        super().__init__(self._format())

    def _format(self) -> str:
        n = len(self.problems)
        lines = [f"{self.source}: {n} problem{'s' if n != 1 else ''}:"]
        lines += [f"  - {p}" for p in self.problems[:MAX_PRINTED_PROBLEMS]]
        if n > MAX_PRINTED_PROBLEMS:
            lines.append(f"  ... and {n - MAX_PRINTED_PROBLEMS} more problems")
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- paths
def absolute_data_path(relative: str | os.PathLike, data_root: str | os.PathLike) -> Path:
    """The absolute path of a manifest's relative path ``relative`` under ``data_root``."""
    return Path(data_root) / PurePosixPath(str(relative))


def relative_data_path(path: str | os.PathLike, data_root: str | os.PathLike) -> str:
    """``path`` as the POSIX path a manifest stores: relative to ``data_root``.

    Relative paths are returned unchanged (normalised to ``/``); an absolute path under ``data_root`` is made
    relative; an absolute path elsewhere is returned unchanged, for :func:`validate_manifest` to report.
    """
    p = Path(path)
    if not p.is_absolute():
        return PurePosixPath(*p.parts).as_posix() if p.parts else str(path)
    try:
        return p.resolve().relative_to(Path(data_root).resolve()).as_posix()
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------- validation
def _is_null(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def _parse_cell(value: Any, column: Column) -> tuple[Any, str | None]:
    """(typed value, problem or None) for one non-null cell."""
    kind = column.kind
    if callable(kind):
        try:
            problem = kind(value)
        except ValueError as err:
            problem = str(err)
        return value, problem
    if kind == "int":
        if isinstance(value, (bool, np.bool_)):
            return value, f"expected an integer, got {value!r}"
        if isinstance(value, (int, np.integer)):
            return int(value), None
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return int(value), None
        try:
            return int(str(value).strip()), None
        except ValueError:
            return value, f"expected an integer, got {value!r}"
    if kind == "float":
        if isinstance(value, (bool, np.bool_)):
            return value, f"expected a number, got {value!r}"
        try:
            number = float(value)
        except (TypeError, ValueError):
            return value, f"expected a number, got {value!r}"
        if not math.isfinite(number):
            return value, f"expected a finite number, got {value!r}"
        return number, None
    if kind == "bool":
        if isinstance(value, (bool, np.bool_)):
            return bool(value), None
        text = str(value).strip().lower()
        if text in _TRUE:
            return True, None
        if text in _FALSE:
            return False, None
        return value, f"expected True or False, got {value!r}"
    if kind == "split":
        text = str(value)
        return text, None if text in SPLITS else f"expected one of {list(SPLITS)}, got {value!r}"
    if not isinstance(value, str):
        return value, f"expected a string, got {type(value).__name__} {value!r}"
    return value, None


def _check_path(value: str, root: Path) -> tuple[Path | None, str | None]:
    """(absolute path, problem) for a manifest path cell; the path must stay inside ``root``."""
    p = PurePosixPath(value.replace("\\", "/"))
    if Path(value).is_absolute() or p.is_absolute():
        return None, f"expected a path relative to the data root {root}, got the absolute path {value!r}"
    if ".." in p.parts:
        return None, f"expected a path inside the data root (no '..'), got {value!r}"
    return root / p, None


def validate_manifest(
    df: pd.DataFrame,
    schema: ManifestSchema,
    data_root: str | os.PathLike | None,
    check_files: bool = True,
) -> list[ManifestProblem]:
    """Every problem of a manifest table, in row order; an empty list means it is valid.

    Checks required columns, empty cells in non-nullable columns, kinds, allowed values, the unique key, paths
    (relative, inside ``data_root``) and, with ``check_files``, that each file exists and its column's reader can
    open it. Extra columns are allowed and left alone.

    Args:
        df: the manifest, one row per sample (cells may be strings as read from CSV, or typed values).
        schema: what the manifest must contain.
        data_root: the folder the relative paths are under (needed when ``check_files``).
        check_files: also check that files exist and are readable (slow for large datasets: one read per file).
    """
    problems: list[ManifestProblem] = []
    present = [c for c in schema.columns if c.name in df.columns]
    for column in schema.columns:
        if column.required and column.name not in df.columns:
            expected = column.help or _expectation(column)
            problems.append(ManifestProblem(None, column.name, f"required column is missing (expected {expected})"))
    root = Path(data_root) if data_root is not None else None
    if check_files and schema.path_columns:
        if root is None:
            problems.append(ManifestProblem(None, None, "a data_root is needed to check the files"))
        elif not root.is_dir():
            problems.append(ManifestProblem(None, None, f"data root {root} does not exist or is not a folder"))
    files_checkable = check_files and root is not None and root.is_dir()

    to_read: list[tuple[int, str, Path]] = []
    for position, row in enumerate(df[[c.name for c in present]].itertuples(index=False, name=None)):
        line = position + 2  # the header is line 1
        typed: dict[str, Any] = {}
        row_ok = True
        for column, value in zip(present, row):
            if _is_null(value):
                typed[column.name] = "" if column.kind in ("str", "path") or callable(column.kind) else None
                if not column.nullable:
                    problems.append(ManifestProblem(line, column.name, f"empty cell; expected {_expectation(column)}"))
                    row_ok = False
                continue
            parsed, problem = _parse_cell(value, column)
            if problem is None and column.allowed is not None and parsed not in column.allowed:
                problem = f"expected one of {list(column.allowed)}, got {value!r}"
            if problem is None and column.kind == "path":
                absolute, problem = _check_path(str(parsed), root or Path("."))
                if problem is None and files_checkable:
                    if not absolute.is_file():
                        problem = f"file {parsed!r} does not exist under data root {root}"
                    elif column.name in schema.readers:
                        to_read.append((line, column.name, absolute))
            if problem is not None:
                problems.append(ManifestProblem(line, column.name, problem))
                row_ok = False
            typed[column.name] = parsed
        if row_ok and schema.row_check is not None and len(present) == len(schema.columns):
            for name, message in schema.row_check(typed):
                problems.append(ManifestProblem(line, name, message))

    if schema.key in df.columns:
        keys = df[schema.key].astype(str).reset_index(drop=True)
        duplicated = keys[keys.duplicated(keep=False) & (keys.str.strip() != "")]  # empty keys are reported above
        first_line: dict[str, int] = {}
        for position, key in duplicated.items():
            line = int(position) + 2
            if key in first_line:
                problems.append(ManifestProblem(line, schema.key,
                                                f"key {key!r} is not unique (first seen on line {first_line[key]})"))
            else:
                first_line[key] = line

    if to_read:
        desc = f"checking {schema.dataset} files"
        for line, name, absolute in progress(to_read, desc=desc) if len(to_read) > 200 else to_read:
            try:
                schema.readers[name](absolute)
            except Exception as err:  # any reader failure is a problem to report, not to crash on
                problems.append(ManifestProblem(line, name, f"cannot read {absolute.name}: {err}"))
    problems.sort(key=lambda p: (p.line or 0))
    return problems


def _expectation(column: Column) -> str:
    if column.allowed is not None:
        return f"one of {list(column.allowed)}"
    if column.kind == "split":
        return f"one of {list(SPLITS)}"
    if callable(column.kind):
        return column.help or "a value"
    return {"int": "an integer", "float": "a number", "bool": "True or False", "path": "a relative path",
            "str": "a value"}[column.kind] + (f" ({column.help})" if column.help else "")


def _typed_frame(df: pd.DataFrame, schema: ManifestSchema) -> pd.DataFrame:
    """A validated string frame with int/float/bool columns converted and empty strings kept for text columns."""
    out = df.copy()
    for column in schema.columns:
        if column.name not in out.columns:
            continue
        values = out[column.name]
        if column.kind == "int":
            nulls = values.map(_is_null)
            if nulls.any():
                out[column.name] = pd.array([None if n else int(v) for v, n in zip(values, nulls)], dtype="Int64")
            else:
                out[column.name] = values.map(lambda v: int(v) if isinstance(v, str) else int(float(v))).astype("int64")
        elif column.kind == "float":
            out[column.name] = values.map(lambda v: np.nan if _is_null(v) else float(v)).astype("float64")
        elif column.kind == "bool":
            out[column.name] = values.map(
                lambda v: bool(v) if isinstance(v, (bool, np.bool_)) else str(v).strip().lower() in _TRUE).astype(bool)
        else:
            out[column.name] = values.map(lambda v: "" if _is_null(v) else str(v)).astype(object)
    return out


# ---------------------------------------------------------------------------------------------- write / read
def meta_path(manifest_path: str | os.PathLike) -> Path:
    """The sidecar of ``<dir>/<stem>.csv``: ``<dir>/<stem>.meta.json``."""
    p = Path(manifest_path)
    return p.with_name(p.stem + ".meta.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(
    df: pd.DataFrame,
    path: str | os.PathLike,
    schema: ManifestSchema,
    data_root: str | os.PathLike,
    check_files: bool = True,
) -> Path:
    """Validate ``df`` and write it as ``path`` (CSV) plus its ``.meta.json`` sidecar, both atomically.

    Absolute paths under ``data_root`` are stored relative to it; absolute paths elsewhere are problems.
    Schema columns come first, in schema order, followed by any extra columns.

    Raises:
        ManifestError: listing every problem; nothing is written.
    """
    path = resolve_path(path)
    root = resolve_path(data_root).resolve()
    df = df.copy()
    for name in schema.path_columns:
        if name in df.columns:
            df[name] = df[name].map(lambda v: v if _is_null(v) else relative_data_path(str(v), root))
    problems = validate_manifest(df, schema, root, check_files=check_files)
    if problems:
        raise ManifestError(problems, path.name + " (not written)")
    ordered = [c for c in schema.names if c in df.columns] + [c for c in df.columns if c not in schema.names]
    df = _typed_frame(df[ordered], schema)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n")
        sha = _sha256(tmp)
    try:
        relative_root = os.path.relpath(root, path.parent.resolve())
    except ValueError:  # different drives on Windows
        relative_root = None
    atomic_write_json(meta_path(path), {
        "dataset": schema.dataset,
        "data_root": str(root),
        "data_root_relative_to_manifest": relative_root,
        "n_rows": int(len(df)),
        "columns": list(df.columns),
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "sha256": sha,
    })
    return path


def read_manifest(
    path: str | os.PathLike,
    schema: ManifestSchema,
    data_root: str | os.PathLike | None = None,
    check_files: bool = True,
) -> tuple[pd.DataFrame, Path]:
    """Read and validate a manifest; returns (typed table, absolute data root).

    The data root is ``data_root`` when given, else the sidecar's absolute ``data_root``, else (when that folder
    is gone but the manifest and its data moved together) the sidecar's root relative to the manifest. Text
    columns keep empty cells as ``""``; int/float/bool columns are converted.

    Raises:
        FileNotFoundError: no manifest at ``path``.
        ManifestError: every problem; when files are missing, the message names the data root that was tried
            and that ``data_root=`` can be passed.
    """
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist (write it with the preprocessing notebook first)")
    meta = read_json(meta_path(path), {}) or {}
    if data_root is not None:
        root, origin = resolve_path(data_root), "the data_root argument"
    elif meta.get("data_root"):
        root, origin = Path(meta["data_root"]), f"{meta_path(path).name}"
        relative = meta.get("data_root_relative_to_manifest")
        if not root.is_dir() and relative:
            moved = (path.parent / relative).resolve()
            if moved.is_dir():
                root, origin = moved, f"{meta_path(path).name} (relative to the manifest)"
    else:
        raise ManifestError([ManifestProblem(None, None, f"no sidecar {meta_path(path).name} names the data root")],
                            path.name, hint="Pass data_root=<folder the manifest's paths are relative to>.")
    if meta.get("sha256") and meta["sha256"] != _sha256(path):
        warnings.warn(f"{path.name} changed since it was written (sha256 differs from {meta_path(path).name}); "
                      "it is validated again below", stacklevel=2)
    df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    problems = validate_manifest(df, schema, root, check_files=check_files)
    if problems:
        missing = any("does not exist" in p.message for p in problems)
        hint = ""
        if missing:
            hint = (f"Data root tried: {root} (from {origin}). If the data moved, pass "
                    f"data_root=<new folder> to read_manifest (relative paths in the manifest are taken from it).")
        raise ManifestError(problems, path.name, hint=hint)
    return _typed_frame(df, schema), root.resolve()
