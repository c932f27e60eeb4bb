"""The stage configs every system shares: what its four notebooks have in common.

A system's ``config.py`` subclasses these (setting ``SYSTEM``, ``SCHEMA``, ``DEFAULT_MANIFEST`` and its own
fields and ``PROFILES``):

* :class:`PreprocessStage` (01): reads a dataset in its published layout, writes the manifest;
* :class:`TrainStage` (02): reads the manifest, trains; holds the optimisation fields every system has, with
  one conversion to the shared loop's :class:`nbsupport.train.TrainSettings`;
* :class:`TrainedModelStage` (03, 04): reads the manifest and a trained checkpoint, works on one split.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pandas as pd

from nbsupport.config import StageConfig, param
from nbsupport.manifest import ManifestSchema, read_manifest
from nbsupport.optim import MixedPrecision
from nbsupport.paths import demo_data_root, resolve_path
from nbsupport.runs import RunFolder, find_checkpoint

if TYPE_CHECKING:
    from nbsupport.spec import ModelSpec
    from nbsupport.train import TrainResult, TrainSettings


def check_split_fractions(**fractions: float) -> None:
    """Each held-out fraction in [0, 1), together less than 1 (the rest is the train split).

    Raises:
        ValueError: naming every fraction with the value given.
    """
    given = ", ".join(f"{name}={value!r}" for name, value in fractions.items())
    if any(not 0 <= value < 1 for value in fractions.values()) or sum(fractions.values()) >= 1:
        raise ValueError(f"{' and '.join(fractions)} must each be in [0, 1) and sum to less than 1 (the rest is "
                         f"the train split); got {given}")


def system_stage(system: str, schema: ManifestSchema, default_manifest: str) -> type:
    """The mixin every stage config of one system lists first: its name, manifest schema and demo manifest."""
    return type(f"{system}_stage", (), {"__doc__": f"What every {system} stage shares.", "SYSTEM": system,
                                        "SCHEMA": schema, "DEFAULT_MANIFEST": default_manifest})


@dataclasses.dataclass(frozen=True)
class ManifestStage(StageConfig):
    """A stage that reads (01: writes) the system's manifest."""

    SCHEMA: ClassVar[ManifestSchema | None] = None
    DEFAULT_MANIFEST: ClassVar[str] = ""  # data_manifests/<dataset>_demo.csv

    data_root: str = param("", "dataset root; '' = the root recorded in the manifest")
    manifest: str = param("", "manifest CSV (paths relative to its data root); '' = the system's demo manifest "
                              "under data_manifests/")

    def __post_init__(self) -> None:
        if not self.manifest:
            object.__setattr__(self, "manifest", self.DEFAULT_MANIFEST)

    def load_manifest(self, check_files: bool = True) -> tuple[pd.DataFrame, Path]:
        """The validated manifest and its data root (``data_root`` when given, else the one it records)."""
        assert self.SCHEMA is not None, f"{type(self).__name__}.SCHEMA is not set"
        return read_manifest(resolve_path(self.manifest), self.SCHEMA, check_files=check_files,
                             data_root=resolve_path(self.data_root) if self.data_root else None)


@dataclasses.dataclass(frozen=True)
class PreprocessStage(ManifestStage):
    """01_preprocess: read a dataset in its published layout and write the manifest."""

    STAGE = "01_preprocess"

    data_root: str = param("", "dataset root in the dataset's published layout; '' = the demo dataset")
    manifest: str = param("", "where to write the manifest (CSV, paths relative to data_root); '' = the "
                              "system's demo manifest under data_manifests/")

    def source_root(self) -> Path:
        """The dataset folder to read: ``data_root``, else the system's demo dataset."""
        return resolve_path(self.data_root) if self.data_root else demo_data_root() / self.SYSTEM


@dataclasses.dataclass(frozen=True)
class HeldOutSplits:
    """For a dataset that ships no validation / test split: the fractions of patients (cases) 01_preprocess holds
    out, checked together. A system redefines a field to give its own default."""

    val_fraction: float = param(0.1, "fraction of patients (cases) held out for validation: checkpoint selection")
    test_fraction: float = param(0.2, "fraction of patients (cases) held out for the final test metrics")

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]  # the stage config this is mixed into
        check_split_fractions(val_fraction=self.val_fraction, test_fraction=self.test_fraction)


