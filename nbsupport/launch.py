"""Starting training: in this process, or in N processes through ``accelerate launch``.

:func:`launch` is what a system's ``train`` verb calls; with ``num_processes == 1`` it runs :func:`nbsupport.train.fit`
here, otherwise it starts ``python -m nbsupport.launch`` in every process (DDP; gloo on a machine without CUDA),
streams their output and keeps it in ``launch.log``. The same module is that entry point (:func:`main`).
"""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nbsupport.runs import atomic_write_json, read_json
from nbsupport.train import (RESULT_FILE, TrainingInterrupted, TrainingTask, TrainResult, TrainSettings, fit,
                             refuse_overwrite)


def launch(factory: str, factory_kwargs: Mapping[str, Any], settings: TrainSettings, out_dir: str | os.PathLike,
           config_hash: str = "", accelerate_config: str | os.PathLike | None = None) -> TrainResult:
    """Build the task with ``factory(**factory_kwargs)`` and train it in ``settings.num_processes`` processes.

    Args:
        factory: ``"package.module:function"`` returning a :class:`TrainingTask`; importable by a new process
            (this process's ``sys.path`` is passed on).
        factory_kwargs: JSON-serialisable keyword arguments of ``factory``.
        accelerate_config: an ``accelerate`` config file for the launched processes (e.g. DeepSpeed ZeRO-1);
            None: plain DDP. Ignored with one process.

    One process: in this process. More: ``accelerate launch`` of ``python -m nbsupport.launch`` (DDP; gloo on a
    machine without CUDA), its output streamed here and kept in ``out_dir/launch.log``.

    Raises:
        RuntimeError: the launched processes failed; the message holds the end of their log.
    """
    out_dir = Path(out_dir)
    if settings.num_processes == 1:
        return fit(_build_task(factory, factory_kwargs), settings, out_dir, config_hash)
    if (machines_in(accelerate_config) == 1 and torch.cuda.is_available()
            and settings.num_processes > torch.cuda.device_count()):
        raise ValueError(f"num_processes={settings.num_processes} but this machine has {torch.cuda.device_count()} "
                         "CUDA devices (one process per GPU)")
    if not settings.resume:
        refuse_overwrite(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULT_FILE).unlink(missing_ok=True)  # never mistake an earlier result for this run's
    kwargs_file = atomic_write_json(out_dir / "launch_kwargs.json", dict(factory_kwargs))
    settings_file = atomic_write_json(out_dir / "launch_settings.json", settings.to_dict())
    command = launch_command(settings.num_processes, ["--factory", factory, "--kwargs", str(kwargs_file),
                                                      "--settings", str(settings_file), "--out", str(out_dir),
                                                      "--config-hash", config_hash],
                             accelerate_config=accelerate_config)
    env = dict(os.environ)
    # The children must import the factory's module just as this process (a notebook kernel, pytest) can.
    path = [os.getcwd() if p == "" else p for p in sys.path if p == "" or os.path.isdir(p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    tail: collections.deque[str] = collections.deque(maxlen=60)
    with open(out_dir / "launch.log", "w", encoding="utf-8") as log:
        log.write(" ".join(command) + "\n")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                   bufsize=1)
        try:
            assert process.stdout is not None
            for line in process.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                tail.append(line)
            code = process.wait()
        except BaseException:  # KeyboardInterrupt in a notebook: do not leave orphaned trainers behind
            process.terminate()
            process.wait()
            raise
    if code == TrainingInterrupted.EXIT_CODE:
        raise TrainingInterrupted(f"training in {settings.num_processes} processes stopped on SIGTERM after writing "
                                  f"{out_dir / 'checkpoints' / 'last'}; run again with resume=True to continue "
                                  f"(log: {out_dir / 'launch.log'})")
    if code != 0:
        raise RuntimeError(f"training in {settings.num_processes} processes failed with exit code {code}; full log: "
                           f"{out_dir / 'launch.log'}; command: {' '.join(command)}\nlast lines:\n" + "".join(tail))
    result = read_json(out_dir / RESULT_FILE)
    if result is None:
        raise RuntimeError(f"the launched training exited cleanly but wrote no {out_dir / RESULT_FILE}")
    return TrainResult.from_dict(result)


def launch_command(num_processes: int, entry_args: list[str],
                   accelerate_config: str | os.PathLike | None = None) -> list[str]:
    """``accelerate launch`` of ``python -m nbsupport.launch`` with ``num_processes`` processes in all.

    Without ``accelerate_config``: one machine; ``--multi_gpu`` selects accelerate's torchrun launcher, the one
    that starts N processes; without CUDA the processes join a gloo group on the CPU (``--cpu`` would start a
    single process, multi-CPU being mpirun's job there). Precision is left to :func:`fit`, which decides it from
    the settings. With ``accelerate_config`` (the user's ``accelerate config`` file, or a DeepSpeed ZeRO-1 one) that
    file chooses the launcher, its precision, and for several machines ``num_machines``, ``machine_rank``,
    ``main_process_ip`` and ``main_process_port``: nothing here overrides them.
    """
    if accelerate_config is not None:
        mode = ["--config_file", str(accelerate_config)]
    else:
        mode = ["--multi_gpu", "--mixed_precision", "no", "--num_machines", "1",
                "--main_process_port", str(_free_port())]
    return [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(num_processes),
            "--dynamo_backend", "no", "-m", "nbsupport.launch", *entry_args]


def machines_in(accelerate_config: str | os.PathLike | None) -> int:
    """``num_machines`` of an accelerate config file (YAML or JSON); 1 without a file."""
    if accelerate_config is None:
        return 1
    import yaml

    path = Path(accelerate_config)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"accelerate config {path}: cannot be read ({err})") from err
    return int(values.get("num_machines", 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build_task(factory: str, kwargs: Mapping[str, Any]) -> TrainingTask:
    module_name, _, function_name = factory.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"factory must look like 'package.module:function', got {factory!r}")
    return getattr(importlib.import_module(module_name), function_name)(**kwargs)


def main(argv: list[str] | None = None) -> int:
    """``python -m nbsupport.launch --factory pkg.mod:fn --kwargs k.json --settings s.json --out DIR``."""
    parser = argparse.ArgumentParser(prog="python -m nbsupport.launch", description=(
        "Train the TrainingTask a factory builds: the entry point launch() starts in every process of "
        "`accelerate launch`; also usable alone, in one process."))
    parser.add_argument("--factory", required=True, help="'package.module:function' returning a TrainingTask")
    parser.add_argument("--kwargs", help="JSON file with the factory's keyword arguments")
    parser.add_argument("--settings", required=True, help="JSON file with TrainSettings fields")
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--config-hash", default="", help="fingerprint stored in checkpoints")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = TrainSettings.from_dict(json.loads(Path(args.settings).read_text(encoding="utf-8")))
    kwargs = json.loads(Path(args.kwargs).read_text(encoding="utf-8")) if args.kwargs else {}
    try:
        fit(_build_task(args.factory, kwargs), settings, args.out, args.config_hash)
    except TrainingInterrupted as stopped:
        logging.getLogger(__name__).error("%s", stopped)
        return TrainingInterrupted.EXIT_CODE
    return 0


if __name__ == "__main__":
    # Run the copy imported as `nbsupport.launch`, not this `__main__` one, so that the modules it imports are
    # the ones a task's own imports see.
    from nbsupport.launch import main as _main

    sys.exit(_main())
