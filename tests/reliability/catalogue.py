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
import re
from collections.abc import Callable
from pathlib import Path

from nbsupport.manifest import ManifestError


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