@dataclasses.dataclass(frozen=True)
class TrainStage(ManifestStage):
    """02_train: the optimisation fields every system has. A system redefines a field to give its seed's default."""

    STAGE = "02_train"

    epochs: int = param(1, "passes over the training split")
    max_steps: int | None = param(None, "stop after this many optimizer steps (None: epochs decide)")
    batch_size: int = param(8, "global batch size, split evenly across processes")
    grad_accum: int = param(1, "batches per optimizer step; effective batch = batch_size * grad_accum")
    lr: float = param(1e-4, "peak learning rate")
    weight_decay: float = param(0.0, "weight decay on matrices and kernels")
    grad_clip: float | None = param(1.0, "clip the global gradient norm to this value (None: off)")
    num_processes: int = param(1, "data-parallel training processes (accelerate launch; one per GPU)")
    num_workers: int = param(0, "data-loader worker processes per training process")
    mixed_precision: MixedPrecision = param(
        "auto", "autocast of training and its validation passes: auto = bf16 on CUDA (fp16 where bf16 is "
        "unsupported), fp32 on CPU; bf16_native = bf16 where the GPU or CPU computes it natively (AVX-512 BF16, "
        "AMX), fp32 elsewhere; no = fp32 everywhere")
    resume: bool = param(False, "continue from the last complete checkpoint in run_dir (set run_dir to the "
                                "interrupted run's folder)")
    accelerate_config: str = param("", "an `accelerate config` file for num_processes > 1 (several machines, "
                                       "DeepSpeed, ...); '' = one machine, plain DDP")

    def train_settings(self, **task_specific: Any) -> "TrainSettings":
        """The shared loop's settings: each :class:`TrainSettings` field this config also has, ``log_every=5``,
        then ``task_specific`` (monitor, schedule, what to store), which win."""
        from nbsupport.train import TrainSettings

        names = {f.name for f in dataclasses.fields(TrainSettings)}
        values: dict[str, Any] = {"log_every": 5}
        values.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in names})
        values.update(task_specific)
        return TrainSettings(**values)

    def launch_training(self, task: type["ManifestTask"], out_dir: Path, data_root: Path, spec: "ModelSpec",
                        settings: "TrainSettings", config_hash: str | None = None,
                        accelerate_config: str | os.PathLike | None = None, **task_kwargs: Any) -> "TrainResult":
        """Train ``task`` (a :class:`ManifestTask` subclass) into ``out_dir`` with :func:`nbsupport.launch.launch`.

        Every training process rebuilds the task from this config, the manifest, ``data_root``, the spec's JSON and
        ``task_kwargs`` (JSON-ready). Checkpoints record ``config_hash`` (default: the spec's fingerprint). The
        user's ``accelerate_config`` field wins over the system's ``accelerate_config`` argument.
        """
        from nbsupport.launch import launch

        kwargs = {"config": self.to_dict(), "manifest": str(resolve_path(self.manifest)), "data_root": str(data_root),
                  "spec_json": spec.to_json(), **task_kwargs}
        user_config = resolve_path(self.accelerate_config) if self.accelerate_config else None
        return launch(f"{task.__module__}:{task.__qualname__}", kwargs, settings, out_dir,
                      config_hash=spec.fingerprint() if config_hash is None else config_hash,
                      accelerate_config=user_config or accelerate_config)


class ManifestTask:
    """Base of a system's :class:`nbsupport.train.TrainingTask`, built in every training process from what
    :meth:`TrainStage.launch_training` passes: the stage config, the manifest (files not checked again: the stage
    validated them before launching) and the model spec."""

    CONFIG: ClassVar[type[TrainStage]]
    SPEC: ClassVar[type["ModelSpec"]]

    def __init__(self, config: Mapping[str, Any], manifest: str, data_root: str, spec_json: str):
        self.cfg = self.CONFIG.from_params(config)
        assert self.cfg.SCHEMA is not None, f"{self.CONFIG.__name__}.SCHEMA is not set"
        self.manifest, self.root = read_manifest(Path(manifest), self.cfg.SCHEMA, data_root=Path(data_root),
                                                 check_files=False)
        self.spec = self.SPEC.from_json(spec_json)
        self.setup()

    def setup(self) -> None:
        """The task's own state (loss, caches), made once ``cfg``, ``manifest``, ``root`` and ``spec`` are set."""

    def split(self, name: str) -> pd.DataFrame:
        """The manifest rows of one split."""
        return self.manifest[self.manifest.split == name]


@dataclasses.dataclass(frozen=True)
class TrainedModelStage(ManifestStage):
    """03_infer and 04_attention: a trained checkpoint applied to one split of the manifest."""

    checkpoint: str = param("", "checkpoint folder; '' = best checkpoint of run_dir, else of the newest run")
    split: Literal["train", "val", "test"] = param("test", "manifest split to use")

    def find_checkpoint(self, run: RunFolder, model: str = "") -> Path:
        """``checkpoint``, else this run's best, else the newest run's best (see :func:`nbsupport.runs.find_checkpoint`)."""
        return find_checkpoint(self.checkpoint, run, self.SYSTEM, model)


@dataclasses.dataclass(frozen=True)
class InferStage(TrainedModelStage):
    """03_infer: the trained model's predictions and test metrics, and its case viewer."""

    STAGE = "03_infer"


@dataclasses.dataclass(frozen=True)
class AttentionStage(TrainedModelStage):
    """04_attention: where the trained model looks, and its attention viewer."""

    STAGE = "04_attention"
