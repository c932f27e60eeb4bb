"""A trained textseg3d smoke run shared by the tests that need one: 01_preprocess, 02_train and 03_infer of the
``smoke`` profile on the smoke demo data, through the verbs the notebooks call, into one run folder."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from nbsupport import textseg3d
from nbsupport.runs import RunFolder
from nbsupport.textseg3d.pipeline import InferResult, TrainOutcome
from nbsupport.textseg3d.config import InferConfig, PreprocessConfig, TrainConfig
from nbsupport.textseg3d.demo_data import DEMO_SIZES, write_demo_dataset


@dataclasses.dataclass(frozen=True)
class SmokeRun:
    data_root: Path  # the demo dataset the run was trained on
    manifest: Path  # its manifest (01_preprocess)
    run_dir: Path  # outputs/runs/<id>/textseg3d as nbsupport run writes it
    train: TrainOutcome
    infer: InferResult


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    base = tmp_path_factory.mktemp("textseg3d_smoke")
    root = write_demo_dataset(base / "data", **DEMO_SIZES["smoke"])
    run_dir = base / "runs" / "smoke" / "textseg3d"
    common = {"profile": "smoke", "manifest": str(base / "manifest.csv"), "run_dir": str(run_dir)}
    prep = PreprocessConfig.from_params({**common, "data_root": str(root), "n_examples": 1})
    textseg3d.preprocess(prep, RunFolder.for_stage(prep))
    train_cfg = TrainConfig.from_params({**common, "device": "cpu"})
    outcome = textseg3d.train(train_cfg, RunFolder.for_stage(train_cfg))
    infer_cfg = InferConfig.from_params({**common, "device": "cpu", "n_examples": 1})
    result = textseg3d.predict(infer_cfg, RunFolder.for_stage(infer_cfg))
    return SmokeRun(root, base / "manifest.csv", run_dir, outcome, result)
