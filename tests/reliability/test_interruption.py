"""Runs killed with SIGKILL — at a random step, and at every point of a checkpoint write — resume exactly.

Each test starts a real training process (``python -m nbsupport.launch`` on a tiny regression task from
tests/train_tasks.py), kills it with SIGKILL, checks what the kill left on disk, resumes with ``resume=True`` in
this process and compares the final weights and history with an uninterrupted run (CPU, deterministic).
The random draws are printed in every assertion message; ``NBSUPPORT_FAULT_SEED=<n>`` replays one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from nbsupport.checkpoints import load_weights, read_checkpoint_meta
from nbsupport.train import TrainResult, TrainSettings, fit

TESTS_DIR = Path(__file__).resolve().parents[1]
FAULT_TRAINER = Path(__file__).with_name("fault_trainer.py")
if str(TESTS_DIR) not in sys.path:  # train_tasks is imported by module name here and in the killed process
    sys.path.insert(0, str(TESTS_DIR))
from train_tasks import calls_made, make_regression

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))
from fault_tasks import make_target_task

SEED = int(os.environ.get("NBSUPPORT_FAULT_SEED") or random.SystemRandom().randrange(1 << 30))
DRAWS = random.Random(SEED)
# 64 items / (4 x 2 accumulated) = 8 optimizer steps per epoch, 24 in all; dropout, accumulation and a moving lr
# all have to be restored exactly for the weights to agree.
KILL_SETTINGS = TrainSettings(epochs=3, batch_size=4, grad_accum=2, lr=0.05, scheduler="warmup_cosine",
                              warmup_steps=3, save_every=3, log_every=2)
KILL_TASK = {"model": "mlp", "dropout": 0.2}
# A checkpoint write at every step. The monitor is the distance to the weights of step 16, so it is best at the
# 2nd of 3 evaluations (steps 8, 16, 24), as when a model starts to overfit: 'best' is written at steps 8 and 16
# and must end as step 16's weights.
WRITE_SETTINGS = TrainSettings(epochs=3, batch_size=8, lr=0.05, save_every=1, log_every=1, monitor="val_distance")
BEST_STEP = 16
TIMEOUT_S = 120


def weights(run_dir: Path, which: str) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / which / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], context: str) -> None:
    assert a.keys() == b.keys(), context
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=f"{context}: tensor {key} differs")


def train_entries(history: list[dict]) -> list[dict]:
    return [e for e in history if "train_loss" in e]


def _write_inputs(tmp_path: Path, settings: TrainSettings, task: dict[str, Any],
                  factory: str = "train_tasks:make_regression") -> list[str]:
    (tmp_path / "kwargs.json").write_text(json.dumps(task))
    (tmp_path / "settings.json").write_text(json.dumps(settings.to_dict()))
    return ["--factory", factory, "--kwargs", str(tmp_path / "kwargs.json"),
            "--settings", str(tmp_path / "settings.json"), "--out", str(tmp_path / "run")]


def _start(command: list[str], tmp_path: Path) -> tuple[subprocess.Popen, Any]:
    path = [str(TESTS_DIR), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    log = open(tmp_path / "trainer.log", "w")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log


def _kill_when(process: subprocess.Popen, log: Any, ready: Any, tmp_path: Path, context: str) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` is true; fail if it ends by itself first."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ready():
            log.flush()
            assert process.poll() is None, \
                f"{context}: trainer exited early:\n{(tmp_path / 'trainer.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{context}: trainer did not reach the kill point in {TIMEOUT_S}s"
            time.sleep(0.002)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        log.close()
    assert process.returncode == -signal.SIGKILL, context


def _assert_nothing_incomplete_is_loadable(run_dir: Path, context: str) -> list[str]:
    """Every checkpoint folder the kill left is complete, or else refused by load_weights; returns their names."""
    names = []
    for folder in sorted((run_dir / "checkpoints").iterdir()) if (run_dir / "checkpoints").is_dir() else []:
        names.append(folder.name)
        if read_checkpoint_meta(folder) is None:
            assert folder.name not in ("last", "best"), f"{context}: {folder.name} is half-written"
            with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
                load_weights(make_regression(model="mlp").build_model(), folder)
    return names


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[TrainResult, Path]]:
    """The reference runs, trained once in this process."""
    root = tmp_path_factory.mktemp("uninterrupted")
    # The fixed point: the weights after step 16, from the same trajectory (constant lr: max_steps changes nothing
    # before it).
    fit(make_regression(model="mlp"), dataclasses.replace(WRITE_SETTINGS, max_steps=BEST_STEP, monitor="val_loss"),
        root / "target")
    write_task = {"model": "mlp", "target_file": str(root / "target" / "checkpoints" / "last" / "model.safetensors")}
    return {"kill": (fit(make_regression(**KILL_TASK), KILL_SETTINGS, root / "kill"), root / "kill"),
            "write": (fit(make_target_task(**write_task), WRITE_SETTINGS, root / "write"), root / "write"),
            "write_task": write_task}


# ---------------------------------------------------------------------------------------------- random kill
def test_sigkill_at_a_random_step_then_resume_matches_the_uninterrupted_run(tmp_path: Path, uninterrupted) -> None:
    full, full_dir = uninterrupted["kill"]
    kill_at_call = DRAWS.randrange(1, 48)  # any of the 48 forward passes, mid-accumulation included
    context = f"NBSUPPORT_FAULT_SEED={SEED}, SIGKILL once training_step call {kill_at_call} began"
    calls_file = tmp_path / "calls"
    task = {**KILL_TASK, "step_delay": 0.02, "calls_file": str(calls_file)}
    process, log = _start([sys.executable, "-m", "nbsupport.launch", *_write_inputs(tmp_path, KILL_SETTINGS, task)],
                          tmp_path)
    _kill_when(process, log, lambda: calls_made(calls_file) >= kill_at_call, tmp_path, context)
    run_dir = tmp_path / "run"
    assert not (run_dir / "train_result.json").exists(), context
    _assert_nothing_incomplete_is_loadable(run_dir, context)
    saved = read_checkpoint_meta(run_dir / "checkpoints" / "last") if (run_dir / "checkpoints").is_dir() else None

    resumed = fit(make_regression(**KILL_TASK), dataclasses.replace(KILL_SETTINGS, resume=True), run_dir)

    # The kill lands a little after call kill_at_call began (polling; a busy machine): count what really ran.
    calls_begun = calls_made(calls_file)
    assert calls_begun >= kill_at_call, context
    steps_started = (calls_begun + 1) // 2
    if resumed.resumed_from is not None:
        assert resumed.resumed_from <= steps_started, context
        # Checkpoints: every 3rd step and at epoch ends; a kill cannot lose more than one interval.
        assert resumed.resumed_from % 3 == 0 or resumed.resumed_from % 8 == 0, context
        assert steps_started - resumed.resumed_from <= 3, context
        assert saved is None or resumed.resumed_from >= saved["step"], context
    else:
        assert steps_started <= 3, f"{context}: started over although a checkpoint should exist"
    assert resumed.steps == full.steps == 24, context
    for which in ("last", "best"):
        assert_same_weights(weights(full_dir, which), weights(run_dir, which), f"{context}, {which}")
    assert len(resumed.history) == len(full.history), context
    for a, b in zip(resumed.history, full.history):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6), f"{context}: {a} != {b}"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best", "last"], context


# ---------------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_mid_epoch_saves_the_finished_step_exits_143_and_resumes_exactly(tmp_path: Path) -> None:
    """A cluster's time limit: SIGTERM, then (after a grace period) SIGKILL. The trainer finishes the step in
    progress, writes it as 'last' although no checkpoint is due, and exits with 143; resume loses nothing."""
    settings = dataclasses.replace(KILL_SETTINGS, save_every=0)  # checkpoints only at epoch ends (steps 8, 16, 24)
    full = fit(make_regression(**KILL_TASK), settings, tmp_path / "full")
    term_at_call = DRAWS.randrange(3, 14)  # inside the first epoch (calls 1-16), after a step or mid-accumulation
    context = f"NBSUPPORT_FAULT_SEED={SEED}, SIGTERM once training_step call {term_at_call} began"
    calls_file = tmp_path / "calls"
    task = {**KILL_TASK, "step_delay": 0.02, "calls_file": str(calls_file)}
    process, log = _start([sys.executable, "-m", "nbsupport.launch", *_write_inputs(tmp_path, settings, task)],
                          tmp_path)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while calls_made(calls_file) < term_at_call:
            assert process.poll() is None and time.monotonic() < deadline, context
            time.sleep(0.002)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=TIMEOUT_S)
    finally:
        process.kill()
        log.close()
    output = (tmp_path / "trainer.log").read_text()
    assert code == 143, f"{context}: exit code {code}\n{output[-2000:]}"
    assert "resume=True" in output, context
    run_dir = tmp_path / "run"
    saved = read_checkpoint_meta(run_dir / "checkpoints" / "last")
    assert saved is not None and 1 <= saved["step"] < 8, f"{context}: {saved}"  # mid-epoch: no checkpoint was due
    assert calls_made(calls_file) <= 2 * saved["step"] + 2, f"{context}: more than the step in progress ran"

    resumed = fit(make_regression(**KILL_TASK), dataclasses.replace(settings, resume=True), run_dir)
    assert resumed.resumed_from == saved["step"], context
    assert resumed.steps == full.steps == 24, context
    for which in ("last", "best"):
        assert_same_weights(weights(tmp_path / "full", which), weights(run_dir, which), f"{context}, {which}")


# ---------------------------------------------------------------------------------------------- kill inside a write
# phase -> (first write that can reach it, step resumed from when the write of step s is cut there)
WRITE_PHASES = {
    "last_weights_half_written": (1, lambda s: s - 1),
    "last_state_half_written": (1, lambda s: s - 1),
    "last_files_without_meta": (1, lambda s: s - 1),
    "last_old_moved_aside": (2, lambda s: s),  # the new write is complete, only its rename is missing
    "last_swapped_before_cleanup": (1, lambda s: s),
    "best_files_without_meta": (1, lambda s: s),  # 'last' of the same step was written just before 'best'
    "best_old_moved_aside": (2, lambda s: s),
}


@pytest.mark.parametrize("phase", sorted(WRITE_PHASES))
def test_sigkill_inside_a_checkpoint_write_leaves_nothing_half_written_and_resumes_exactly(
        phase: str, tmp_path: Path, uninterrupted) -> None:
    full, full_dir = uninterrupted["write"]
    write_task = uninterrupted["write_task"]
    assert full.best_metric == 0.0 and read_checkpoint_meta(full_dir / "checkpoints" / "best")["step"] == BEST_STEP
    first, resumed_step = WRITE_PHASES[phase]
    if phase.startswith("best"):
        # 'best' is written at steps 8 and 16 only; the first write has no previous 'best' to move aside.
        step = 16 if first == 2 else DRAWS.choice([8, 16])
        nth = step // 8 - first + 1
    else:
        step = DRAWS.randrange(first, 24)  # any step's write (one per step), the final one aside
        nth = step - first + 1
    context = f"NBSUPPORT_FAULT_SEED={SEED}, SIGKILL at {phase} of the write of step {step}"
    marker = tmp_path / "frozen.json"
    command = [sys.executable, str(FAULT_TRAINER), "--phase", phase, "--nth", str(nth), "--marker", str(marker),
               "--", *_write_inputs(tmp_path, WRITE_SETTINGS, write_task, "fault_tasks:make_target_task")]
    process, log = _start(command, tmp_path)
    _kill_when(process, log, marker.exists, tmp_path, context)
    frozen = json.loads(marker.read_text())
    if "step" in frozen and frozen["step"] is not None:
        assert int(frozen["step"]) == step, f"{context}: froze at {frozen}"

    run_dir = tmp_path / "run"
    left = _assert_nothing_incomplete_is_loadable(run_dir, context)
    if phase.endswith("old_moved_aside"):
        kind = phase.split("_")[0]
        assert kind not in left, f"{context}: the kill was meant to land between the two renames, found {left}"

    resumed = fit(make_target_task(**write_task), dataclasses.replace(WRITE_SETTINGS, resume=True), run_dir)

    expected_from = resumed_step(step)
    assert resumed.resumed_from == (expected_from or None), f"{context}: resumed from {resumed.resumed_from}"
    assert resumed.steps == 24, context
    assert_same_weights(weights(full_dir, "last"), weights(run_dir, "last"), f"{context}, last")
    assert_same_weights(weights(full_dir, "best"), weights(run_dir, "best"), f"{context}, best")
    assert read_checkpoint_meta(run_dir / "checkpoints" / "best")["step"] == BEST_STEP, context
    assert resumed.best_metric == full.best_metric, context
    assert len(resumed.history) == len(full.history), context
    for a, b in zip(resumed.history, full.history):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6), f"{context}: {a} != {b}"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best", "last"], context
