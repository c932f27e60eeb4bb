"""The verbs the seg2d notebooks call: preprocess, train, predict, attention maps.

Each verb takes the stage's frozen config (:mod:`nbsupport.seg2d.config`) and its run folder, does one thing,
records what it measured in ``metrics.json``, writes the views the run folder promises (03/04: the offline viewer
pages) and returns a small result object with the tables, figures and viewer cases a notebook shows.
:func:`load_trained_model` rebuilds a trained network on a device; :func:`predict_files` applies it to a user's own
slice files (``nbsupport predict seg2d``).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nbsupport.checkpoints import load_model, load_weights
from nbsupport.device import resolve_device
from nbsupport.dicom import read_dicom_image
from nbsupport.export import write_export
from nbsupport.manifest import write_manifest
from nbsupport.paths import resolve_path
from nbsupport.predict import (PredictError, PredictSummary, check_outputs_free, expand_inputs, for_each_input,
                               run_config, training_run)
from nbsupport.runs import RunFolder, atomic_path, atomic_write_text
from nbsupport.seg2d import data as seg_data
from nbsupport.seg2d.config import SYSTEM, AttentionConfig, InferConfig, PreprocessConfig, TrainConfig
from nbsupport.seg2d.data import CLASSES
from nbsupport.seg2d.inference import (BASELINE_LABELS, POSTPROCESS_FILE, BaselineComparison, PostProcess,
                                       SplitEvaluation, compare_with_baselines, evaluate_split, most_organ_slices,
                                       query_attention, slice_probabilities, tune_postprocess)
from nbsupport.seg2d.model import Seg2DModelSpec, Seg2DNet, build_seg2d_model, model_from_spec, save_hf_model
from nbsupport.seg2d.rle import rle_encode
from nbsupport.seg2d.task import Seg2DTrainingTask
from nbsupport.seg2d.views import (attention_figures, attention_viewer_cases, prediction_figure,
                                   sample_slices_figure, viewer_cases, write_attention_viewer, write_case_viewer)
from nbsupport.spec import count_parameters


# ============================================================================================ 01 preprocess
@dataclasses.dataclass
class PreprocessResult:
    manifest: pd.DataFrame
    manifest_path: Path
    summary: pd.DataFrame  # slices and class prevalence per split
    figure: Any


def preprocess(cfg: PreprocessConfig, run: RunFolder) -> PreprocessResult:
    """Read the dataset at ``cfg.data_root`` (Kaggle layout), write the manifest, summarise, draw samples."""
    root = cfg.source_root()
    manifest = seg_data.build_manifest(root, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                                       seed=cfg.seed)
    manifest_path = resolve_path(cfg.manifest)
    write_manifest(manifest, manifest_path, seg_data.SEG2D_SCHEMA, root)
    summary = summarise_manifest(manifest)
    atomic_write_text(run.file("manifest_summary.csv"), summary.to_csv())
    run.write_metrics(cfg.STAGE, {"slices": len(manifest), "cases": int(manifest["case"].nunique()),
                                  "sizes": sorted({f"{w}x{h}" for w, h in zip(manifest.width, manifest.height)})})
    fig = sample_slices_figure(manifest, root, cfg.n_examples, cfg.seed)
    run.save_figure(fig, "01_sample_slices")
    return PreprocessResult(manifest, manifest_path, summary, fig)


def summarise_manifest(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per split: cases, slices and the fraction of slices where each organ is present."""
    rows = {}
    for split, part in manifest.groupby("split"):
        row = {"cases": part["case"].nunique(), "slices": len(part)}
        for c in CLASSES:
            row[f"{c} present"] = round(float((part[f"rle_{c}"] != "").mean()), 3)
        rows[split] = row
    return pd.DataFrame.from_dict(rows, orient="index")


# ============================================================================================ 02 train
@dataclasses.dataclass
class TrainOutcome:
    history: list[dict[str, Any]]
    checkpoint: Path
    test_split: str  # "test", or "val" when the manifest has no test cases
    test_metrics: dict[str, Any]  # what metrics.json records: each test metric with its _ci95, the comparisons
    per_class: pd.DataFrame  # Dice per class with its interval
    curves: Any
    examples: Any
    baselines: pd.DataFrame  # Dice / Hausdorff / score (95 % CI) of the model next to no-skill predictors


