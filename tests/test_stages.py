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


# ---------------------------------------------------------------------------------------------- launch_training
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from nbsupport.checkpoints import load_model, read_checkpoint_meta  # noqa: E402
from nbsupport.manifest import Column, ManifestSchema, write_manifest  # noqa: E402
from nbsupport.spec import ModelSpec  # noqa: E402
from nbsupport.stages import ManifestTask  # noqa: E402

LINE_SCHEMA = ManifestSchema("line", (Column("id"), Column("x", "float"), Column("y", "float"),
                                      Column("split", "split")), key="id")


@dataclasses.dataclass(frozen=True)
class LineSpec(ModelSpec):
    hidden: int = 1


@dataclasses.dataclass(frozen=True)
class LineTrain(TrainStage):
    SYSTEM = "line"
    SCHEMA = LINE_SCHEMA
    lr: float = param(0.1, "a rate that fits y = 3x - 1 in a few hundred steps")


class LineTask(ManifestTask):
    CONFIG = LineTrain
    SPEC = LineSpec

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(1, self.spec.hidden)

    def train_dataset(self) -> list[dict[str, torch.Tensor]]:
        return [{"x": torch.tensor([r.x]), "y": torch.tensor([r.y])} for r in self.split("train").itertuples()]

    def val_dataset(self) -> None:
        return None

    def training_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])

    def evaluate(self, model, loader, device):  # pragma: no cover - no val split
        return {}


def test_launch_training_rebuilds_the_task_from_the_manifest_and_records_the_spec(tmp_path) -> None:
    xs = torch.linspace(-1, 1, 32)
    frame = pd.DataFrame({"id": [f"p{i}" for i in range(32)], "x": xs.tolist(), "y": (3 * xs - 1).tolist(),
                          "split": ["train"] * 32})
    write_manifest(frame, tmp_path / "line.csv", LINE_SCHEMA, tmp_path)
    cfg = LineTrain.from_params({"manifest": str(tmp_path / "line.csv"), "epochs": 40, "batch_size": 8})
    spec = LineSpec()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model_spec.json").write_text(spec.to_json())
    result = cfg.launch_training(LineTask, tmp_path / "run", tmp_path, spec,
                                 cfg.train_settings(monitor="train_loss"))
    assert read_checkpoint_meta(result.last_checkpoint)["config_hash"] == spec.fingerprint()
    model = load_model(result.last_checkpoint, LineSpec, lambda s: torch.nn.Linear(1, s.hidden))
    assert abs(float(model.weight) - 3) < 0.05 and abs(float(model.bias) + 1) < 0.05  # untrained: |w - 3| ~ 3
