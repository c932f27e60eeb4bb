"""A trained model saved as the ecosystem loads it: ``<run>/export/``, written at the end of every 02_train.

What an export holds, per system (each folder's ``README.md``, the model card, says how to load it):

* a Hugging Face model (seg2d): ``save_pretrained`` files, loadable with ``AutoModelForSemanticSegmentation``;
* a LoRA adapter (cxr_report's report LM, prs_med's VLM): a PEFT folder (``adapter_config.json``,
  ``adapter_model.safetensors``), loadable with ``PeftModel.from_pretrained(base, folder)``;
* everything else: ``model.safetensors`` plus ``config.json`` (the run's model spec, and which tensors the file
  holds), loadable with ``safetensors.torch.load_file`` into the network the spec describes;
* ``README.md``: system, profile, data manifest, the test metrics with their 95 % intervals, the command or
  notebook that made it and the git commit. Built from the run folder's records (``config.json``,
  ``metrics.json``, ``headline.json``, ``provenance.json``, ``run_status.json``), never from the data, so it names
  no patient.

The folder is written under a temporary name in the run folder and renamed into place when complete: a failure
leaves the previous export (or none), never half of one. A resumed 02_train replaces it.
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from nbsupport.runs import HEADLINE_FILE, RunFolder, atomic_write_json, atomic_write_text, read_json

EXPORT_DIR = "export"  # <run>/export: the one name, documented in README.md ("Exporting a trained model")
CARD_FILE = "README.md"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
RUN_STATUS_FILE = "run_status.json"  # written by `nbsupport run` (nbsupport.report.STATUS_FILE)

# What the files of an export are, in the order the card lists them: relative path -> one line.
Contents = dict[str, str]


def write_export(run: RunFolder, stage: str, write_files: Callable[[Path], Contents], loading: str) -> Path:
    """Write ``<run>/export`` atomically: ``write_files(tmp)`` fills a temporary folder and says what it wrote, the
    model card is added, then the folder is renamed into place (an earlier export is replaced only then).

    Args:
        run: the training run folder.
        stage: the stage whose records the card reads (``02_train``).
        write_files: writes the model files into the folder it is given; returns ``{relative path: description}``.
        loading: the Python lines that load the export (shown in the card).
    """
    target = run.path / EXPORT_DIR
    tmp = run.path / f".{EXPORT_DIR}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        contents = write_files(tmp)
        atomic_write_text(tmp / CARD_FILE, model_card(run, stage, contents, loading))
        _fsync_tree(tmp)
        old = None
        if target.exists():  # a folder cannot be replaced in one rename: move the old one aside first
            old = run.path / f".{EXPORT_DIR}.old-{secrets.token_hex(4)}"
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"export: {target} ({', '.join(contents)}, {CARD_FILE})")
    return target


def _fsync_tree(folder: Path) -> None:
    """Every file and folder under ``folder`` (itself last) on disk before the rename makes it the export."""
    for path in [*sorted(folder.rglob("*"), reverse=True), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def export_checkpoint(run: RunFolder, stage: str, checkpoint: Path, spec: Any, build: Callable[..., Any]) -> Path:
    """``<run>/export`` of a network our code builds from its spec (textseg3d, ct_clip): the tensors of
    ``checkpoint`` (trainable only where the run stored only those: frozen parts come from the paths the spec names)
    as ``model.safetensors``, the spec as ``config.json``, and the model card."""
    from nbsupport.checkpoints import WEIGHTS_FILE as CHECKPOINT_WEIGHTS

    header = safetensors.safe_open(str(checkpoint / CHECKPOINT_WEIGHTS), framework="pt").metadata() or {}
    trainable = header.get("weights") == "trainable"
    holds = (f"the trained tensors of {build.__module__}.{build.__qualname__}(spec), by their state_dict names"
             + (" (the trainable ones: frozen parts are rebuilt from the paths in the spec)" if trainable else ""))
    spec_type = type(spec)
    loading = f"""
import json, safetensors.torch
from {build.__module__} import {build.__name__}
from {spec_type.__module__} import {spec_type.__name__}

spec = {spec_type.__name__}.from_json(json.dumps(json.load(open("export/config.json"))["model_spec"]))
model = {build.__name__}(spec)
model.load_state_dict(safetensors.torch.load_file("export/model.safetensors"), strict={not trainable})
model.eval()
"""
    return write_export(run, stage, lambda folder: write_tensors(folder, checkpoint_tensors(checkpoint), spec, holds),
                        loading)


# ---------------------------------------------------------------------------------------------- file writers
def write_tensors(root: Path, tensors: Mapping[str, torch.Tensor], spec: Any, holds: str, sub: str = "") -> Contents:
    """``model.safetensors`` (``tensors``) and ``config.json`` (``{"model_spec": <the run's model_spec.json>,
    "tensors": holds}``) in ``root/sub``."""
    folder = root / sub
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()},
                                str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    atomic_write_json(folder / CONFIG_FILE, {"model_spec": json.loads(spec.to_json()), "tensors": holds})
    prefix = f"{sub}/" if sub else ""
    return {f"{prefix}{WEIGHTS_FILE}": f"{len(tensors)} tensors: {holds}",
            f"{prefix}{CONFIG_FILE}": "the model spec (the run's model_spec.json) and what the tensors are"}


def checkpoint_tensors(checkpoint: Path, keep: Callable[[str], bool] = lambda name: True) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's ``model.safetensors`` whose names ``keep`` accepts, on the CPU."""
    from nbsupport.checkpoints import WEIGHTS_FILE as CHECKPOINT_WEIGHTS

    return {k: v for k, v in safetensors.torch.load_file(str(checkpoint / CHECKPOINT_WEIGHTS)).items() if keep(k)}