def train(cfg: TrainConfig, run: RunFolder) -> TrainOutcome:
    """Train on the manifest's train split, pick the best checkpoint on val, report test Dice and score."""
    from nbsupport.viz import plot_training_curves

    manifest, root = cfg.load_manifest()
    model = build_seg2d_model(cfg.arch, len(CLASSES), cfg.image_size, cfg.model_name_or_path, cfg.width)
    spec = model.spec
    atomic_write_text(run.file("model_spec.json"), spec.to_json())
    n_params = count_parameters(model).total
    print(f"{cfg.arch} ({spec.source}): {n_params / 1e6:.2f} M parameters, input {cfg.image_size} px")
    settings = cfg.train_settings(warmup_steps=cfg.warmup_steps(int((manifest.split == "train").sum())),
                                  monitor="val_dice", monitor_mode="max")
    result = cfg.launch_training(Seg2DTrainingTask, run.path, root, spec, settings)
    best = Path(result.best_checkpoint or result.last_checkpoint)
    load_weights(model, best, expected_config_hash=spec.fingerprint())
    test_split = "test" if (manifest.split == "test").any() else "val"
    post = _postprocess_after_training(cfg, model, manifest, root, test_split)
    atomic_write_text(run.file(POSTPROCESS_FILE), post.to_json())
    evaluation = evaluate_split(model, manifest[manifest.split == test_split], root, cfg.image_size,
                                post.thresholds, resolve_device(cfg.device), min_area=post.min_areas)
    comparison = compare_with_baselines(evaluation, f"{cfg.arch} (this run)")
    metrics = _scored_split_metrics(run, cfg.STAGE, test_split, evaluation, comparison)
    metrics["postprocess"] = post.to_dict()
    metrics.update({"n_params": n_params, "steps": result.steps, "best_val_dice": result.best_metric,
                    "arch": cfg.arch})
    run.write_metrics(cfg.STAGE, metrics)
    curves = plot_training_curves(result.history)
    run.save_figure(curves, "02_training_curves")
    examples = prediction_figure(evaluation, root, n=4)
    run.save_figure(examples, "02_test_predictions")
    export_model(run, cfg.STAGE, model)
    return TrainOutcome(result.history, best, test_split, metrics, evaluation.per_class, curves, examples,
                        comparison.table)


def export_model(run: RunFolder, stage: str, model: Seg2DNet) -> Path:
    """``<run>/export``: the trained HF model (``save_pretrained``) and its model card."""
    spec = model.spec
    channels = "the slice repeated to 3 channels, " if spec.in_channels == 3 else ""
    loading = f"""
import torch
from transformers import AutoModelForSemanticSegmentation

model = AutoModelForSemanticSegmentation.from_pretrained("export").eval()
# input: slices resized to {spec.image_size} px, each divided by its own 99.5th percentile and clipped to [0, 1]
# (nbsupport.seg2d.data.normalize_intensity),
# {channels}then (x - {list(spec.mean)}) / {list(spec.std)}:
# pixel_values (B, {spec.in_channels}, {spec.image_size}, {spec.image_size})
logits = model(pixel_values=pixel_values).logits  # (B, {spec.num_labels}, h, w): SegFormer and BEiT at 1/4 of the input
# each class an independent sigmoid (the organs overlap): upsample the logits bilinearly to the input size, then
probabilities = torch.nn.functional.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear").sigmoid()
# masks: probabilities above each class's threshold in the run's {POSTPROCESS_FILE} (small regions dropped as it says)
"""
    return write_export(run, stage, lambda folder: save_hf_model(model, folder, CLASSES), loading)


def _postprocess_after_training(cfg: TrainConfig, model: Seg2DNet, manifest: pd.DataFrame, root: Path,
                                test_split: str) -> PostProcess:
    """``threshold``/``min_area`` for every class, or with ``postprocess="val_tuned"`` each class's own, chosen on
    val (only when there is a separate test split, so that the scores reported are not measured on val)."""
    if cfg.postprocess == "val_tuned" and test_split == "test" and (manifest.split == "val").any():
        return tune_postprocess(model, manifest[manifest.split == "val"], root, cfg.image_size,
                                resolve_device(cfg.device))
    return PostProcess.fixed(cfg.threshold, cfg.min_area)


