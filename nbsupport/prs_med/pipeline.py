"""The verbs the prs_med notebooks call: preprocess, train, predict (answer + segment), attention maps.

Each verb takes its stage's frozen config (:mod:`nbsupport.prs_med.config`) and the run folder, does one thing,
records what it measured in ``metrics.json``, writes the views the run folder promises (03/04: the offline HTML
viewers) and returns a small result object holding the tables, figures and viewer cases a notebook shows.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from nbsupport.checkpoints import SPEC_FILE, load_model, load_weights
from nbsupport.device import resolve_device
from nbsupport.export import (Contents, base_model_name, checkpoint_tensors, is_lora_tensor, write_export,
                              write_peft_adapter, write_tensors)
from nbsupport.manifest import write_manifest
from nbsupport.paths import resolve_path
from nbsupport.prs_med.config import AttentionConfig, InferConfig, PreprocessConfig, TrainConfig
from nbsupport.prs_med.data import build_manifest, read_image, read_mask, summarise_manifest
from nbsupport.prs_med.inference import SplitEvaluation, answer_image, evaluate_split, explain_answer, restore_probability
from nbsupport.prs_med.model import ImageOnlySegmenter, PRSMedNet, PRSMedSpec, network_parts
from nbsupport.prs_med.task import ImageOnlyTrainingTask, PRSMedTrainingTask
from nbsupport.prs_med.views import (
    attention_figures,
    attention_viewer_cases,
    comparisons_table,
    examples_figure,
    prediction_vs_truth_figure,
    predictions_figure,
    scores_table,
    single_image_figure,
    viewer_cases,
    write_attention_viewer,
    write_case_viewer,
)
from nbsupport.predict import (
    PredictError, PredictSummary, check_outputs_free, expand_inputs, for_each_input, run_config, training_run,
)
from nbsupport.runs import RunFolder, atomic_path, atomic_write_json, atomic_write_text, read_json
from nbsupport.spec import ParameterCount, count_parameters
from nbsupport.train import TrainSettings

if TYPE_CHECKING:
    import torch

BASELINE_DIR = "image_only"  # the question-free baseline's own training folder inside the run
BASELINE_HASH_SUFFIX = "-image-only"  # its checkpoints record the spec's fingerprint + this


# ============================================================================================ 01 preprocess
@dataclasses.dataclass
class PreprocessResult:
    manifest: pd.DataFrame
    manifest_path: Path
    summary: pd.DataFrame  # per task: rows per split and per position
    disagreements: pd.DataFrame  # rows whose CSV position differs from their mask's
    figure: Any


def preprocess(cfg: PreprocessConfig, run: RunFolder) -> PreprocessResult:
    """Check the dataset at ``cfg.data_root``, write the manifest, summarise, draw examples of each task."""
    root = cfg.source_root()
    manifest, disagreements = build_manifest(root, tasks=list(cfg.tasks) or None)
    manifest_path = resolve_path(cfg.manifest)
    write_manifest(manifest, manifest_path, cfg.SCHEMA, root)
    if len(disagreements):
        print(f"{len(disagreements)} rows give a position that disagrees with their mask (the mask's is kept):")
        print(disagreements.head(20).to_string(index=False))
    atomic_write_text(run.file("position_disagreements.csv"), disagreements.to_csv(index=False))
    summary = summarise_manifest(manifest)
    atomic_write_text(run.file("manifest_summary.csv"), summary.to_csv())
    run.write_metrics(cfg.STAGE, {"rows": len(manifest), "images": int(manifest["image"].nunique()),
                                  "tasks": sorted(manifest["task"].unique()),
                                  "position_disagreements": len(disagreements)})
    fig = examples_figure(manifest, root, cfg.n_examples)
    run.save_figure(fig, "01_examples_per_task")
    return PreprocessResult(manifest, manifest_path, summary, disagreements, fig)


# ============================================================================================ 02 train
@dataclasses.dataclass
class TrainOutcome:
    history: list[dict[str, Any]]
    checkpoint: Path
    test_split: str
    parameters: ParameterCount
    per_task: pd.DataFrame  # Dice / IoU / HD95 / position accuracy per task, with the baselines
    predictions: pd.DataFrame
    curves: Any
    examples: Any
    table: pd.DataFrame | None = None  # test metrics per task as "0.80 (0.74–0.85)" (views.scores_table)
    comparisons: pd.DataFrame | None = None  # model minus baselines, paired (views.comparisons_table)


def loop_settings(cfg: TrainConfig, manifest: pd.DataFrame) -> TrainSettings:
    """The shared loop's settings: AdamW, warm-up (one epoch, at most 50 steps) then cosine, best checkpoint by
    validation Dice (training loss without a val split), trainable weights only in the checkpoints."""
    steps_per_epoch = max(1, int((manifest.split == "train").sum()) // cfg.batch_size)
    has_val = bool((manifest.split == "val").any())
    return cfg.train_settings(optimizer="adamw", scheduler="warmup_cosine", warmup_steps=min(steps_per_epoch, 50),
                              monitor="val_dice" if has_val else "train_loss",
                              monitor_mode="max" if has_val else "min", save_trainable_only=True)


def train(cfg: TrainConfig, run: RunFolder) -> TrainOutcome:
    """Train on the train split (best checkpoint by val Dice) and the image-only baseline next to it, then answer +
    segment the test split."""
    from nbsupport.viz import plot_training_curves

    manifest, root = cfg.load_manifest()
    spec = cfg.spec()
    atomic_write_text(run.file(SPEC_FILE), spec.to_json())
    settings = loop_settings(cfg, manifest)
    result = cfg.launch_training(PRSMedTrainingTask, run.path, root, spec, settings)
    checkpoint = Path(result.best_checkpoint or result.last_checkpoint)
    model = load_trained_model(checkpoint)
    parameters = count_parameters(model, network_parts(model))
    print("parameters:", json.dumps(parameters.to_dict()))
    baseline = train_image_only(cfg, run, root, model, settings) if cfg.train_baseline else None
    test_split = "test" if (manifest.split == "test").any() else "val"
    evaluation = evaluate_split(model, manifest, test_split, root, resolve_device(cfg.device), cfg.eval_batch_size,
                                cfg.threshold, cfg.max_new_tokens, baseline=baseline)
    atomic_write_text(run.file("test_predictions.csv"), evaluation.predictions.to_csv(index=False))
    atomic_write_text(run.file("test_per_task.csv"), evaluation.per_task.to_csv())
    metrics = split_metrics(evaluation, test_split)
    metrics.update({"steps": result.steps, "best_val_dice": result.best_metric, "parameters": parameters.to_dict()})
    run.write_metrics(cfg.STAGE, metrics)
    write_headline(run, cfg.STAGE, evaluation, test_split)
    curves = plot_training_curves(result.history)
    run.save_figure(curves, "02_training_curves")
    examples = predictions_figure(evaluation, root, n=6)
    run.save_figure(examples, "02_test_predictions")
    export_model(run, cfg.STAGE, model, checkpoint)
    return TrainOutcome(result.history, checkpoint, test_split, parameters, evaluation.per_task,
                        evaluation.predictions, curves, examples, scores_table(evaluation),
                        comparisons_table(evaluation))


def split_metrics(evaluation: SplitEvaluation, split: str) -> dict[str, Any]:
    """What metrics.json holds of a scored split: ``<split>_<metric>`` and ``<split>_<metric>_ci95`` overall, the
    paired differences to the baselines (``<split>_dice_minus_image_only_dice: {"diff", "ci95"}``, ...) and the
    per-task scores with their intervals."""
    return ({f"{split}_{k}": v for k, v in evaluation.overall.items()}
            | {f"{split}_{k}": v for k, v in evaluation.comparisons.items()}
            | {"per_task": evaluation.scores})


def write_headline(run: RunFolder, stage: str, evaluation: SplitEvaluation, split: str) -> None:
    """The run's headline: the split's Dice (with its interval) next to the image-only decoder's on the same
    images; without a trained baseline, position accuracy next to always answering the most frequent position."""
    o = evaluation.overall
    if "baseline_image_only_dice" in o:
        run.write_headline(stage, f"{split} Dice", o["dice"], "image-only decoder Dice", o["baseline_image_only_dice"],
                           ci95=o["dice_ci95"])
    else:
        run.write_headline(stage, f"{split} position accuracy", o["position_accuracy"],
                           f"always '{o['most_frequent_position']}'", o["baseline_most_frequent_position_accuracy"],
                           ci95=o["position_accuracy_ci95"])


def train_image_only(cfg: TrainConfig, run: RunFolder, root: Path, model: PRSMedNet,
                     settings: TrainSettings) -> ImageOnlySegmenter:
    """The baseline, trained with the same settings in ``<run>/image_only``: ``model``'s encoder and decoder
    architecture with one learned prompt token instead of the question (prompt width = ``model``'s VLM width)."""
    spec = model.spec
    prompt_dim = int(model.llava.config.text_config.hidden_size)
    atomic_write_json(run.file(f"{BASELINE_DIR}/baseline.json"), {"prompt_dim": prompt_dim})
    result = cfg.launch_training(ImageOnlyTrainingTask, run.path / BASELINE_DIR, root, spec, settings,
                                 config_hash=spec.fingerprint() + BASELINE_HASH_SUFFIX, prompt_dim=prompt_dim)
    return load_image_only(spec, prompt_dim, Path(result.best_checkpoint or result.last_checkpoint))


def export_model(run: RunFolder, stage: str, model: PRSMedNet, checkpoint: Path) -> Path:
    """``<run>/export``: the VLM's LoRA adapter as a PEFT folder (``adapter/``, with the tokenizer) and every other
    trained tensor of ``checkpoint`` (image encoder, mask decoder, classifiers; the assembled VLM's vision tower and
    projector) as ``network/model.safetensors`` + ``config.json``, and the model card."""
    spec = model.spec
    assembled = spec.vlm in ("tiny", "smollm2-135m")  # built by build_vlm from the spec, no folder to name

    def files(folder: Path) -> Contents:
        contents = write_peft_adapter(model.vlm, folder / "adapter", "" if assembled else base_model_name(spec.vlm),
                                      model.tokenizer)
        rest = checkpoint_tensors(checkpoint, keep=lambda name: not is_lora_tensor(name))
        return contents | write_tensors(folder, rest, spec, "the trained tensors of nbsupport.prs_med.model.PRSMedNet "
                                        "but the LoRA adapter, by their state_dict names", sub="network")

    loading = """
import json, safetensors.torch
from peft import PeftModel
from nbsupport.prs_med.model import PRSMedNet, PRSMedSpec

spec = PRSMedSpec.from_json(json.dumps(json.load(open("export/network/config.json"))["model_spec"]))
model = PRSMedNet(spec)  # the network the run built (its frozen VLM from spec.vlm), untrained
model.load_state_dict(safetensors.torch.load_file("export/network/model.safetensors"), strict=False)
model.vlm = PeftModel.from_pretrained(model.vlm.unload(), "export/adapter")  # the trained LoRA adapter
model.eval()
"""
    return write_export(run, stage, files, loading)


# ============================================================================================ loading
def load_trained_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> PRSMedNet:
    """Rebuild the network from the run's ``model_spec.json`` and load the checkpoint (trainable weights) into it,
    every tensor on ``device``, in eval mode."""
    return load_model(checkpoint, PRSMedSpec, PRSMedNet, device=device, system=TrainConfig.SYSTEM)


def load_image_only(spec: PRSMedSpec, prompt_dim: int, checkpoint: Path) -> ImageOnlySegmenter:
    """The image-only baseline of the network ``spec`` describes, from a checkpoint in ``<run>/image_only``."""
    model = ImageOnlySegmenter(spec, prompt_dim)
    load_weights(model, checkpoint, expected_config_hash=spec.fingerprint() + BASELINE_HASH_SUFFIX)
    return model.eval()


def baseline_of(checkpoint: Path, model: PRSMedNet) -> ImageOnlySegmenter | None:
    """The image-only baseline trained next to ``checkpoint`` (its best checkpoint), or None where there is none."""
    folder = checkpoint.parent.parent / BASELINE_DIR
    info = read_json(folder / "baseline.json")
    best = folder / "checkpoints" / "best"
    if info is None or not (best / "meta.json").exists():
        return None
    return load_image_only(model.spec, int(info["prompt_dim"]), best)


# ============================================================================================ 03 infer
@dataclasses.dataclass
class InferResult:
    predictions: pd.DataFrame
    predictions_path: Path
    per_task: pd.DataFrame
    figure: Any
    single: dict[str, Any] | None  # answer + mask for cfg.image_path
    single_figure: Any
    evaluation: SplitEvaluation
    root: Path
    viewer_cases: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # what 03_case_viewer.html shows
    viewer_path: Path | None = None  # 03_case_viewer.html
    table: pd.DataFrame | None = None  # metrics per task as "0.80 (0.74–0.85)" (views.scores_table)
    comparisons: pd.DataFrame | None = None  # model minus baselines, paired (views.comparisons_table)


def predict(cfg: InferConfig, run: RunFolder) -> InferResult:
    """Answer + segment a split (``predictions.csv``, the per-task table, ``03_case_viewer.html``) and optionally
    ``cfg.image_path``."""
    checkpoint = cfg.find_checkpoint(run)
    model = load_trained_model(checkpoint, resolve_device(cfg.device))
    manifest, root = cfg.load_manifest()
    evaluation = evaluate_split(model, manifest, cfg.split, root, resolve_device(cfg.device), cfg.batch_size,
                                cfg.threshold, cfg.max_new_tokens, baseline=baseline_of(checkpoint, model))
    path = run.file("predictions.csv")
    atomic_write_text(path, evaluation.predictions.to_csv(index=False))
    atomic_write_text(run.file("per_task.csv"), evaluation.per_task.to_csv())
    run.write_metrics(cfg.STAGE, split_metrics(evaluation, cfg.split))
    write_headline(run, cfg.STAGE, evaluation, cfg.split)
    fig = predictions_figure(evaluation, root, n=cfg.n_examples)
    run.save_figure(fig, "03_predictions")
    single, single_fig = None, None
    if cfg.image_path:
        image = read_image(resolve_path(cfg.image_path))
        single = answer_image(model, image, cfg.question, cfg.threshold, cfg.max_new_tokens)
        single_fig = single_image_figure(image, single["mask"], cfg.question, single["answer"])
        run.save_figure(single_fig, "03_single_image")
    result = InferResult(evaluation.predictions, path, evaluation.per_task, fig, single, single_fig, evaluation, root,
                         table=scores_table(evaluation), comparisons=comparisons_table(evaluation))
    result.viewer_cases = viewer_cases(result)
    result.viewer_path = write_case_viewer(result.viewer_cases, run, cfg.split)
    return result


# ============================================================================================ your own files
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ANSWERS_TABLE = "answers.csv"  # one row per input image: image, question, answer, positions, mask file


def predict_files(checkpoint: str | Path, inputs: Sequence[str | Path], out_dir: str | Path, *,
                  device: str = "auto", overwrite: bool = False, question: str | None = None) -> PredictSummary:
    """Answer ``question`` about each image among ``inputs`` (files, or folders searched for PNG, JPEG, BMP, TIFF)
    and segment the finding, with the trained run's own preprocessing: the model input size from the run's
    ``model_spec.json``, ImageNet normalisation as in training, and the mask threshold and answer length the run's
    02_train recorded in ``config.json``. No manifest is needed.

    Writes under ``out_dir``, per image ``<stem>_mask.png`` (0/255 at the image's own size) and
    ``<stem>_answer.json`` (question, answer, the position it names, the position of the mask), plus
    ``answers.csv`` over all images. Refuses to overwrite any of them unless ``overwrite``; an image that cannot be
    read is reported in the summary and the others go on.

    Example: ``predict_files("outputs/runs/R/prs_med", ["scans/"], "answers/", question="Where is the tumour?")``.
    """
    if not question or not question.strip():
        raise PredictError("prs_med answers a question about each image: pass --question \"Where is the lesion?\"")
    run_dir, best = training_run(checkpoint)
    trained = run_config(run_dir)
    files = expand_inputs(inputs, IMAGE_SUFFIXES)
    out = Path(out_dir)
    stems = [f.name.rsplit(".", 1)[0] for f in files]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise PredictError(f"several inputs are named {repeated[0]!r} (e.g. "
                           f"{', '.join(str(f) for f, s in zip(files, stems) if s == repeated[0])}); their outputs "
                           "would collide: predict them into separate -o folders")
    targets = {f: (out / f"{s}_mask.png", out / f"{s}_answer.json") for f, s in zip(files, stems)}
    check_outputs_free([p for pair in targets.values() for p in pair] + [out / ANSWERS_TABLE], overwrite)
    model = load_trained_model(best, resolve_device(device))
    rows: list[dict[str, Any]] = []

    def answer_one(path: Path) -> list[Path]:
        image = read_image(path)
        said = answer_image(model, image, question, float(trained["threshold"]), int(trained["max_new_tokens"]))
        mask_path, answer_path = targets[path]
        row = {"image": str(path), "question": question, "answer": said["answer"], "position": said["position"],
               "mask_position": said["mask_position"], "mask": mask_path.name}
        write_mask_png(mask_path, said["mask"])
        atomic_write_json(answer_path, row)
        rows.append(row)
        return [mask_path, answer_path]

    summary = for_each_input(files, answer_one, out, desc="answer + segment")
    if rows:
        table = out / ANSWERS_TABLE
        atomic_write_text(table, pd.DataFrame(rows).to_csv(index=False))
        summary.written.append(table)
    return summary


def write_mask_png(path: Path, mask: np.ndarray) -> None:
    """A bool (H, W) mask as an 8-bit PNG, 255 inside the finding and 0 elsewhere."""
    import cv2

    ok, encoded = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise ValueError(f"{path}: the mask could not be encoded as PNG")
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(encoded.tobytes())


# ============================================================================================ 04 attention
@dataclasses.dataclass
class AttentionResult:
    sample_id: str
    question: str
    answer: str  # the reference answer
    pred_answer: str
    decoder_maps: list[tuple[str, np.ndarray]]  # (token, (g, g) cross-attention of the image over it)
    vlm_maps: list[tuple[str, np.ndarray]]  # (LM layer, (side, side) attention of the answer over image patches)
    image: np.ndarray
    decoder_figure: Any
    vlm_figure: Any
    overlay_figure: Any
    pred_mask: np.ndarray | None = None  # bool (H, W) at the image's size, for attention_viewer_cases
    true_mask: np.ndarray | None = None  # bool (H, W)
    task: str = ""
    viewer_cases: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # what 04_attention_viewer shows
    viewer_path: Path | None = None  # 04_attention_viewer.html


def _attention_sample(cfg: AttentionConfig, manifest: pd.DataFrame) -> pd.Series:
    """The manifest row of ``cfg.sample_id`` in ``cfg.split``, or that split's first row."""
    part = manifest[manifest.split == cfg.split].reset_index(drop=True)
    if not cfg.sample_id:
        return part.iloc[0]
    if cfg.sample_id not in set(part["id"]):
        raise ValueError(f"sample_id {cfg.sample_id!r} is not in the {cfg.split} split of {cfg.manifest}")
    return part[part["id"] == cfg.sample_id].iloc[0]


def attention_maps(cfg: AttentionConfig, run: RunFolder) -> AttentionResult:
    """For one sample: the decoder's image-to-prompt cross-attention for the question's tokens, the VLM's
    attention from the generated answer's tokens over the image patches (per layer), and predicted vs true mask;
    writes the figures and ``04_attention_viewer.html``. On the CPU (eager attention)."""
    model = load_trained_model(cfg.find_checkpoint(run))
    manifest, root = cfg.load_manifest()
    row = _attention_sample(cfg, manifest)
    question = cfg.question or row["question"]
    image = read_image(root / row["image"])
    truth = read_mask(root / row["mask"])
    explained = explain_answer(model, image, question, cfg.max_new_tokens)
    decoder_fig, vlm_fig = attention_figures(image, model.spec.image_size, explained.decoder_maps,
                                             explained.vlm_maps)
    run.save_figure(decoder_fig, "04_decoder_cross_attention")
    run.save_figure(vlm_fig, "04_vlm_attention_over_patches")
    pred = restore_probability(explained.output.mask_logits.sigmoid()[0, 0], truth.shape) > 0.5
    overlay = prediction_vs_truth_figure(image, pred, truth, question, row["answer"], explained.answer)
    run.save_figure(overlay, "04_prediction_vs_truth")
    result = AttentionResult(str(row["id"]), question, str(row["answer"]), explained.answer, explained.decoder_maps,
                             explained.vlm_maps, image, decoder_fig, vlm_fig, overlay, pred, truth > 0,
                             str(row["task"]))
    result.viewer_cases = attention_viewer_cases(result)
    result.viewer_path = write_attention_viewer(result.viewer_cases, run, result.sample_id)
    return result


__all__ = ["AttentionConfig", "AttentionResult", "InferConfig", "InferResult", "PreprocessConfig",
           "PreprocessResult", "TrainConfig", "TrainOutcome", "attention_maps", "load_trained_model", "predict",
           "predict_files", "preprocess", "train"]