def is_lora_tensor(name: str) -> bool:
    """A LoRA tensor as peft names it inside a wrapped module (``...q_proj.lora_A.default.weight``)."""
    return ".lora_" in name


def write_peft_adapter(peft_model: Any, folder: Path, base: str, tokenizer: Any = None) -> Contents:
    """The LoRA adapter of ``peft_model`` as a PEFT folder (``save_pretrained``: ``adapter_config.json``,
    ``adapter_model.safetensors``; the tokenizer's files too when given), ``base_model_name_or_path`` = ``base``
    (the model ``PeftModel.from_pretrained`` is to wrap; '' leaves peft's own)."""
    config = peft_model.peft_config["default"]
    previous = config.base_model_name_or_path
    if base:
        config.base_model_name_or_path = base
    try:
        peft_model.save_pretrained(str(folder))
    finally:
        config.base_model_name_or_path = previous
    contents = {f"{folder.name}/adapter_config.json": f"LoRA r={config.r}, alpha={config.lora_alpha} on "
                                                      f"{sorted(config.target_modules)}; base {base or previous}",
                f"{folder.name}/adapter_model.safetensors": "the LoRA tensors"}
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
        contents[f"{folder.name}/tokenizer*"] = "the tokenizer the adapter was trained with"
    return contents


def base_model_name(name_or_path: str) -> str:
    """What an adapter's ``base_model_name_or_path`` records for the model a run loaded by ``name_or_path``: a hub
    id as it is (loadable anywhere); a local folder or a packaged alias (``smollm2-135m`` is a conversion of its
    own, not the hub's weights) as the absolute folder the run read."""
    from nbsupport.models import MINILM_ALIAS, SMOLLM2_ALIAS, resolve_pretrained
    from nbsupport.paths import resolve_path

    if name_or_path.lower() in (SMOLLM2_ALIAS, MINILM_ALIAS) or resolve_path(name_or_path).exists():
        return str(Path(resolve_pretrained(name_or_path)).resolve())
    return name_or_path


# ---------------------------------------------------------------------------------------------- model card
def model_card(run: RunFolder, stage: str, contents: Contents, loading: str) -> str:
    """The export's ``README.md``, from the run folder's records only (no data: no patient identifiers)."""
    config = read_json(run.path / "config.json", {}).get(stage, {})
    provenance = read_json(run.path / "provenance.json", {}).get(stage, {})
    git = provenance.get("git") or {}
    commit = git.get("commit") or "not recorded (not a git checkout)"
    if git.get("dirty"):
        commit += " (with uncommitted changes)"
    lines = [f"# {run.system}: trained model (run {run.run_id})", "",
             f"- system: `{run.system}`", f"- profile: `{config.get('profile', 'not recorded')}`",
             f"- data manifest: `{config.get('manifest', 'not recorded')}`"
             + (f" (data root `{config['data_root']}`)" if config.get("data_root") else ""),
             f"- made by: {_command(run, stage)}", f"- git commit: `{commit}`",
             f"- trained: {provenance.get('time', 'not recorded')} on {provenance.get('device', '?')}"
             + (f" ({provenance['cuda']})" if provenance.get("cuda") else ""), ""]
    lines += _results(run, stage)
    lines += ["## Files", "", *(f"- `{name}`: {what}" for name, what in contents.items()), "",
              "## Loading", "", "```python", loading.strip(), "```", "",
              f"The workbench's own loader is `nbsupport.{run.system}.load_trained_model` on "
              "`checkpoints/best` of the run folder; the export holds the same weights.", "",
              f"## Training parameters ({stage})", "", "```json", json.dumps(config, indent=1, default=str), "```", ""]
    return "\n".join(lines)


def _command(run: RunFolder, stage: str) -> str:
    """``nbsupport run``'s command line where the runner made the run, else the notebook and its parameters."""
    status = read_json(run.path / RUN_STATUS_FILE)
    if status and status.get("command"):
        return f"`{shlex.join(str(a) for a in status['command'])}` (`nbsupport run`)"
    return (f"notebook `notebooks/{run.system}/{stage}.ipynb` (or `nbsupport.{run.system}.train`) with the "
            "parameters below")


def _results(run: RunFolder, stage: str) -> list[str]:
    """The headline and every metric of ``stage`` that has a 95 % interval (``<key>_ci95`` next to it, or a paired
    difference ``{"diff", "ci95"}``)."""
    metrics = run.metrics().get(stage, {})
    headline = read_json(run.path / HEADLINE_FILE)
    if headline and headline.get("stage") != stage:  # a later stage's (03_infer on an export rewritten by a resume)
        headline = None
    lines = ["## Results", ""]
    if headline:
        ci = headline.get("ci95")
        lines += [f"Headline: {headline['metric']} {headline['value']:.4g}"
                  + (f" (95 % CI {ci[0]:.4g}–{ci[1]:.4g})" if ci else "")
                  + f", against {headline['baseline']} {headline['baseline_value']:.4g}.", ""]
    rows = []
    for key, value in metrics.items():
        interval = metrics.get(f"{key}_ci95")
        if isinstance(value, Mapping) and {"diff", "ci95"} <= set(value):
            value, interval = value["diff"], value["ci95"]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and interval and len(interval) == 2 \
                and all(isinstance(x, (int, float)) for x in interval):
            rows.append(f"| {key} | {value:.4g} | {interval[0]:.4g}–{interval[1]:.4g} |")
    if rows:
        lines += ["| metric | value | 95 % interval |", "|---|---|---|", *rows, ""]
    elif not headline:
        lines += ["No test metric with an interval in metrics.json.", ""]
    return lines
