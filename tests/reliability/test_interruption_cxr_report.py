"""A cxr_report training run killed with SIGKILL in its report stage resumes to the uninterrupted run's weights.

Each run is a real ``cxr_report.train`` (smoke profile: tiny DenseNet, tiny random-init Llama in 4-bit NF4; a
dataset of 12 synthetic patients). The interrupted run, in its own process, is killed as soon as the report stage's
first checkpoint is complete; it is then trained again in this process with ``resume=True`` in the same
``run_dir``: the finished vision stage must be reloaded, not retrained, the report stage must continue from its
checkpoint, and every final checkpoint must hold the weights of the uninterrupted run (trained in this process;
CPU, one thread in every process, deterministic). The uninterrupted run also serves ``load_trained_model``'s device
test.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from nbsupport.checkpoints import read_checkpoint_meta
from nbsupport.cxr_report import PreprocessConfig, TrainConfig, load_trained_model, preprocess, train
from nbsupport.cxr_report.demo_data import write_demo_dataset
from nbsupport.paths import project_root
from nbsupport.runs import RunFolder

pytestmark = pytest.mark.slow  # three smoke trainings: ~45 s on a 2-core CPU

# 12 synthetic patients: ~11 training images -> 1 vision step per epoch (batch 8), 2 report steps per epoch (batch
# 4); 4 report epochs, each ending in a checkpoint and an evaluation.
TRAIN_PARAMS = {"profile": "smoke", "epochs": 4, "max_steps": None, "device": "cpu"}
TRAIN_SCRIPT = """
import json, sys
from nbsupport.cxr_report import TrainConfig, train
from nbsupport.runs import RunFolder
cfg = TrainConfig.from_params(json.loads(sys.argv[1]))
train(cfg, RunFolder.for_stage(cfg))
"""  # what a 02_train notebook does
TIMEOUT_S = 300


def _start_training(params: dict[str, Any], log: Path) -> subprocess.Popen:
    """``cxr_report.train`` in a new process, one thread (the same float reduction order in every run)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(project_root()), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, json.dumps(params)], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _train(params: dict[str, Any]) -> None:
    """``cxr_report.train`` in this process, on one thread like the killed process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig.from_params(params)
        train(cfg, RunFolder.for_stage(cfg))
    finally:
        torch.set_num_threads(threads)


def _weights(run_dir: Path, stage: str, which: str) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / stage / "checkpoints" / which / "model.safetensors"))


def _result(run_dir: Path, stage: str) -> dict[str, Any]:
    return json.loads((run_dir / stage / "train_result.json").read_text())


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cxr_interruption")
    root = write_demo_dataset(folder / "data", n_patients=12, image_size=64, seed=1)
    cfg = PreprocessConfig.from_params({"profile": "smoke", "data_root": str(root), "manifest": str(folder / "m.csv"),
                                        "run_dir": str(folder / "runs" / "pre" / "cxr_report"), "n_examples": 1})
    frame = preprocess(cfg, RunFolder.for_stage(cfg)).manifest
    assert (frame.split == "val").any() and (frame.split == "train").sum() >= 8
    return folder / "m.csv"


@pytest.fixture(scope="module")
def uninterrupted(manifest: Path) -> Path:
    run_dir = manifest.parent / "runs" / "whole" / "cxr_report"
    _train({**TRAIN_PARAMS, "manifest": str(manifest), "run_dir": str(run_dir)})
    return run_dir


def test_sigkill_in_the_report_stage_then_resume_matches_the_uninterrupted_run(manifest: Path, uninterrupted: Path,
                                                                              tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "killed" / "cxr_report"
    params = {**TRAIN_PARAMS, "manifest": str(manifest), "run_dir": str(run_dir)}
    first_report_checkpoint = run_dir / "report" / "checkpoints" / "last"
    process = _start_training(params, tmp_path / "killed.log")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while read_checkpoint_meta(first_report_checkpoint) is None:
            assert process.poll() is None, f"trainer exited early:\n{(tmp_path / 'killed.log').read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no report checkpoint in {TIMEOUT_S} s"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = read_checkpoint_meta(first_report_checkpoint)["step"]
    total = _result(uninterrupted, "report")["steps"]
    assert killed_at < total and not (run_dir / "report" / "train_result.json").exists(), "killed after the end"
    vision_weights = run_dir / "vision" / "checkpoints" / "last" / "model.safetensors"
    vision_written = vision_weights.stat().st_mtime_ns

    _train({**params, "resume": True})

    vision, report = _result(run_dir, "vision"), _result(run_dir, "report")
    assert vision["resumed_from"] == vision["steps"] == _result(uninterrupted, "vision")["steps"]  # reloaded
    assert vision_weights.stat().st_mtime_ns == vision_written  # not trained, not rewritten
    assert killed_at <= report["resumed_from"] < total and report["steps"] == total
    for stage in ("vision", "report"):
        for which in ("last", "best"):
            expected, got = _weights(uninterrupted, stage, which), _weights(run_dir, stage, which)
            assert expected.keys() == got.keys(), (stage, which)
            for name in expected:
                torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0,
                                           msg=f"{stage}/{which}: tensor {name} differs")
    whole = _result(uninterrupted, "report")["history"]
    assert [e.get("train_loss") for e in report["history"]] == pytest.approx([e.get("train_loss") for e in whole])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["02_train"]["resume"] is True  # the resumed stage is recorded in the same run folder


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_load_trained_model_puts_the_vision_model_and_the_projection_on_the_device(uninterrupted: Path,
                                                                                   device: str) -> None:
    model = load_trained_model(uninterrupted, device=device)
    assert {p.device.type for p in model.vision.parameters()} | {b.device.type for b in model.vision.buffers()} \
        == {device}
    assert {p.device.type for p in model.generator.projection.parameters()} == {device}
    assert not model.vision.training and not model.generator.training
    tokens = torch.zeros(1, 14, model.spec.feature_dim)
    assert model.generator.generate(tokens, [[1, 2, 3]], num_beams=2, max_new_tokens=3)  # runs where it was put
    with pytest.raises(FileNotFoundError, match="model_spec.json"):
        load_trained_model(uninterrupted / "vision", device=device)
