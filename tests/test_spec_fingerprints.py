"""Checkpoints record their model spec's fingerprint, and a load with another fingerprint is refused. These pins
were taken from the code that wrote the existing checkpoints (tests/data/spec_fingerprints.json): a refactor of the
spec classes must leave every one of them unchanged, or earlier runs stop loading."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

PINS = json.loads((Path(__file__).parent / "data" / "spec_fingerprints.json").read_text())
SPEC_CLASSES = {"seg2d": "Seg2DModelSpec", "textseg3d": "LLMSegSpec", "prs_med": "PRSMedSpec",
                "ct_clip": "CTClipSpec", "cxr_report": "CxrModelSpec"}


def _spec_class(system: str) -> type:
    return getattr(importlib.import_module(f"nbsupport.{system}.model"), SPEC_CLASSES[system])


@pytest.mark.parametrize("case", sorted(PINS))
def test_spec_json_written_earlier_keeps_its_fingerprint(case: str) -> None:
    pin = PINS[case]
    spec = _spec_class(case.split("/")[0]).from_json(json.dumps(pin["spec"]))
    for part, expected in pin["fingerprints"].items():
        assert (spec.fingerprint(part) if part else spec.fingerprint()) == expected, (case, part)


@pytest.mark.parametrize("case", sorted(PINS))
def test_spec_json_round_trip(case: str) -> None:
    cls = _spec_class(case.split("/")[0])
    spec = cls.from_json(json.dumps(PINS[case]["spec"]))
    assert cls.from_json(spec.to_json()) == spec


def test_a_changed_field_changes_the_fingerprint() -> None:
    pin = PINS["prs_med/default"]
    cls = _spec_class("prs_med")
    spec = cls.from_json(json.dumps(pin["spec"]))
    import dataclasses

    name = next(f.name for f in dataclasses.fields(spec) if isinstance(getattr(spec, f.name), int)
                and not isinstance(getattr(spec, f.name), bool))
    changed = dataclasses.replace(spec, **{name: getattr(spec, name) + 1})
    assert changed.fingerprint() != spec.fingerprint()
