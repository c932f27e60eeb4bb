"""One training loop for every system, on accelerate: checkpoints that survive a kill, and exact resume.

A system describes *what* to train as a :class:`TrainingTask` (model, datasets, loss, metrics); this module
decides *how*: gradient accumulation, mixed precision, evaluation, logging and checkpoints, with the optimizer and
learning-rate schedule of :mod:`nbsupport.optim`. The same :func:`fit` runs in a notebook kernel (one process) and in each of N processes started
by ``accelerate launch`` (DDP; gloo on CPU); :func:`nbsupport.launch.launch` picks between the two from
``TrainSettings.num_processes``, and :mod:`nbsupport.checkpoints` stores and reads the checkpoints.

Run folder written by ``fit(task, settings, out_dir)``::

    out_dir/
      train_result.json            TrainResult (history, best metric, checkpoint paths), written at the end
      tensorboard/                 event files: train/loss, train/lr, val/<metric>
      checkpoints/last/            model.safetensors, training_state.pt, meta.json   (resume from here)
      checkpoints/best/            model.safetensors, meta.json                      (best by settings.monitor)

Checkpoints are written crash-safely (see :mod:`nbsupport.checkpoints`). Semantics a researcher can rely on:

* ``batch_size`` is the *global* batch: N processes each get ``batch_size / N`` of the same global batch, so
  one process and N processes follow the same loss curve (up to float reduction order).
* The data order depends only on ``(seed, epoch)``; an epoch is cut to a whole number of optimizer steps.
  Resuming skips the batches already seen, so an interrupted and resumed run ends with the same weights as an
  uninterrupted one (on CPU, and with ``num_workers=0`` when the dataset draws random augmentations).
* Evaluation runs on the main process over the whole validation set; its metrics are stored as ``val_<key>``.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import math
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, get_args, get_origin, get_type_hints

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, broadcast_object_list, gather_object
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from nbsupport.checkpoints import (STATE_FILE, WEIGHTS_FILE, find_resumable, load_training_state, load_weights,
                                   read_checkpoint_meta, repair_best, restore_rng, rng_state, save_weights,
                                   write_checkpoint)
from nbsupport.config import ConfigError, param
from nbsupport.optim import MixedPrecision, build_optimizer, build_scheduler, resolve_mixed_precision
from nbsupport.progress import LINE_PREFIX, PhaseClock, progress
from nbsupport.runs import RunExistsError, atomic_write_json

logger = logging.getLogger(__name__)

RESULT_FILE = "train_result.json"
# Settings that may change between a run and its resume; any other change would make "resume" a different run.
RESUMABLE_CHANGES = {"epochs", "max_steps", "eval_every", "log_every", "save_every", "resume", "num_processes",
                     "num_workers", "mixed_precision"}


# ============================================================================================== settings
@dataclass(frozen=True)
class TrainSettings:
    """How to train: the part of a system's TrainConfig that the shared loop reads."""

    epochs: int = param(1, "passes over the training set")
    max_steps: int | None = param(None, "stop after this many optimizer steps (smoke runs, tests); also the "
                                        "length of the lr schedule when shorter than epochs")
    batch_size: int = param(2, "GLOBAL batch per forward pass, split evenly across processes")
    lr: float = param(1e-4, "peak learning rate")
    weight_decay: float = param(0.0, "weight decay on matrices and kernels (ndim >= 2); none on biases and norms")
    optimizer: Literal["adamw", "adam", "sgd", "paged_adamw"] = param(
        "adamw", "paged_adamw is bitsandbytes' PagedAdamW (CUDA only; AdamW on CPU, with a logged note)")
    momentum: float = param(0.9, "SGD momentum (ignored by the Adam family)")
    amsgrad: bool = param(False, "AMSGrad variant of adam / adamw (the running maximum of the second moment)")
    scheduler: Literal["constant", "warmup_cosine", "multistep"] = param(
        "constant", "warmup_cosine: linear warm-up then cosine to 0; multistep: lr * gamma at each milestone")
    warmup_steps: int = param(0, "optimizer steps of linear warm-up (warmup_cosine)")
    milestones: tuple[float, ...] = param((0.5, 0.75), "multistep milestones as fractions of the total steps")
    gamma: float = param(0.1, "multistep decay factor per milestone")
    grad_accum: int = param(1, "forward passes per optimizer step; effective batch = batch_size * grad_accum")
    grad_clip: float | None = param(None, "clip the global gradient norm to this value; None: no clipping")
    eval_every: int = param(1, "epochs between evaluations (the last step is always evaluated)")
    log_every: int = param(10, "optimizer steps between history / TensorBoard entries")
    save_every: int = param(0, "optimizer steps between 'last' checkpoints; 0: at epoch ends and the end only")
    save_trainable_only: bool | None = param(None, "store only trainable parameters and buffers (LoRA, heads); the "
                                                   "frozen rest comes from build_model again. None: only for models "
                                                   "with bitsandbytes-quantized weights, which cannot be reloaded")
    monitor: str = param("val_loss", "metric that picks the best checkpoint (val_<key> or train_loss)")
    monitor_mode: Literal["min", "max"] = param("min", "whether a smaller or a larger monitor value is better")
    resume: bool = param(False, "continue from the last complete checkpoint in out_dir")
    num_processes: int = param(1, "training processes (DDP through accelerate launch; gloo on CPU)")
    num_workers: int = param(0, "DataLoader worker processes per training process")
    seed: int = param(0, "seed for initialisation, data order and dropout")
    mixed_precision: MixedPrecision = param("auto", "autocast: see nbsupport.optim.resolve_mixed_precision")

    def __post_init__(self) -> None:
        problems = []
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            allowed, value = get_args(hints[f.name]), getattr(self, f.name)
            if get_origin(hints[f.name]) is Literal and value not in allowed:
                problems.append(f"{f.name} must be one of {list(allowed)}, got {value!r}")
        positive = ("epochs", "batch_size", "grad_accum", "eval_every", "log_every", "num_processes")
        problems += [f"{n} must be >= 1, got {getattr(self, n)!r}" for n in positive if getattr(self, n) < 1]
        non_negative = ("weight_decay", "warmup_steps", "save_every", "num_workers", "momentum")
        problems += [f"{n} must be >= 0, got {getattr(self, n)!r}" for n in non_negative if getattr(self, n) < 0]
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be >= 1 or None, got {self.max_steps!r}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr!r}")
        if not self.gamma > 0:
            problems.append(f"gamma must be > 0, got {self.gamma!r}")
        if self.amsgrad and self.optimizer not in ("adam", "adamw"):
            problems.append(f"amsgrad applies to adam and adamw only, got optimizer={self.optimizer!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if any(not 0 < m < 1 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            problems.append(f"milestones must be increasing fractions in (0, 1), got {self.milestones!r}")
        if self.batch_size % self.num_processes:
            problems.append(f"batch_size={self.batch_size} is the global batch and must be divisible by "
                            f"num_processes={self.num_processes}")
        if problems:
            raise ConfigError("TrainSettings: " + "; ".join(problems))

    @classmethod
    def describe(cls) -> dict[str, str]:
        """Field name -> help text."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainSettings:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming the allowed ones."""
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"TrainSettings: unknown fields {sorted(unknown)}; allowed: {sorted(cls.describe())}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# ============================================================================================== task and result
class TrainingTask(Protocol):
    """What a system hands to :func:`fit`.

    Optional methods, used when present: ``collate(items) -> batch`` (default ``default_collate``) and
    ``trainable_parameters(model) -> iterable`` of parameters or of optimizer param-group dicts (default: every
    parameter with ``requires_grad``; matrices get weight decay, vectors do not).
    """

    def build_model(self) -> torch.nn.Module: ...

    def train_dataset(self) -> Dataset: ...

    def val_dataset(self) -> Dataset | None: ...

    def training_step(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Scalar mean loss of one (per-process) batch, already on the training device."""
        ...

    def evaluate(self, model: torch.nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        """Metrics over the whole loader (batches on the CPU; move them to ``device``); keys without ``val_``."""
        ...


@dataclass
class TrainResult:
    """What a run produced. ``history`` entries: ``{"step", "epoch", "train_loss", "lr"}`` every ``log_every``
    steps and ``{"step", "epoch", "val_<key>": ...}`` at each evaluation; ``epoch`` counts completed epochs."""

    history: list[dict[str, float]]
    best_metric: float | None
    best_checkpoint: str | None
    last_checkpoint: str | None
    steps: int
    monitor: str = "val_loss"
    resumed_from: int | None = None  # the step of the checkpoint this run continued from
    phase_seconds: dict[str, float] = field(default_factory=dict)  # where this process's loop time went (PhaseClock)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainResult:
        return cls(**values)


@dataclass
class _Progress:
    """Everything besides model/optimizer/scheduler/RNG that a resume must restore to continue exactly."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_metric: float | None = None
    best_step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # latest evaluation
    log_loss: list[float] = field(default_factory=lambda: [0.0, 0])  # [sum, steps] since the last history entry
    eval_loss: list[float] = field(default_factory=lambda: [0.0, 0])  # [sum, steps] since the last evaluation


# ============================================================================================== the loop
class TrainingInterrupted(RuntimeError):
    """The run was asked to stop (SIGTERM: a cluster's time limit or preemption) and wrote a ``last`` checkpoint
    at the step it had finished; ``resume=True`` continues from there."""

    EXIT_CODE = 143  # 128 + SIGTERM, what a scheduler expects from a process that stopped on its signal


def fit(task: TrainingTask, settings: TrainSettings, out_dir: str | os.PathLike, config_hash: str = "") -> TrainResult:
    """Train ``task`` in this process (alone, or as one of ``settings.num_processes`` DDP processes).

    Args:
        task: model, data, loss and metrics (see :class:`TrainingTask`).
        settings: optimisation and checkpointing settings.
        out_dir: run folder for checkpoints, TensorBoard events and ``train_result.json``.
        config_hash: fingerprint of the system config, stored in every checkpoint; a resume or
            :func:`nbsupport.checkpoints.load_weights` with another hash is refused.

    Raises:
        RunExistsError: ``out_dir`` holds an earlier run and ``settings.resume`` is False.
        TrainingInterrupted: SIGTERM arrived; the step in progress was finished and saved as ``last``.
    """
    out_dir = Path(out_dir)
    if not settings.resume:
        refuse_overwrite(out_dir)
    accelerator = _accelerator(settings)
    run = None
    try:
        if accelerator.num_processes != settings.num_processes:
            raise RuntimeError(f"settings.num_processes={settings.num_processes} but this process is one of "
                               f"{accelerator.num_processes}; start several processes with launch(), not fit()")
        run = _Run(task, settings, accelerator, out_dir, config_hash)
        run.resume_or_start()
        with _StopRequest() as stop:
            run.train(stop)
        return run.finish()
    finally:
        if run is not None and run.writer is not None:
            run.writer.close()
        # accelerate keeps its state in process-wide singletons; a second fit() in the same notebook kernel
        # (other precision, other accumulation) must start from a clean slate. The process group stays.
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _accelerator(settings: TrainSettings) -> Accelerator:
    """Device and precision, decided once here; prepare() wraps the model's forward in autocast."""
    on_cpu = not torch.cuda.is_available()
    # A long main-process evaluation keeps the other processes waiting; the default 30 min can be too short.
    process_group = InitProcessGroupKwargs(timeout=_dt.timedelta(hours=2))
    if on_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        process_group.backend = "gloo"  # accelerate would take MPI where torch has it, which needs mpirun
    return Accelerator(
        cpu=on_cpu,  # also what makes accelerate join the launched CPU processes into one group
        gradient_accumulation_steps=settings.grad_accum,
        mixed_precision=resolve_mixed_precision(settings.mixed_precision),
        # split_batches: every process takes its slice of the same global batch, the basis of "N == 1 process".
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        rng_types=[],  # our sampler is seeded by (seed, epoch); accelerate must not re-sync RNGs behind our back
        kwargs_handlers=[process_group],
    )


class _StopRequest:
    """Turns SIGTERM into a request the loop honours between optimizer steps (installed in the main thread only;
    the previous handler comes back on exit)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning("SIGTERM: finishing the current step, then writing a checkpoint and stopping")
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _Run:
    """One training run: built identically on every process, then resumed or started, trained, summarised."""

    def __init__(self, task: TrainingTask, settings: TrainSettings, accelerator: Accelerator, out_dir: Path,
                 config_hash: str):
        self.task, self.settings, self.accelerator = task, settings, accelerator
        self.out_dir, self.ckpt_dir, self.config_hash = out_dir, out_dir / "checkpoints", config_hash
        self.main = accelerator.is_main_process
        self.writer: Any = None
        self.state, self.resumed_from = _Progress(), None
        # ---- model, data, optimizer, schedule: identical on every process (same seed, same init)
        set_seed(settings.seed)
        model = task.build_model()
        train_set, val_set = task.train_dataset(), task.val_dataset()
        if val_set is None and settings.monitor.startswith("val_"):
            raise ConfigError(f"monitor={settings.monitor!r} needs a validation set but task.val_dataset() is None;"
                              " use monitor='train_loss'")
        collate = getattr(task, "collate", None) or default_collate
        self.samples_per_step = settings.batch_size * settings.grad_accum
        self.steps_per_epoch = len(train_set) // self.samples_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set has {len(train_set)} items, fewer than one optimizer step needs "
                             f"(batch_size * grad_accum = {self.samples_per_step})")
        self.total_steps = settings.epochs * self.steps_per_epoch
        if settings.max_steps is not None:
            self.total_steps = min(self.total_steps, settings.max_steps)
        self.sampler = EpochShuffle(len(train_set), settings.seed, multiple_of=self.samples_per_step)
        train_loader = DataLoader(train_set, batch_size=settings.batch_size, sampler=self.sampler, drop_last=True,
                                  collate_fn=collate, num_workers=settings.num_workers,
                                  generator=self.sampler.generator)
        self.val_loader = None if val_set is None else DataLoader(
            val_set, batch_size=settings.batch_size, shuffle=False, collate_fn=collate,
            num_workers=settings.num_workers)
        trainable = getattr(task, "trainable_parameters", None)
        params = trainable(model) if trainable else [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, settings, accelerator.device)
        scheduler = build_scheduler(optimizer, settings, self.total_steps)
        self.model, self.optimizer, self.train_loader, self.scheduler = accelerator.prepare(
            model, optimizer, train_loader, scheduler)
        self.bare_model = accelerator.unwrap_model(self.model)

    def resume_or_start(self) -> None:
        """Continue from the newest complete ``last`` checkpoint (``settings.resume``), or start at step 0. From
        here on the RNG streams differ per process (dropout, augmentation)."""
        settings, main = self.settings, self.main
        source = find_resumable(self.ckpt_dir) if settings.resume else None
        if source is not None:
            source_meta = _check_resumable(source, settings, self.steps_per_epoch)
            load_weights(self.bare_model, source, expected_config_hash=self.config_hash)  # refuses another config
            saved = load_training_state(source / STATE_FILE)
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.state = _Progress(**saved["progress"])
            restore_rng(saved["rng"], self.accelerator.process_index, settings.seed)
            self.resumed_from = self.state.step
            if main:
                logger.warning("resuming from %s at step %d of %d", source, self.state.step, self.total_steps)
                repair_best(self.ckpt_dir / "best", source_meta, self.state.step, self.state.best_step,
                            self.bare_model, settings.save_trainable_only)
                if source_meta["total_steps"] != self.total_steps and settings.scheduler != "constant":
                    logger.warning("the schedule now spans %d steps instead of %d: the lr curve bends at step %d",
                                   self.total_steps, source_meta["total_steps"], self.state.step)
        else:
            if settings.resume and main:
                logger.warning("resume=True but %s holds no complete checkpoint: starting from step 0", self.ckpt_dir)
            set_seed(settings.seed + self.accelerator.process_index)
        if main:
            # purge_step drops events a killed run logged after its last checkpoint.
            self.writer = _summary_writer(self.out_dir / "tensorboard",
                                          purge_step=self.state.step if self.resumed_from else None)

    def train(self, stop: _StopRequest) -> None:
        """The loop: one optimizer step per ``settings.grad_accum`` batches, until ``total_steps``."""
        settings, accelerator, state = self.settings, self.accelerator, self.state
        bar = progress(None, desc="train", total=self.total_steps, initial=state.step, disable=not self.main)
        start_epoch, steps_done_in_epoch = divmod(state.step, self.steps_per_epoch)
        self.sampler.resume_at(start_epoch, steps_done_in_epoch * self.samples_per_step)
        step_loss = torch.zeros((), device=accelerator.device)
        clock = self.clock = PhaseClock()  # started here: set-up is not the loop's time
        for epoch in range(start_epoch, math.ceil(self.total_steps / self.steps_per_epoch)):
            if state.step >= self.total_steps:
                break
            self.train_loader.set_epoch(epoch)  # accelerate passes it on to sampler.set_epoch
            self.model.train()
            clock.lap("other")
            for batch in self.train_loader:
                clock.lap("data")
                with accelerator.accumulate(self.model):
                    loss = self.task.training_step(self.model, batch)
                    clock.lap("forward")
                    accelerator.backward(loss)  # divides by grad_accum: the step's gradient is the mean
                    clock.lap("backward")
                    if accelerator.sync_gradients and settings.grad_clip:
                        accelerator.clip_grad_norm_(self.model.parameters(), settings.grad_clip)
                    lr = self.optimizer.param_groups[0]["lr"]  # the rate this update uses; scheduler.step moves on
                    self.optimizer.step()  # these three are no-ops until the last batch of the accumulation
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    clock.lap("optimizer")
                step_loss += loss.detach().float()
                if not accelerator.sync_gradients:
                    continue
                # Mean over processes so that curves compare across process counts.
                mean_loss = accelerator.reduce(step_loss / settings.grad_accum, reduction="mean").item()
                step_loss.zero_()
                state.step += 1
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"training loss is {mean_loss} at step {state.step} (epoch {epoch}); "
                                             "lower lr, set grad_clip, or check the batch")
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.4g}", lr=f"{lr:.3g}", refresh=False)
                saved = self._after_step(mean_loss, lr, epoch)
                clock.lap("other")
                if state.step >= self.total_steps:
                    break
                if self._stop_requested(stop):
                    if not saved:
                        self._save(improved=False)
                    bar.close()
                    raise TrainingInterrupted(
                        f"stopped by SIGTERM after step {state.step} of {self.total_steps}; "
                        f"{self.ckpt_dir / 'last'} holds it: run again with resume=True to continue")
        bar.close()

    def _stop_requested(self, stop: _StopRequest) -> bool:
        """Whether any process received SIGTERM (every process must stop at the same step)."""
        if self.accelerator.num_processes == 1:
            return stop.requested
        flag = torch.tensor(float(stop.requested), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _after_step(self, mean_loss: float, lr: float, epoch: int) -> bool:
        """Log, evaluate and checkpoint as the settings say after an optimizer step; True if 'last' was written."""
        settings, state = self.settings, self.state
        finished = state.step >= self.total_steps
        for acc in (state.log_loss, state.eval_loss):
            acc[0] += mean_loss
            acc[1] += 1
        if state.step % settings.log_every == 0 or finished:
            entry = {"step": state.step, "epoch": round(state.step / self.steps_per_epoch, 4),
                     "train_loss": state.log_loss[0] / state.log_loss[1], "lr": lr}
            state.history.append(entry)
            state.log_loss = [0.0, 0]
            if self.writer:
                self.writer.add_scalar("train/loss", entry["train_loss"], state.step)
                self.writer.add_scalar("train/lr", lr, state.step)
        end_of_epoch = state.step % self.steps_per_epoch == 0
        improved = False
        if (end_of_epoch and (epoch + 1) % settings.eval_every == 0) or finished:
            self.clock.lap("other")
            improved = _evaluate(self.task, self.accelerator, self.bare_model, self.val_loader, settings, state,
                                 self.steps_per_epoch, self.writer)
            self.clock.lap("evaluation")
        if end_of_epoch or finished or (settings.save_every and state.step % settings.save_every == 0):
            self.clock.lap("other")
            self._save(improved)
            self.clock.lap("checkpoints")
            return True
        return False

    def _save(self, improved: bool) -> None:
        """Write 'last' (every process takes part) and, when the monitor improved, 'best'."""
        state, settings = self.state, self.settings
        meta = {"step": state.step, "epoch": round(state.step / self.steps_per_epoch, 4),
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "config_hash": self.config_hash, "metrics": state.metrics, "monitor": settings.monitor,
                "best_metric": state.best_metric, "best_step": state.best_step, "settings": settings.to_dict()}
        _save_last(self.ckpt_dir / "last", self.accelerator, self.bare_model, self.optimizer, self.scheduler, state,
                   meta, settings)
        if improved and self.main:
            write_checkpoint(self.ckpt_dir / "best", {"kind": "best", **meta},
                             lambda tmp: save_weights(self.bare_model, tmp / WEIGHTS_FILE, meta,
                                                      settings.save_trainable_only))
        self.accelerator.wait_for_everyone()

    def finish(self) -> TrainResult:
        best, last = self.ckpt_dir / "best", self.ckpt_dir / "last"
        result = TrainResult(history=self.state.history, best_metric=self.state.best_metric,
                             best_checkpoint=str(best) if best.exists() else None,
                             last_checkpoint=str(last) if last.exists() else None, steps=self.state.step,
                             monitor=self.settings.monitor, resumed_from=self.resumed_from,
                             phase_seconds={k: round(v, 3) for k, v in self.clock.seconds.items()})
        if self.main:
            atomic_write_json(self.out_dir / RESULT_FILE, dataclasses.asdict(result))
            print(LINE_PREFIX + self.clock.summary(), flush=True)  # the runner's console shows progress lines
        self.accelerator.wait_for_everyone()
        return result


def _evaluate(task: TrainingTask, accelerator: Accelerator, model: torch.nn.Module, val_loader: DataLoader | None,
              settings: TrainSettings, state: _Progress, steps_per_epoch: int, writer: Any) -> bool:
    """Evaluate on the main process, share the metrics with all, update ``state``; True if the monitor improved."""
    metrics: dict[str, float] = {}
    if accelerator.is_main_process and val_loader is not None:
        model.eval()
        with torch.no_grad(), accelerator.autocast():
            raw = task.evaluate(model, val_loader, accelerator.device)
        model.train()
        metrics = {f"val_{k}": float(v) for k, v in raw.items()}
    shared = [metrics]
    broadcast_object_list(shared, from_process=0)
    metrics = shared[0]
    if state.eval_loss[1]:
        metrics["train_loss"] = state.eval_loss[0] / state.eval_loss[1]
    state.eval_loss = [0.0, 0]
    if settings.monitor not in metrics:
        raise KeyError(f"monitor={settings.monitor!r} is not among the evaluated metrics {sorted(metrics)}; "
                       "task.evaluate() returns keys without the 'val_' prefix")
    state.metrics = metrics
    entry = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 4),
             **{k: v for k, v in metrics.items() if k.startswith("val_")}}
    if len(entry) > 2:
        state.history.append(entry)
    if writer:
        for key, value in metrics.items():
            if key.startswith("val_"):
                writer.add_scalar(f"val/{key[4:]}", value, state.step)
    value = metrics[settings.monitor]
    better = state.best_metric is None or (
        value < state.best_metric if settings.monitor_mode == "min" else value > state.best_metric)
    if better:
        state.best_metric, state.best_step = value, state.step
    return better


# ============================================================================================== data order and helpers
class EpochShuffle(Sampler[int]):
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``, cut to a multiple of
    ``multiple_of`` (whole optimizer steps), so that any process count and any resume point see one order."""

    def __init__(self, n: int, seed: int, multiple_of: int = 1):
        self.n, self.seed, self.multiple_of = n, seed, multiple_of
        self._resume: tuple[int, int] = (-1, 0)  # (epoch, samples already consumed in it)
        # Also the DataLoader's generator: a DataLoader draws its workers' base seed at every epoch start, and
        # from the global RNG that would shift dropout after a mid-epoch resume. Seeded per epoch, too.
        self.generator = torch.Generator()
        self.set_epoch(0)

    def _epoch_seed(self) -> int:
        return self.seed * 1_000_003 + self.epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator.manual_seed(self._epoch_seed())

    def resume_at(self, epoch: int, samples: int) -> None:
        """Skip the first ``samples`` indices whenever ``epoch`` is iterated (the part seen before a stop)."""
        self._resume = (epoch, samples)

    def _skip(self) -> int:
        return self._resume[1] if self.epoch == self._resume[0] else 0

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self._epoch_seed()))
        usable = self.n // self.multiple_of * self.multiple_of
        return iter(order[self._skip():usable].tolist())

    def __len__(self) -> int:
        return self.n // self.multiple_of * self.multiple_of - self._skip()


