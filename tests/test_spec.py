"""The model-spec base: JSON round trip, fingerprints that ignore what does not change the weights."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from nbsupport.spec import ModelSpec, count_parameters, lora_spec


@dataclasses.dataclass(frozen=True)
class ToySpec(ModelSpec):
    LATER_FIELDS = {"extra": "off"}
    NOT_FINGERPRINTED = ("window",)

    width: int = 8
    window: tuple[int, int] = (32, 32)
    extra: str = "off"


def test_round_trip_restores_tuples_and_defaults() -> None:
    spec = ToySpec(width=4, window=(16, 8), extra="on")
    assert ToySpec.from_json(spec.to_json()) == spec
    assert "extra" not in ToySpec().to_json()  # a later field at its default is not written
    assert ToySpec.from_json('{"width": 8, "window": [32, 32]}') == ToySpec()


def test_fingerprint_ignores_inference_only_fields_and_later_defaults() -> None:
    base = ToySpec()
    assert dataclasses.replace(base, window=(64, 64)).fingerprint() == base.fingerprint()
    assert dataclasses.replace(base, width=9).fingerprint() != base.fingerprint()
    assert dataclasses.replace(base, extra="on").fingerprint() != base.fingerprint()
    assert base.fingerprint("vision") != base.fingerprint("report")


@dataclasses.dataclass(frozen=True)
class NewDefaultSpec(ModelSpec):
    """A later field whose default is not what earlier files implied (a new wiring made the default)."""

    LATER_FIELDS = {"wiring": "old"}

    width: int = 8
    wiring: str = "new"


def test_a_later_field_missing_from_a_file_reads_as_the_value_it_was_written_without() -> None:
    old = NewDefaultSpec.from_json('{"width": 8}')
    assert old.wiring == "old" and old.to_json() == '{\n  "width": 8\n}'
    assert NewDefaultSpec().wiring == "new" and '"wiring": "new"' in NewDefaultSpec().to_json()
    assert NewDefaultSpec.from_json(NewDefaultSpec().to_json()) == NewDefaultSpec()
    assert old.fingerprint() != NewDefaultSpec().fingerprint()


def test_unknown_fields_are_named() -> None:
    with pytest.raises(ValueError, match=r"unknown fields \['depth'\]"):
        ToySpec.from_json('{"width": 8, "depth": 3}')


def test_parameter_count_by_part() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    count = count_parameters(model, {"first": model[0]})
    assert (count.total, count.trainable, count.frozen, count.parts["first"]) == (26, 10, 16, 16)
    assert count.to_dict() == {"total": 26, "trainable": 10, "frozen": 16, "first": 16}


@dataclasses.dataclass(frozen=True)
class AdaptedSpec(lora_spec(rank=4, alpha=8, dropout=0.1), ModelSpec):
    width: int = 8


def test_lora_fields_take_the_systems_defaults_and_build_peft_config() -> None:
    spec = AdaptedSpec(lora_r=2)
    assert (spec.lora_r, spec.lora_alpha, spec.lora_dropout) == (2, 8, 0.1)
    assert AdaptedSpec.from_json(spec.to_json()) == spec
    config = spec.lora_config(target_modules=["q_proj"], bias="none")
    assert (config.r, config.lora_alpha, config.lora_dropout, set(config.target_modules)) == (2, 8, 0.1, {"q_proj"})


def test_lora_fields_are_refused_where_the_json_keeps_field_order() -> None:
    with pytest.raises(TypeError, match="JSON_SORT_KEYS"):
        @dataclasses.dataclass(frozen=True)
        class OrderedSpec(lora_spec(rank=4, alpha=4, dropout=0.0), ModelSpec):
            JSON_SORT_KEYS = False