def _scored_split_metrics(run: RunFolder, stage: str, split: str, evaluation: SplitEvaluation,
                          comparison: BaselineComparison) -> dict[str, Any]:
    """A scored split's metrics.json entries (``<split>_<metric>`` with ``_ci95``, the baselines and the paired
    differences), after writing the run's headline: the split's Dice next to the best no-skill baseline's (none
    when no slice has an organ in truth or prediction, so that Dice is undefined)."""
    scores, best = evaluation.scores, comparison.best
    if scores["dice"] is not None and comparison.scores[best]["dice"] is not None:
        run.write_headline(stage, f"{split} Dice", scores["dice"], BASELINE_LABELS[best],
                           comparison.scores[best]["dice"], ci95=scores["dice_ci95"])
    return {**{f"{split}_{k}": v for k, v in scores.items()}, **comparison.metrics(split)}


# ============================================================================================ 03 infer
def load_trained_model(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> Seg2DNet:
    """The network of ``<run>/checkpoints/<name>``, rebuilt from ``<run>/model_spec.json``, in eval mode with every
    tensor on ``device``; a checkpoint of another spec is refused (see :func:`nbsupport.checkpoints.load_model`)."""
    return load_model(checkpoint, Seg2DModelSpec, model_from_spec, device=device, system=SYSTEM)


@dataclasses.dataclass
class InferResult:
    submission: pd.DataFrame
    submission_path: Path
    scores: dict[str, float]
    figure: Any
    evaluation: SplitEvaluation
    root: Path
    viewer_cases: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # what 03_case_viewer.html shows
    viewer_path: Path | None = None  # 03_case_viewer.html


def predict(cfg: InferConfig, run: RunFolder) -> InferResult:
    """Predict a split (or ``input_dir``), write ``submission.csv`` (``id,class,predicted`` with RLE) and
    ``03_case_viewer.html``."""
    checkpoint = cfg.find_checkpoint(run)
    device = resolve_device(cfg.device)
    model = load_trained_model(checkpoint, device)
    manifest, root = _slices_to_predict(cfg)
    post = PostProcess.fixed(cfg.threshold, cfg.min_area)
    tuned = checkpoint.parent.parent / POSTPROCESS_FILE
    if cfg.postprocess == "from_training" and tuned.exists():
        post = PostProcess.from_file(tuned)
    print(f"post-processing ({post.source}): thresholds {post.thresholds}, min areas {post.min_areas}")
    evaluation = evaluate_split(model, manifest, root, model.spec.image_size, post.thresholds, device,
                                cfg.batch_size, post.min_areas)
    submission = submission_table(evaluation.manifest["id"], evaluation.pred)
    path = run.file("submission.csv")
    atomic_write_text(path, submission.to_csv(index=False))
    if evaluation.scores:
        comparison = compare_with_baselines(evaluation)
        run.write_metrics(cfg.STAGE, _scored_split_metrics(run, cfg.STAGE, cfg.split, evaluation, comparison))
    fig = prediction_figure(evaluation, root, n=cfg.n_examples)
    run.save_figure(fig, "03_predictions")
    result = InferResult(submission, path, evaluation.scores, fig, evaluation, root)
    result.viewer_cases = viewer_cases(result, limit=24)
    result.viewer_path = write_case_viewer(result.viewer_cases, run, cfg.split)
    return result


def _slices_to_predict(cfg: InferConfig) -> tuple[pd.DataFrame, Path]:
    """The rows of ``input_dir`` (a Kaggle-style tree, labelled or not), else the manifest's ``split``."""
    if cfg.input_dir:
        root = resolve_path(cfg.input_dir)
        return seg_data.build_manifest(root, val_fraction=0.0, test_fraction=0.0, seed=cfg.seed), root
    manifest, root = cfg.load_manifest()
    return manifest[manifest.split == cfg.split], root


# Inputs predict_files reads: Kaggle's 16-bit slice PNGs and single-frame DICOM slices.
PREDICT_SUFFIXES = (".png", ".dcm", ".dicom")


def predict_files(checkpoint: str | os.PathLike, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  *, device: str = "auto", overwrite: bool = False) -> PredictSummary:
    """Masks for your own slices with a trained run, no manifest: ``nbsupport predict seg2d --run R -i IN -o OUT``.

    Each input is a slice PNG (16-bit, as Kaggle ships them) or a single-frame DICOM slice (its stored values after
    the Modality LUT, no window: what the PNGs hold), or a folder searched recursively for them, e.g. Kaggle's
    ``test/`` tree. Every slice gets the run's own preprocessing (the model spec's input size, per-slice percentile
    scaling) and post-processing (``postprocess.json`` next to the checkpoints, else 02_train's ``threshold`` and
    ``min_area``).

    Writes, under ``out_dir``: ``masks/<id>_<class>.png`` (0/255, the slice's own size) per slice and class, and
    ``submission.csv`` (``id,class,predicted``, Kaggle's RLE) for every slice predicted. ``<id>`` is the Kaggle id
    (``case123_day20_slice_0001``) for a file in the Kaggle layout, else the file name without its suffix.

    Args:
        checkpoint: the trained run folder (``outputs/runs/<id>/seg2d``) or one of its checkpoint folders.
        inputs: files and folders.
        out_dir: where to write; existing outputs are refused unless ``overwrite``.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
    """
    run_dir, checkpoint_dir = training_run(checkpoint)
    trained = run_config(run_dir)
    files = expand_inputs(inputs, PREDICT_SUFFIXES)
    ids = _prediction_ids(files)
    out = resolve_path(out_dir)
    mask_paths = {path: [out / "masks" / f"{ids[path]}_{c}.png" for c in CLASSES] for path in files}
    submission_path = out / "submission.csv"
    check_outputs_free([submission_path, *(m for paths in mask_paths.values() for m in paths)], overwrite)
    torch_device = resolve_device(device)
    model = load_trained_model(checkpoint_dir, torch_device)
    if model.spec.image_size != trained["image_size"]:
        raise PredictError(f"{run_dir}: model_spec.json says image_size {model.spec.image_size}, config.json "
                           f"{trained['image_size']}; the run folder is inconsistent")
    tuned = run_dir / POSTPROCESS_FILE
    post = (PostProcess.from_file(tuned) if tuned.exists()
            else PostProcess.fixed(trained["threshold"], trained["min_area"]))
    rows: list[pd.DataFrame] = []

    def predict_one(path: Path) -> list[Path]:
        masks = post.masks(slice_probabilities(model, _read_input_slice(path), torch_device))
        for mask, target in zip(masks, mask_paths[path]):
            _write_mask_png(mask, target, overwrite)
        rows.append(submission_table([ids[path]], [masks]))
        return mask_paths[path]

    summary = for_each_input(files, predict_one, out, desc="seg2d predict")
    if rows:
        atomic_write_text(submission_path, pd.concat(rows).to_csv(index=False))
        summary.written.append(submission_path)
    return summary


def _prediction_ids(files: Sequence[Path]) -> dict[Path, str]:
    """Each input's id (Kaggle id, else the file name without suffix); two inputs with one id are an error."""
    ids: dict[Path, str] = {}
    first: dict[str, Path] = {}
    for path in files:
        stem = path.stem if path.suffix.lower() in PREDICT_SUFFIXES else path.name
        name = seg_data.kaggle_slice_id(path) or stem
        if name in first:
            raise PredictError(f"{first[name]} and {path} would both be written as {name!r}; predict them into "
                               "separate -o folders")
        ids[path], first[name] = name, path
    return ids


def _read_input_slice(path: Path) -> np.ndarray:
    """A raw slice (H, W): a Kaggle 16-bit PNG as stored, or a DICOM slice's modality values (no VOI window)."""
    if path.suffix.lower() == ".png":
        return seg_data.read_slice(path)
    return read_dicom_image(path, window=None)[0]


def _write_mask_png(mask: np.ndarray, path: Path, overwrite: bool) -> None:
    import cv2

    ok, encoded = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise ValueError(f"could not encode the mask for {path.name} as PNG")
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(encoded.tobytes())


def submission_table(ids: Any, pred: list[np.ndarray]) -> pd.DataFrame:
    """Kaggle submission rows: one per slice and class, ``predicted`` = RLE ('' for an empty mask)."""
    rows = [(i, c, rle_encode(m[k])) for i, m in zip(ids, pred) for k, c in enumerate(CLASSES)]
    return pd.DataFrame(rows, columns=["id", "class", "predicted"])


# ============================================================================================ 04 attention
@dataclasses.dataclass
class AttentionResult:
    slice_id: str
    query_point: tuple[int, int]  # (row, col) in model-input pixels
    layer_maps: list[tuple[str, np.ndarray]]  # (title, (h, w) map averaged over heads) per layer
    head_maps: list[tuple[str, np.ndarray]]  # per head of the chosen layer
    image: np.ndarray  # (S, S) model input
    layers_figure: Any
    heads_figure: Any
    overlay_figure: Any
    pred: np.ndarray | None = None  # (3, S, S) bool at model input size
    truth: np.ndarray | None = None  # (3, S, S) bool
    spacing: tuple[float, float] | None = None  # (row_mm, col_mm) of the model input's pixels
    viewer_cases: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # what 04_attention_viewer shows
    viewer_path: Path | None = None  # 04_attention_viewer.html


def attention_maps(cfg: AttentionConfig, run: RunFolder) -> AttentionResult:
    """Self-attention of every transformer layer for one query pixel, over the chosen slice; writes the figures
    and ``04_attention_viewer.html``. On the CPU."""
    model = load_trained_model(cfg.find_checkpoint(run))
    if model.spec.arch == "upernet":
        raise ValueError("upernet uses a ConvNeXt backbone, which has no self-attention to show; "
                         "train segformer, beit or dpt for 04_attention")
    manifest, root = cfg.load_manifest()
    part = manifest[manifest.split == cfg.split].reset_index(drop=True)
    index = _attention_slice(cfg, part)
    row, size = part.iloc[index], model.spec.image_size
    item = seg_data.SliceDataset(part.iloc[[index]], root, image_size=size)[0]
    query = _query_pixel(cfg, item["masks"], size)
    with torch.no_grad():
        logits, attentions = model(item["image"][None], output_attentions=True)
    layer_maps, head_maps = query_attention(attentions, model.spec, query, size, cfg.layer)
    image = item["image"][0].numpy()
    pred, truth = (logits.sigmoid()[0] > 0.5).numpy(), item["masks"].numpy() > 0.5
    figures = attention_figures(image, layer_maps, head_maps, query, pred, truth, str(row["id"]))
    for fig, name in zip(figures, ("04_attention_layers", "04_attention_heads", "04_prediction_vs_truth")):
        run.save_figure(fig, name)
    spacing = (float(row["height"]) * float(row["pixel_spacing_h"]) / size,
               float(row["width"]) * float(row["pixel_spacing_w"]) / size)
    att = AttentionResult(str(row["id"]), query, layer_maps, head_maps, image, *figures, pred, truth, spacing)
    att.viewer_cases = attention_viewer_cases(att)
    att.viewer_path = write_attention_viewer(att.viewer_cases, run, att.slice_id)
    return att


def _attention_slice(cfg: AttentionConfig, part: pd.DataFrame) -> int:
    """Row of ``part`` (the split, index 0..n-1) to show: ``slice_id``, else the slice with most organ."""
    if cfg.slice_id:
        if cfg.slice_id not in set(part["id"]):
            raise ValueError(f"slice_id {cfg.slice_id!r} is not in the {cfg.split} split of {cfg.manifest}")
        return int(np.flatnonzero(part["id"] == cfg.slice_id)[0])
    return most_organ_slices([seg_data.masks_for_row(r) for r in part.itertuples()], 1)[0]


def _query_pixel(cfg: AttentionConfig, masks: torch.Tensor, size: int) -> tuple[int, int]:
    """(row, col) in model-input pixels: ``query_point``, else the median pixel of ``query_organ`` (the centre of
    the input when the organ is absent from the slice)."""
    if cfg.query_point is not None:
        return int(cfg.query_point[0] * (size - 1)), int(cfg.query_point[1] * (size - 1))
    organ = masks[CLASSES.index(cfg.query_organ)].numpy() > 0.5
    rows, cols = np.nonzero(organ) if organ.any() else (np.array([size // 2]), np.array([size // 2]))
    return int(np.median(rows)), int(np.median(cols))
