"""Configs built from notebook parameters: profiles, overrides, and errors that name the parameter."""
from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from nbsupport.config import ConfigError, StageConfig, notebook_params, param


@dataclasses.dataclass(frozen=True)
class ToyTrainConfig(StageConfig):
    SYSTEM = "toy"
    STAGE = "02_train"
    PROFILES = {"smoke": {"epochs": 1, "width": "tiny"}, "full": {"epochs": 50}}

    epochs: int = param(10, "epochs")
    lr: float = param(1e-3, "learning rate")
    width: Literal["tiny", "small"] = param("small", "model width")
    query_point: tuple[float, float] | None = param(None, "(row, col)")
    max_steps: int | None = param(None, "stop early")

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


def test_profile_sets_defaults_and_explicit_values_win() -> None:
    smoke = ToyTrainConfig.from_params({"profile": "smoke"})
    assert (smoke.epochs, smoke.width, smoke.lr) == (1, "tiny", 1e-3)
    assert ToyTrainConfig.from_params({"profile": "smoke", "epochs": 3}).epochs == 3
    # None means "the profile's value", as in a parameters cell that leaves a field open.
    assert ToyTrainConfig.from_params({"profile": "full", "epochs": None}).epochs == 50
    assert ToyTrainConfig.from_params({}).profile == "demo"


def test_unknown_parameter_is_named_with_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as err:
        ToyTrainConfig.from_params({"profile": "smoke", "epochz": 3})
    msg = str(err.value)
    assert "'epochz'" in msg and "did you mean 'epochs'" in msg
    assert "Allowed parameters:" in msg and "lr" in msg and "query_point" in msg


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"epochs": "3"}, "parameter 'epochs': expected an integer"),
        ({"epochs": True}, "parameter 'epochs': expected an integer"),
        ({"lr": "fast"}, "parameter 'lr': expected a number"),
        ({"width": "huge"}, "expected one of ['tiny', 'small']"),
        ({"query_point": [0.5]}, "expected 2 values"),
        ({"profile": "large"}, "must be one of ['smoke', 'demo', 'full']"),
        ({"epochs": 0}, "epochs must be >= 1"),
    ],
)
def test_wrong_types_and_values_are_rejected(params: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        ToyTrainConfig.from_params(params)
    assert needle in str(err.value)
    assert "toy/02_train" in str(err.value)


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        ToyTrainConfig.from_params({"lr": "x", "epochs": "y", "bogus": 1})
    msg = str(err.value)
    assert "'lr'" in msg and "'epochs'" in msg and "'bogus'" in msg


def test_coercions_and_json_dump() -> None:
    cfg = ToyTrainConfig.from_params({"lr": 1, "query_point": [0.25, 0.75], "max_steps": 5})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.query_point == (0.25, 0.75)
    assert cfg.to_dict()["query_point"] == [0.25, 0.75]
    # Round trip: the dumped config rebuilds the same config.
    assert ToyTrainConfig.from_params(cfg.to_dict()) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 2.0  # type: ignore[misc]


def test_notebook_params_keeps_literals_only() -> None:
    import math

    namespace = {"profile": "smoke", "epochs": 2, "math": math, "notebook_params": notebook_params,
                 "In": [""], "_": None, "ToyTrainConfig": ToyTrainConfig, "epochz": 3}
    assert notebook_params(namespace) == {"profile": "smoke", "epochs": 2, "epochz": 3}
