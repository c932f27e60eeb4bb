"""The shared stage configs: split checks, manifest defaults, and the one conversion to TrainSettings."""
from __future__ import annotations

import dataclasses

import pytest

from nbsupport.config import ConfigError, param
from nbsupport.stages import ManifestStage, TrainStage, TrainedModelStage, check_split_fractions


@dataclasses.dataclass(frozen=True)
class ToyTrain(TrainStage):
    SYSTEM = "toy"
    DEFAULT_MANIFEST = "data_manifests/toy_demo.csv"
    PROFILES = {"smoke": {"epochs": 2}}

    epochs: int = param(7, "seed's epochs")
    optimizer: str = param("sgd", "a TrainSettings field the system also has")
    warmup_epochs: int = param(1, "a field TrainSettings does not have")


@dataclasses.dataclass(frozen=True)
class ToyInfer(TrainedModelStage):
    SYSTEM = "toy"
    STAGE = "03_infer"
    DEFAULT_MANIFEST = "data_manifests/toy_demo.csv"


def test_split_fraction_errors_show_the_values_given() -> None:
    check_split_fractions(val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(ValueError, match=r"val_fraction=0.6, test_fraction=0.5"):
        check_split_fractions(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match=r"val_fraction=-0.1"):
        check_split_fractions(val_fraction=-0.1)


def test_an_empty_manifest_parameter_means_the_system_default() -> None:
    assert ToyInfer.from_params({"manifest": None}).manifest == "data_manifests/toy_demo.csv"
    assert ToyInfer.from_params({"manifest": "/data/mine.csv"}).manifest == "/data/mine.csv"
    assert issubclass(ToyInfer, ManifestStage)


def test_train_settings_take_every_shared_field_then_the_task_specific_ones() -> None:
    cfg = ToyTrain.from_params({"profile": "smoke", "resume": True, "grad_accum": 4, "num_processes": 2,
                                "batch_size": 8, "seed": 3})
    settings = cfg.train_settings(monitor="val_dice", monitor_mode="max", epochs=5)
    assert (settings.epochs, settings.resume, settings.grad_accum, settings.num_processes, settings.seed) == (5, True, 4, 2, 3)
    assert settings.optimizer == "sgd" and settings.monitor == "val_dice" and settings.log_every == 5
    assert ToyTrain().epochs == 7 and ToyTrain.from_params({"profile": "smoke"}).epochs == 2


def test_a_misspelt_unified_parameter_gets_a_did_you_mean() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'grad_accum'"):
        ToyTrain.from_params({"grad_acum": 2})
