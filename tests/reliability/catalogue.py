"""The bad-input catalogue's harness: one table of :class:`BadInput` per dataset adapter.

A case damages a copy of a valid dataset (or manifest, or parameter set), feeds it through the adapter's real
entry point (the 01_preprocess verb, the 02_train verb that reads the manifest, a config's ``from_params``) and
checks that

* the error is raised before anything is trained or written: the manifest path and the run folder are exactly
  as they were (:func:`snapshot`);
* every expected problem is reported, each naming its file, CSV line and field and saying what was expected
  (:func:`assert_reports`), all in one error.

To add an adapter (textseg3d, cxr_report, prs_med, ct_clip): write ``test_bad_inputs_<system>.py`` with a
``CASES = [BadInput(...), ...]`` table and one parametrised test that runs the system's entry point on each case;
``test_catalogue_size`` counts every table named ``CASES`` in this folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from nbsupport.manifest import ManifestError, meta_path


@dataclasses.dataclass(frozen=True)
class Expect:
    """One problem the error must report.

    Attributes:
        where: a file name (or part of a path) the problem names, in its ``file`` or its message.
        field: the column / parameter it names.
        says: a regular expression its message must match: what was wrong and what was expected.
        line: the CSV line it names (header = 1), when the problem is about one row.
    """

    where: str | None
    field: str | None
    says: str
    line: int | None = None


@dataclasses.dataclass(frozen=True)
class BadInput:
    """One bad input: ``damage(target)`` breaks a copy of valid data in place (or builds bad parameters) and
    returns what must be reported, since file names and lines depend on the data it damaged."""

    id: str
    damage: Callable[..., tuple[Expect, ...]]


def assert_reports(error: BaseException, expect: tuple[Expect, ...]) -> None:
    """Every expected problem is in ``error`` (a ManifestError's problems, or the lines of another error)."""
    if isinstance(error, ManifestError):
        problems = [(p.file or "", p.line, p.column, p.message, str(p)) for p in error.problems]
        problems += [("", None, None, error.hint, error.hint)] if error.hint else []  # the advice after the list
    elif type(error).__name__ == "ConfigError":  # from_params joins its problems with "; "
        problems = [("", None, None, part, part) for part in re.split(r";\s|\n", str(error))]
    else:
        problems = [("", None, None, str(error), str(error))]
    report = str(error)
    for e in expect:
        matches = [p for p in problems
                   if (e.where is None or e.where in p[0] or e.where in p[3])
                   and (e.field is None or p[2] == e.field or (p[2] is None and repr(e.field) in p[3]))
                   and (e.line is None or p[1] == e.line)
                   and re.search(e.says, p[3])]
        assert matches, f"expected a problem {e} in:\n{report}"
        if isinstance(error, ManifestError) and e.line is not None:
            assert f"line {e.line}" in matches[0][4], matches[0][4]
        if e.field is not None:
            assert repr(e.field) in report or e.field in report, report


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under ``folders`` (hidden ones included) -> sha256 of its bytes."""
    files = {}
    for folder in folders:
        if folder.exists():
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


# ---------------------------------------------------------------------------------------------- shared damages
# Manifest and parameter damages that every adapter's table uses (seg2d's table has its own, older copies).
def manifest_cell(row: int, column: str, value: str, says: str) -> Callable[[Path], tuple[Expect, ...]]:
    """Set one cell of a written manifest (row 0 = CSV line 2)."""
    def damage(manifest: Path) -> tuple[Expect, ...]:
        df = pd.read_csv(manifest, dtype=str, keep_default_na=False, na_filter=False)
        df.loc[row, column] = value
        df.to_csv(manifest, index=False, lineterminator="\n")
        return (Expect(None, column, says, line=row + 2),)
    return damage


def manifest_duplicate(row: int, key: str) -> Callable[[Path], tuple[Expect, ...]]:
    """Append a copy of ``row``: its key is then not unique."""
    def damage(manifest: Path) -> tuple[Expect, ...]:
        df = pd.read_csv(manifest, dtype=str, keep_default_na=False, na_filter=False)
        pd.concat([df, df.iloc[[row]]], ignore_index=True).to_csv(manifest, index=False, lineterminator="\n")
        return (Expect(None, key, f"is not unique \\(first seen on line {row + 2}\\)", line=len(df) + 2),)
    return damage


def manifest_moved_from_its_data(manifest: Path) -> tuple[Expect, ...]:
    """The data folder was moved (or the manifest copied to another machine): the recorded root is gone."""
    data_root = Path(json.loads(meta_path(manifest).read_text())["data_root"])
    data_root.rename(data_root.with_name(data_root.name + "_moved_elsewhere"))
    return (Expect(None, None, f"data root {re.escape(str(data_root))} does not exist"),
            Expect(None, None, "pass data_root=<new folder>"))


def several(*damages: Callable[..., tuple[Expect, ...]]) -> Callable[..., tuple[Expect, ...]]:
    """Several problems in one input: all must be in the one error."""
    def damage(target: Path) -> tuple[Expect, ...]:
        return tuple(e for d in damages for e in d(target))
    return damage


def parameter_cases(system: str, stage: type, number: str, misspelt: str) -> list[BadInput]:
    """A misspelt parameter name and a string where a number is expected, as a notebook's parameters cell (or
    papermill ``-p``) would pass them to ``stage.from_params``; ``number`` is one of ``stage``'s float fields."""
    return [BadInput(f"{system}_param_misspelt_name",
                     lambda: (stage, {misspelt: 1}, (Expect(None, misspelt, f"unknown parameter '{misspelt}'"),))),
            BadInput(f"{system}_param_string_for_float",
                     lambda: (stage, {number: "1e-3"}, (Expect(None, number, "expected a number, got str"),)))]