def _summary_writer(log_dir: Path, purge_step: int | None) -> Any:
    from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where events are written

    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def refuse_overwrite(out_dir: Path) -> None:
    earlier = [p for p in (out_dir / RESULT_FILE, out_dir / "checkpoints") if p.exists()]
    if earlier:
        raise RunExistsError(f"{out_dir} already holds a training run ({', '.join(p.name for p in earlier)}); "
                             "set resume=True to continue it, or choose a new out_dir")


# ============================================================================================== checkpoints of the loop
def _save_last(target: Path, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, scheduler: Any,
               state: _Progress, meta: dict[str, Any], settings: TrainSettings) -> None:
    """Write ``checkpoints/last`` (weights, optimizer, scheduler, every process's RNG, progress)."""
    rng = gather_object([rng_state()])  # collective: every process takes part, the main one writes
    if not accelerator.is_main_process:
        return

    def write(tmp: Path) -> None:
        save_weights(model, tmp / WEIGHTS_FILE, meta, settings.save_trainable_only)
        training_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
                          "progress": dataclasses.asdict(state)}
        torch.save(training_state, tmp / STATE_FILE)

    write_checkpoint(target, {"kind": "last", **meta}, write)


def _check_resumable(source: Path, settings: TrainSettings, steps_per_epoch: int) -> dict:
    meta = read_checkpoint_meta(source)
    assert meta is not None
    now = settings.to_dict()  # JSON form, like the stored one
    changed = {k: (old, now[k]) for k, old in meta["settings"].items()
               if k in now and k not in RESUMABLE_CHANGES and old != now[k]}
    if changed:
        diff = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        raise ValueError(f"cannot resume from {source}: settings changed ({diff}); only "
                         f"{sorted(RESUMABLE_CHANGES)} may change on resume. Start a new run (load_weights) instead")
    if meta["steps_per_epoch"] != steps_per_epoch:
        raise ValueError(f"cannot resume from {source}: it had {meta['steps_per_epoch']} steps per epoch, this run "
                         f"has {steps_per_epoch} (the training set or batch size changed)")
    return meta
