"""What the prs_med tests share: a small synthetic PRS-Med dataset (five tasks, 11 images each, 48 px), one
smoke-profile run folder the verbs 01-03 have written (trained once per session), and this folder on ``sys.path`` so
that they import ``prs_med_layouts`` (pytest's importlib mode does not put it there)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest

from nbsupport.prs_med import config, demo_data, pipeline
from nbsupport.runs import RunFolder

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_data.write_demo_dataset(tmp_path_factory.mktemp("prs") / "demo", n_train=5, n_val=1, n_test=5,
                                        image_size=48, seed=3)


@dataclasses.dataclass
class SmokeRun:
    """A run folder after 01_preprocess, 02_train and 03_infer on a tiny one-task demo dataset (32 px)."""

    run: RunFolder
    stages: list[Any]  # the four stage configs, 01..04
    outcome: pipeline.TrainOutcome
    inferred: pipeline.InferResult
    data_root: Path


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    tmp = tmp_path_factory.mktemp("prs_run")
    root = demo_data.write_demo_dataset(tmp / "data", n_train=2, n_val=1, n_test=2, image_size=32,
                                        tasks=("polyp_endoscopy",))
    common = {"profile": "smoke", "manifest": str(tmp / "m.csv"), "run_dir": str(tmp / "run" / "prs_med")}
    small = {"image_size": 32, "vision_size": 32, "max_steps": 1, "batch_size": 2, "max_new_tokens": 3}
    stages = [config.PreprocessConfig.from_params({**common, "data_root": str(root), "n_examples": 1}),
              config.TrainConfig.from_params({**common, **small}),
              config.InferConfig.from_params({**common, "max_new_tokens": 3, "n_examples": 1}),
              config.AttentionConfig.from_params({**common, "max_new_tokens": 3})]
    pipeline.preprocess(stages[0], RunFolder.for_stage(stages[0]))  # each stage records its config, as a notebook
    outcome = pipeline.train(stages[1], RunFolder.for_stage(stages[1]))
    run = RunFolder.for_stage(stages[2])
    inferred = pipeline.predict(stages[2], run)
    return SmokeRun(run, stages, outcome, inferred, root)