def assert_parameters_refused(case: BadInput, run_dir: Path) -> None:
    """``case`` (from :func:`parameter_cases`) is refused by ``from_params``, naming system, stage and field."""
    from nbsupport.config import ConfigError

    stage, values, expect = case.damage()
    try:
        stage.from_params({"run_dir": str(run_dir), **values})
    except ConfigError as err:
        assert_reports(err, expect)
        assert str(err).startswith(f"{stage.SYSTEM}/{stage.STAGE}:"), str(err)
    else:
        raise AssertionError(f"{case.id}: {values} was accepted")
    assert not run_dir.exists()


def assert_refused(call: Callable[[], object], expect: tuple[Expect, ...], watched: tuple[Path, ...],
                   errors: tuple[type[BaseException], ...] = (ManifestError,)) -> BaseException:
    """``call()`` raises one of ``errors`` reporting every ``expect``, and nothing under ``watched`` changed."""
    before = snapshot(*watched)
    try:
        call()
    except errors as err:
        assert_reports(err, expect)
        if isinstance(err, ManifestError) and len(expect) > 1:
            assert len(err.problems) >= len({(e.where, e.field, e.line) for e in expect}), str(err)
        error = err
    else:
        raise AssertionError(f"accepted although it should report {expect}")
    assert snapshot(*watched) == before, "something was written although the input was refused"
    return error


def assert_02_train_refuses(case: BadInput, pipeline: object, manifest_frame: pd.DataFrame, schema: object,
                            root: Path, tmp_path: Path) -> Path:
    """Write ``manifest_frame`` as a valid manifest of ``root``, damage it with ``case`` and check that the system's
    real ``pipeline.train`` (smoke profile) refuses it naming every problem, writing nothing. Returns the run folder
    (for the caller's own "no checkpoint" check)."""
    from nbsupport.manifest import write_manifest
    from nbsupport.runs import RunFolder

    system = pipeline.TrainConfig.SYSTEM
    manifest = tmp_path / "manifests" / f"{system}.csv"
    write_manifest(manifest_frame, manifest, schema, root)
    expect = case.damage(manifest)
    run_dir = tmp_path / "runs" / "r" / system
    cfg = pipeline.TrainConfig.from_params({"profile": "smoke", "manifest": str(manifest), "run_dir": str(run_dir)})
    run = RunFolder.for_stage(cfg)
    assert_refused(lambda: pipeline.train(cfg, run), expect, (run_dir, manifest.parent),
                   errors=(ManifestError, FileNotFoundError))
    return run_dir
