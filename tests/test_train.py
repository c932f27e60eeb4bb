"""The shared training loop: it learns, N processes match one, resume is exact, checkpoints are safe.

Every test trains a real (tiny) model through nbsupport.train; tasks live in tests/train_tasks.py so that
launched processes can import them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nbsupport.config import ConfigError
from nbsupport.runs import RunExistsError
from nbsupport.checkpoints import load_weights, read_checkpoint_meta
from nbsupport.launch import launch
from nbsupport.optim import build_optimizer
from nbsupport.train import TrainSettings, fit

TESTS_DIR = Path(__file__).parent
# The tasks are found by module name, here and in the processes launch() starts (they inherit sys.path);
# pytest's importlib mode does not put this folder on sys.path by itself.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))
from train_tasks import W_TRUE, SimulatedCrash, calls_made, make_regression, regression_data  # noqa: E402

BASE = TrainSettings(epochs=2, batch_size=8, lr=0.05, log_every=1)  # 64 items / 8 = 8 steps per epoch


def weights(run_dir: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / which / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=f"tensor {key} differs")


def train_losses(history: list[dict]) -> list[tuple[int, float]]:
    return [(e["step"], e["train_loss"]) for e in history if "train_loss" in e]


def assert_same_history(a: list[dict], b: list[dict], tol: float = 1e-6) -> None:
    """Same entries, values equal to float32 precision (a loss of 15 carries ~1e-6 of rounding)."""
    assert [sorted(e) for e in a] == [sorted(e) for e in b]
    for entry_a, entry_b in zip(a, b):
        assert entry_a == pytest.approx(entry_b, abs=tol, rel=tol), f"{entry_a} != {entry_b}"


def val_loss(model: torch.nn.Module) -> float:
    x, y = regression_data(32, seed=2).tensors
    model.eval()  # as fit() evaluates (bitsandbytes takes another, slightly different path in train mode)
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), y).item()


# ---------------------------------------------------------------------------------------------- learning
def test_learns_a_known_linear_map(tmp_path: Path) -> None:
    settings = dataclasses.replace(BASE, epochs=6, lr=0.1, log_every=4)
    torch.manual_seed(settings.seed)  # the init fit() will use: set_seed(seed) right before build_model
    untrained = make_regression().build_model()
    baseline = val_loss(untrained)

    result = fit(make_regression(), settings, tmp_path)

    trained = make_regression().build_model()
    load_weights(trained, result.best_checkpoint)
    assert val_loss(trained) < 0.5 * baseline
    assert result.best_metric == pytest.approx(val_loss(trained), rel=1e-5)
    assert torch.allclose(trained.weight.detach().T, W_TRUE, atol=0.5)  # near the true map, not just any fit
    assert result.steps == 48 and len(train_losses(result.history)) == 12


# ---------------------------------------------------------------------------------------------- processes
def test_two_processes_follow_the_one_process_curve(tmp_path: Path) -> None:
    settings = dataclasses.replace(BASE, num_processes=2)
    two = launch("train_tasks:make_regression", {"model": "mlp"}, settings, tmp_path / "two")
    one = launch("train_tasks:make_regression", {"model": "mlp"}, dataclasses.replace(settings, num_processes=1),
                 tmp_path / "one")

    curve_one, curve_two = train_losses(one.history), train_losses(two.history)
    assert [s for s, _ in curve_two] == list(range(1, 17))
    assert [s for s, _ in curve_one] == [s for s, _ in curve_two]
    for (step, a), (_, b) in zip(curve_one, curve_two):
        assert abs(a - b) < 1e-4, f"step {step}: one process {a}, two processes {b}"
    assert one.best_metric == pytest.approx(two.best_metric, abs=1e-4)
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=1e-5)
    state = torch.load(tmp_path / "two" / "checkpoints" / "last" / "training_state.pt", weights_only=True)
    assert len(state["rng"]) == 2  # really two processes, each with its own RNG stream
    assert len(list((tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1  # main process only


def test_failed_launch_raises_with_the_log_tail(tmp_path: Path) -> None:
    settings = dataclasses.replace(BASE, num_processes=2)
    with pytest.raises(RuntimeError, match="(?s)failed with exit code.*no_such_factory"):
        launch("train_tasks:no_such_factory", {}, settings, tmp_path)


# ---------------------------------------------------------------------------------------------- resume
def test_resume_after_a_crash_ends_with_the_uninterrupted_weights(tmp_path: Path) -> None:
    # Dropout (RNG state), accumulation and a moving lr all have to be restored for the weights to agree.
    settings = dataclasses.replace(BASE, epochs=3, batch_size=4, grad_accum=2, scheduler="warmup_cosine",
                                   warmup_steps=3, save_every=5, log_every=2)
    task_kwargs = {"model": "mlp", "dropout": 0.2}
    full = fit(make_regression(**task_kwargs), settings, tmp_path / "full")

    with pytest.raises(SimulatedCrash):  # call 27 is the first batch of optimizer step 14
        fit(make_regression(**task_kwargs, crash_at_call=27), settings, tmp_path / "crashed")
    assert read_checkpoint_meta(tmp_path / "crashed" / "checkpoints" / "last")["step"] == 10

    rerun = make_regression(**task_kwargs)
    resumed = fit(rerun, dataclasses.replace(settings, resume=True), tmp_path / "crashed")

    assert resumed.resumed_from == 10
    assert rerun.calls == (24 - 10) * 2  # only the missing steps were trained
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "crashed"))
    assert_same_history(resumed.history, full.history)


def test_resume_with_a_larger_max_steps_continues_the_run(tmp_path: Path) -> None:
    full = fit(make_regression(), dataclasses.replace(BASE, max_steps=12), tmp_path / "full")
    first = fit(make_regression(), dataclasses.replace(BASE, max_steps=5), tmp_path / "part")
    assert first.steps == 5
    more = fit(make_regression(), dataclasses.replace(BASE, max_steps=12, resume=True), tmp_path / "part")

    assert more.resumed_from == 5 and more.steps == 12
    assert more.history[:len(first.history)] == first.history  # continued, plus the first run's final evaluation
    assert [e["step"] for e in more.history if "val_loss" in e] == [5, 8, 12]
    assert_same_history([e for e in more.history if "lr" in e], [e for e in full.history if "lr" in e])
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "part"))


def test_resume_after_sigkill_ends_with_the_uninterrupted_weights(tmp_path: Path) -> None:
    settings = dataclasses.replace(BASE, epochs=3, save_every=1)  # a checkpoint write at every step
    full = fit(make_regression(), settings, tmp_path / "full")

    run_dir, calls_file = tmp_path / "killed", tmp_path / "calls"
    (tmp_path / "kwargs.json").write_text(json.dumps({"step_delay": 0.03, "calls_file": str(calls_file)}))
    (tmp_path / "settings.json").write_text(json.dumps(settings.to_dict()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    log = open(tmp_path / "trainer.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "nbsupport.launch", "--factory", "train_tasks:make_regression",
         "--kwargs", str(tmp_path / "kwargs.json"), "--settings", str(tmp_path / "settings.json"),
         "--out", str(run_dir)], env=env, stdout=log, stderr=subprocess.STDOUT)
    kill_at = 13  # mid-epoch; the kill lands wherever the process is, often inside a checkpoint write
    try:
        while calls_made(calls_file) < kill_at:
            assert process.poll() is None, f"trainer exited early: {(tmp_path / 'trainer.log').read_text()[-2000:]}"
            try:
                process.wait(timeout=0.005)
            except subprocess.TimeoutExpired:
                pass
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        log.close()
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "train_result.json").exists()

    resumed = fit(make_regression(), dataclasses.replace(settings, resume=True), run_dir)

    assert resumed.resumed_from is not None and 1 <= resumed.resumed_from <= kill_at
    assert_same_weights(weights(tmp_path / "full"), weights(run_dir))
    assert_same_history(resumed.history, full.history)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best", "last"]  # leftovers cleaned


def test_incomplete_checkpoints_are_never_loaded(tmp_path: Path) -> None:
    full_weights_dir = tmp_path / "full"
    fit(make_regression(), BASE, full_weights_dir)
    crashed = tmp_path / "crashed"
    with pytest.raises(SimulatedCrash):
        fit(make_regression(crash_at_call=11), BASE, crashed)  # 'last' holds step 8 (end of epoch 1)
    last = crashed / "checkpoints" / "last"

    # Leftovers of killed writes next to a good 'last': one without meta.json, one with a truncated file.
    with_leftovers = tmp_path / "leftovers"
    shutil.copytree(crashed, with_leftovers)
    no_meta = with_leftovers / "checkpoints" / ".last.tmp-dead"
    shutil.copytree(last, no_meta)
    (no_meta / "meta.json").unlink()
    truncated = with_leftovers / "checkpoints" / ".last.old-dead"
    shutil.copytree(last, truncated)
    meta = json.loads((truncated / "meta.json").read_text())
    (truncated / "meta.json").write_text(json.dumps({**meta, "step": 12}))  # would win if it were trusted
    with open(truncated / "training_state.pt", "r+b") as fh:
        fh.truncate(100)
    resumed = fit(make_regression(), dataclasses.replace(BASE, resume=True), with_leftovers)
    assert resumed.resumed_from == 8
    assert_same_weights(weights(full_weights_dir), weights(with_leftovers))

    # 'last' itself incomplete: it is neither resumed from nor loadable.
    for damage in ("drop meta", "truncate weights"):
        broken = tmp_path / damage.replace(" ", "_")
        shutil.copytree(crashed, broken)
        broken_last = broken / "checkpoints" / "last"
        if damage == "drop meta":
            (broken_last / "meta.json").unlink()
        else:
            with open(broken_last / "model.safetensors", "r+b") as fh:
                fh.truncate(50)
        with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
            load_weights(make_regression().build_model(), broken_last)
        again = fit(make_regression(), dataclasses.replace(BASE, resume=True), broken)
        assert again.resumed_from is None  # started over rather than trusting a half-written checkpoint
        assert_same_weights(weights(full_weights_dir), weights(broken))


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("mode, script", [("min", [3.0, 1.0, 2.0]), ("max", [1.0, 3.0, 2.0])])
def test_checkpoint_files_and_best_by_monitor(tmp_path: Path, mode: str, script: list[float]) -> None:
    settings = dataclasses.replace(BASE, epochs=3, monitor="val_scripted", monitor_mode=mode, log_every=4)
    result = fit(make_regression(scripted_metric=script), settings, tmp_path, config_hash="seg2d:abc123")

    last, best = tmp_path / "checkpoints" / "last", tmp_path / "checkpoints" / "best"
    assert (last / "model.safetensors").is_file() and (best / "model.safetensors").is_file()
    state = torch.load(last / "training_state.pt", weights_only=True)
    assert {"optimizer", "scheduler", "rng", "progress"} <= state.keys() and state["progress"]["step"] == 24
    meta_last, meta_best = read_checkpoint_meta(last), read_checkpoint_meta(best)
    assert meta_last["step"] == 24 and meta_last["config_hash"] == "seg2d:abc123"
    assert meta_last["settings"] == settings.to_dict()
    assert meta_best["step"] == 16 and result.best_metric == (3.0 if mode == "max" else 1.0)
    assert result.best_checkpoint == str(best) and result.last_checkpoint == str(last)
    evals = [e for e in result.history if "val_scripted" in e]
    assert [(e["step"], e["val_scripted"]) for e in evals] == list(zip([8, 16, 24], script))
    assert not torch.equal(weights(tmp_path, "best")["weight"], weights(tmp_path, "last")["weight"])
    assert json.loads((tmp_path / "train_result.json").read_text())["best_checkpoint"] == str(best)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [e["step"] for e in result.history if "lr" in e]
    assert [e.step for e in events.Scalars("val/scripted")] == [8, 16, 24]


def test_config_hash_mismatch_is_rejected(tmp_path: Path) -> None:
    fit(make_regression(), dataclasses.replace(BASE, max_steps=3), tmp_path, config_hash="seg2d:abc")
    model = make_regression().build_model()
    with pytest.raises(ValueError, match="'seg2d:abc'.*'prs_med:xyz'"):
        load_weights(model, tmp_path / "checkpoints" / "last", expected_config_hash="prs_med:xyz")
    load_weights(model, tmp_path / "checkpoints" / "last", expected_config_hash="seg2d:abc")
    assert_same_weights(model.state_dict(), weights(tmp_path))
    with pytest.raises(ValueError, match="config_hash"):
        fit(make_regression(), dataclasses.replace(BASE, max_steps=6, resume=True), tmp_path, config_hash="other")


def test_tied_and_trainable_only_weights_round_trip(tmp_path: Path) -> None:
    fit(make_regression(model="tied"), dataclasses.replace(BASE, max_steps=4), tmp_path / "tied")
    tied = make_regression(model="tied").build_model()
    load_weights(tied, tmp_path / "tied" / "checkpoints" / "last")
    assert tied.decode.weight is tied.encode.weight
    trained = weights(tmp_path / "tied")
    assert torch.equal(tied.encode.weight, trained.get("encode.weight", trained.get("decode.weight")))

    task = {"model": "mlp", "freeze_first": True}
    settings = dataclasses.replace(BASE, max_steps=4, save_trainable_only=True)
    partial = fit(make_regression(**task), settings, tmp_path / "partial")
    assert set(weights(tmp_path / "partial")) == {"3.weight", "3.bias"}
    torch.manual_seed(settings.seed)  # the frozen layer comes from build_model, as in fit()
    model = make_regression(**task).build_model()
    load_weights(model, tmp_path / "partial" / "checkpoints" / "last")
    assert val_loss(model) == pytest.approx(partial.best_metric, rel=1e-6)


def test_qlora_model_saves_its_adapters_and_reloads(tmp_path: Path) -> None:
    result = fit(make_regression(model="qlora"), dataclasses.replace(BASE, lr=0.01), tmp_path)
    saved = weights(tmp_path)
    assert saved and all("lora_" in k or "modules_to_save" in k for k in saved)  # no 4-bit base tensors

    torch.manual_seed(BASE.seed)
    model = make_regression(model="qlora").build_model().to("cpu")  # .to() is what quantizes NF4 weights
    load_weights(model, result.best_checkpoint)
    assert val_loss(model) == pytest.approx(result.best_metric, rel=1e-5)


def test_an_existing_run_is_not_overwritten(tmp_path: Path) -> None:
    fit(make_regression(), dataclasses.replace(BASE, max_steps=2), tmp_path)
    with pytest.raises(RunExistsError, match="resume=True"):
        fit(make_regression(), dataclasses.replace(BASE, max_steps=2), tmp_path)
    with pytest.raises(ValueError, match="lr: 0.05 -> 0.1"):
        fit(make_regression(), dataclasses.replace(BASE, max_steps=4, lr=0.1, resume=True), tmp_path)


# ---------------------------------------------------------------------------------------------- optimisation
COSINE = [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]  # after 2 warm-up steps, 8 steps to go


@pytest.mark.parametrize("scheduler, factors", [
    ("constant", [1.0] * 10),
    ("warmup_cosine", [1 / 3, 2 / 3, *COSINE]),
    ("multistep", [1.0] * 5 + [0.1] * 2 + [0.01] * 3),  # milestones at steps floor(0.5*10)=5, floor(0.75*10)=7
])
def test_learning_rate_schedules(tmp_path: Path, scheduler: str, factors: list[float]) -> None:
    settings = dataclasses.replace(BASE, epochs=1, lr=0.01, scheduler=scheduler, warmup_steps=2,
                                   milestones=(0.5, 0.75), gamma=0.1)
    result = fit(make_regression(n_train=80), settings, tmp_path)  # 10 optimizer steps
    logged = [e["lr"] for e in result.history if "lr" in e]
    assert logged == pytest.approx([0.01 * f for f in factors], rel=1e-9)


def test_gradient_accumulation_equals_the_larger_batch(tmp_path: Path) -> None:
    accumulated = fit(make_regression(), dataclasses.replace(BASE, batch_size=4, grad_accum=2, max_steps=3),
                      tmp_path / "accum")
    large = fit(make_regression(), dataclasses.replace(BASE, batch_size=8, max_steps=3), tmp_path / "large")
    assert_same_weights(weights(tmp_path / "accum"), weights(tmp_path / "large"))
    assert_same_history(accumulated.history, large.history)


def test_paged_adamw_falls_back_to_adamw_on_cpu(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nbsupport.train"):
        fit(make_regression(), dataclasses.replace(BASE, optimizer="paged_adamw", max_steps=3), tmp_path / "paged")
    assert "falls back to torch AdamW" in caplog.text
    fit(make_regression(), dataclasses.replace(BASE, optimizer="adamw", max_steps=3), tmp_path / "adamw")
    assert_same_weights(weights(tmp_path / "paged"), weights(tmp_path / "adamw"))


def test_amsgrad_reaches_adam_and_adamw_only() -> None:
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    for name in ("adam", "adamw"):
        optimizer = build_optimizer(params, TrainSettings(optimizer=name, amsgrad=True), torch.device("cpu"))
        assert optimizer.defaults["amsgrad"] is True, name
    assert build_optimizer(params, TrainSettings(), torch.device("cpu")).defaults["amsgrad"] is False
    with pytest.raises(ConfigError, match="amsgrad applies to adam and adamw only"):
        TrainSettings(optimizer="sgd", amsgrad=True)


def test_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="batch_size=3 .* divisible by num_processes=2"):
        TrainSettings(batch_size=3, num_processes=2)
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        TrainSettings(optimizer="lion")
    with pytest.raises(ConfigError, match="milestones"):
        TrainSettings(milestones=(0.8, 0.2))
    with pytest.raises(ConfigError, match="unknown fields \\['learning_rate'\\]"):
        TrainSettings.from_dict({"learning_rate": 0.1})
    assert TrainSettings.from_dict(BASE.to_dict()) == BASE
    assert all(TrainSettings.describe().values())  # every field has help text


def test_a_users_accelerate_config_decides_machines_and_port(tmp_path: Path) -> None:
    from nbsupport.launch import launch_command, machines_in

    config = tmp_path / "two_nodes.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 2\n"
                      "machine_rank: 1\nmain_process_ip: 10.0.0.1\nmain_process_port: 29500\n")
    command = launch_command(8, ["--out", "x"], accelerate_config=config)
    assert command[command.index("--config_file") + 1] == str(config)
    assert "--num_machines" not in command and "--main_process_port" not in command
    assert command[command.index("--num_processes") + 1] == "8" and machines_in(config) == 2
    plain = launch_command(2, ["--out", "x"])
    assert plain[plain.index("--num_machines") + 1] == "1" and "--multi_gpu" in plain and machines_in(None) == 1


# ---------------------------------------------------------------------------------------------- phase clock
class _SlowItems(torch.utils.data.Dataset):
    """The regression items, each taking ``delay`` seconds to load (a data loader that is the bottleneck)."""

    def __init__(self, items: torch.utils.data.Dataset, delay: float):
        self.items, self.delay = items, delay

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        import time

        time.sleep(self.delay)
        return self.items[i]


def test_the_loop_reports_where_its_time_went(tmp_path: Path, capsys) -> None:
    from nbsupport.progress import PhaseClock

    task = make_regression()
    items = task.train_dataset()
    task.train_dataset = lambda: _SlowItems(items, delay=0.02)  # 64 items: >= 1.28 s waiting for data per epoch
    import time

    started = time.perf_counter()
    result = fit(task, dataclasses.replace(BASE, epochs=1), tmp_path)
    wall = time.perf_counter() - started

    phases = result.phase_seconds
    assert list(phases) == list(PhaseClock.PHASES)
    assert phases["data"] >= 64 * 0.02, phases
    assert max(phases, key=phases.get) == "data", phases
    assert min(phases.values()) >= 0
    assert sum(phases.values()) <= wall
    stored = json.loads((tmp_path / "train_result.json").read_text())["phase_seconds"]
    assert stored == phases
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("progress: train time ")]
    assert len(line) == 1 and "data " in line[0] and "%)" in line[0], line


# ---------------------------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, "bf16"), (False, True, "bf16"),
                                                         (False, False, "no")])
def test_bf16_native_autocasts_only_where_the_cpu_computes_bf16(monkeypatch, avx512_bf16, amx, expected) -> None:
    from nbsupport.optim import resolve_mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_mixed_precision("bf16_native") == expected
    assert resolve_mixed_precision("auto") == "no"  # auto stays fp32 on every CPU


def test_bf16_native_trains_under_cpu_autocast_where_the_cpu_has_it(tmp_path: Path) -> None:
    """The loop's forward runs under bf16 autocast when this CPU computes bf16 natively, in fp32 otherwise."""
    from nbsupport.optim import native_bf16

    seen: list[torch.dtype] = []
    task = make_regression()
    build = task.build_model

    def recording_model():
        model = build()
        model.register_forward_pre_hook(lambda *_: seen.append(
            torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32))
        return model

    task.build_model = recording_model
    fit(task, dataclasses.replace(BASE, epochs=1, mixed_precision="bf16_native"), tmp_path)
    assert torch.bfloat16 in seen if native_bf16() else set(seen) == {torch.float32}
