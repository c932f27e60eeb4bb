"""The verbs the ct_clip notebooks call: preprocess (01), train (02), predict (03: retrieval, zero-shot, features)
and attention_maps (04: similarity, retrieved reports, relevance), and ``load_trained_model``.

Each verb takes the stage's frozen config and its run folder, does one thing, records what it measured in
``metrics.json``, writes the views the run folder promises (03/04: the offline viewer pages) and returns a small
result object with the tables, figures and viewer cases a notebook shows.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nbsupport.checkpoints import load_model
from nbsupport.ct_clip import preprocessing as ct_pre
from nbsupport.ct_clip import views
from nbsupport.ct_clip.config import (PROMPT_PRESENT, SYSTEM, AttentionConfig, InferConfig, PreprocessConfig,
                                      TrainConfig)
from nbsupport.ct_clip.data import LABELS, CTVolumeDataset, read_real_ct, scan_dataset
from nbsupport.ct_clip.inference import (Evaluation, encode_volumes, evaluate_split, extract_features, linear_probe,
                                         relevance_map, retrieve_reports)
from nbsupport.ct_clip.model import CTClip, CTClipSpec, report_features
from nbsupport.ct_clip.task import CTClipTrainingTask, checkpoint_monitor, distributed_config
from nbsupport.device import resolve_device
from nbsupport.paths import resolve_path
from nbsupport.runs import RunFolder, atomic_write_text
from nbsupport.spec import ParameterCount, count_parameters


def load_trained_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> CTClip:
    """Rebuild the model from ``<run>/model_spec.json`` (the text tower from its path), load a checkpoint into it,
    every tensor on ``device``, in eval mode."""
    return load_model(checkpoint, CTClipSpec, CTClip, device, system=SYSTEM)


# ============================================================================================ 01 preprocess
@dataclasses.dataclass
class PreprocessResult:
    manifest: pd.DataFrame
    manifest_path: Path
    status: pd.DataFrame  # one row per volume: done / skipped / failed (+ reason), seconds, shapes
    summary: pd.DataFrame  # volumes and label prevalence per split
    figure: Any  # before/after slices
    real_ct: dict[str, Any] | None  # {"source", "hu_range", "image", "spacing", "figure"} of the real CT shown


def preprocess(cfg: PreprocessConfig, run: RunFolder) -> PreprocessResult:
    """Preprocess every volume (in parallel, skipping done ones), write the manifest, show before/after."""
    root = cfg.source_root()
    manifest, status = ct_pre.preprocess_dataset(root, cfg.manifest, cfg.output_dir, cfg.spec(), cfg.workers,
                                                 cfg.redo, cfg.val_fraction, cfg.report_fields, cfg.seed, cfg.limit)
    atomic_write_text(run.file("preprocessing_status.csv"), status.to_csv(index=False))
    counts = status.status.value_counts().to_dict()
    run.write_metrics(cfg.STAGE, {"volumes": len(manifest), **{f"volumes_{k}": int(v) for k, v in counts.items()},
                                  "seconds_per_volume": float(status.loc[status.status == "done", "seconds"].mean())
                                  if (status.status == "done").any() else None})
    failed = status[status.status == "failed"]
    for row in failed.itertuples():
        print(f"FAILED {row.volume}: {row.reason}")
    if not len(manifest):
        raise RuntimeError(f"all {len(status)} volumes failed; first reason: {failed.reason.iloc[0]}")
    fig = views.before_after_figure(manifest.head(cfg.n_examples), root)
    run.save_figure(fig, "01_before_after")
    real = None
    if cfg.real_ct.lower() != "none":
        real = preprocess_real_ct(cfg.real_ct, cfg.spec())
        run.save_figure(real["figure"], "01_real_ct")
        run.write_metrics(cfg.STAGE, {"real_ct_hu_min": real["hu_range"][0], "real_ct_hu_max": real["hu_range"][1]})
    return PreprocessResult(manifest, resolve_path(cfg.manifest), status, summarise_manifest(manifest), fig, real)


def summarise_manifest(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per split: volumes, patients and the prevalence of each label that occurs."""
    present = [n for n in LABELS if manifest[n].astype(int).any()]
    rows = {}
    for split, part in manifest.groupby("split"):
        row: dict[str, Any] = {"volumes": len(part), "patients": part["patient"].nunique()}
        row.update({n: round(float(part[n].astype(int).mean()), 3) for n in present})
        rows[split] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def preprocess_real_ct(source: str, spec: ct_pre.PreprocessSpec) -> dict[str, Any]:
    """Run a real CT (see :func:`nbsupport.ct_clip.data.read_real_ct`) through :func:`preprocess_volume`; returns
    its name, HU range, output, output spacing and a before/after figure."""
    ct, name = read_real_ct(source)
    hu = ct.stored.astype(np.float32) * ct.slope + ct.intercept
    out, spacing = ct_pre.preprocess_volume(ct, spec)
    fig = views.real_ct_figure(name, hu, ct.spacing, out, spacing)
    return {"source": name, "hu_range": (float(hu.min()), float(hu.max())), "image": out, "spacing": spacing,
            "figure": fig}


# ============================================================================================ 02 train
@dataclasses.dataclass
class TrainOutcome:
    history: list[dict[str, Any]]
    checkpoint: Path
    evaluation: Evaluation
    curves: Any
    parameters: ParameterCount


def train(cfg: TrainConfig, run: RunFolder) -> TrainOutcome:
    """Train on the train split, keep the best checkpoint by validation report->volume mean rank (or R@5),
    evaluate it on the test split."""
    from nbsupport.viz import plot_training_curves

    manifest, root = cfg.load_manifest()
    spec = cfg.model_spec()
    atomic_write_text(run.file("model_spec.json"), spec.to_json())
    has_val = (manifest.split == "val").any()
    settings = cfg.train_settings(
        optimizer="adamw", scheduler="warmup_cosine", save_trainable_only=True,
        monitor=checkpoint_monitor(cfg.select_checkpoint_by) if has_val else "train_loss",
        monitor_mode="max" if has_val and cfg.select_checkpoint_by == "r5" else "min")
    result = cfg.launch_training(CTClipTrainingTask, run.path, root, spec, settings,
                                 accelerate_config=distributed_config(cfg.num_processes))
    best = Path(result.best_checkpoint or result.last_checkpoint)
    model = load_trained_model(best)
    parameters = count_parameters(model)
    print(f"{spec.image_arch} image encoder + {spec.text_encoder} ({spec.text_tuning}): "
          f"{parameters.total / 1e6:.1f} M parameters, {parameters.trainable / 1e6:.2f} M trained")
    test_split = "test" if (manifest.split == "test").any() else "val"
    evaluation = evaluate_split(model, manifest, root, test_split, resolve_device(cfg.device), cfg.batch_size)
    metrics = {"steps": result.steps, "best_val": result.best_metric, "n_params": parameters.total,
               "n_trainable": parameters.trainable,
               **{f"{test_split}_{k}": v for k, v in evaluation.headline().items()}}
    run.write_metrics(cfg.STAGE, metrics)
    curves = plot_training_curves(result.history)
    run.save_figure(curves, "02_training_curves")
    return TrainOutcome(result.history, best, evaluation, curves, parameters)


# ============================================================================================ 03 infer
@dataclasses.dataclass
class InferResult:
    evaluation: Evaluation
    retrieval: pd.DataFrame
    zero_shot: pd.DataFrame  # per label: zero-shot metrics (+ linear-probe AUROC when computed)
    features: dict[str, Any]  # {"file", "embedding" (D,), "path" of the saved .npy}
    figure: Any  # AUROC per label bar chart
    viewer_cases: list[dict[str, Any]]  # the split's first volumes with retrieved reports (views.viewer_cases)
    viewer_path: Path  # 03_case_viewer.html: the same cases offline


def predict(cfg: InferConfig, run: RunFolder) -> InferResult:
    """Evaluate the checkpoint on ``cfg.split`` (retrieval, zero-shot, linear probe), extract the features of one
    CT file, and write the case viewer."""
    model = load_trained_model(cfg.find_checkpoint(run))
    manifest, root = cfg.load_manifest()
    device = resolve_device(cfg.device)
    evaluation = evaluate_split(model, manifest, root, cfg.split, device, cfg.batch_size, cfg.prompt_present,
                                cfg.prompt_absent)
    zero_shot = evaluation.zero_shot.copy()
    if cfg.linear_probe and (manifest.split == "train").any():
        probe = linear_probe(model, manifest, root, cfg.split, device, cfg.batch_size)
        zero_shot["linear_probe_auroc"] = probe["auroc"].reindex(zero_shot.index)
    atomic_write_text(run.file("retrieval.csv"), evaluation.retrieval.to_csv())
    atomic_write_text(run.file("zero_shot.csv"), zero_shot.to_csv())
    run.write_metrics(cfg.STAGE, _infer_metrics(evaluation, zero_shot))
    features = _features_of_one_file(model, cfg, root, evaluation, run)
    fig = views.auroc_figure(zero_shot)
    run.save_figure(fig, "03_zero_shot_auroc")
    cases = views.viewer_cases(evaluation, root, limit=4)
    return InferResult(evaluation, evaluation.retrieval, zero_shot, features, fig, cases,
                       views.write_case_viewer(cases, run, evaluation.split))


def _infer_metrics(evaluation: Evaluation, zero_shot: pd.DataFrame) -> dict[str, Any]:
    """The headline metrics, volume->report retrieval and the linear probe's mean AUROC, prefixed by the split."""
    split = evaluation.split
    metrics = {f"{split}_{k}": v for k, v in evaluation.headline().items()}
    metrics.update({f"{split}_volume_to_report_{k}": float(v)
                    for k, v in evaluation.retrieval.loc["volume->report"].items()})
    if "linear_probe_auroc" in zero_shot:
        metrics[f"{split}_linear_probe_mean_auroc"] = float(zero_shot.loc["mean", "linear_probe_auroc"])
    return metrics


def _features_of_one_file(model: CTClip, cfg: InferConfig, root: Path, evaluation: Evaluation,
                          run: RunFolder) -> dict[str, Any]:
    """Feature extraction for one file, as a user would do it on a new CT: ``cfg.input_file``, else the source
    NIfTI of the split's first volume (with its metadata's rescale). Saved as ``features/<name>.npy``."""
    if cfg.input_file:
        source, slope, intercept = resolve_path(cfg.input_file), None, None
    else:
        meta = scan_dataset(root)
        row = meta[meta.volume == evaluation.manifest.volume.iloc[0]].iloc[0]
        source, slope, intercept = root / row.nifti, row.rescale_slope, row.rescale_intercept
    embedding = extract_features(model, source, slope=slope, intercept=intercept)
    feature_path = run.file(f"features/{Path(source).name.split('.')[0]}.npy")
    np.save(feature_path, embedding)
    return {"file": str(source), "embedding": embedding, "path": str(feature_path)}


# ============================================================================================ 04 attention
@dataclasses.dataclass
class AttentionResult:
    volume: str
    similarity_figure: Any
    top_reports: pd.DataFrame
    relevance_figure: Any
    relevance: np.ndarray  # (X, Y, Z) at model input size, 0..1
    # for attention_viewer_cases: the preprocessed volume explained, its voxel size, the prompt and the report
    preprocessed: Path | None = None  # npz (1, X, Y, Z) RAS, 0..1
    spacing: tuple[float, float, float] | None = None  # (X, Y, Z) mm of the preprocessed voxels
    prompt: str = ""
    report: str = ""
    viewer_cases: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # views.attention_viewer_cases
    viewer_path: Path | None = None  # 04_attention_viewer.html: the same case offline


def attention_maps(cfg: AttentionConfig, run: RunFolder) -> AttentionResult:
    """Similarity matrix of a batch, the top-k reports for one volume, the relevance of a label prompt, and the
    attention viewer."""
    model = load_trained_model(cfg.find_checkpoint(run))
    manifest, root = cfg.load_manifest()
    part = manifest[manifest.split == cfg.split].reset_index(drop=True)
    index = _volume_to_explain(cfg, part)
    batch = part.iloc[sorted({*range(min(cfg.n_batch, len(part))), index})].reset_index(drop=True)
    dataset = CTVolumeDataset(batch, root, model.spec.input_size)
    image_emb, _ = encode_volumes(model, dataset, torch.device("cpu"), cfg.batch_size)
    text_emb = model.project_text(report_features(model, list(batch.report))).detach()
    similarity = views.similarity_figure((text_emb @ image_emb.T).numpy(), list(batch.volume))
    run.save_figure(similarity, "04_similarity_matrix")
    row = int(np.flatnonzero(batch.volume == part.volume[index])[0])
    top = retrieve_reports(model, part, image_emb[row], index, cfg.top_k)
    image = dataset[row]["image"]
    prompt = PROMPT_PRESENT.format(cfg.label)
    relevance = relevance_map(model, image, prompt)
    relevance_fig = views.relevance_figure(image[0].numpy(), relevance, cfg.n_slices,
                                           f"{part.volume[index]}: relevance of '{prompt}'")
    run.save_figure(relevance_fig, "04_relevance")
    chosen = part.iloc[index]
    result = AttentionResult(str(part.volume[index]), similarity, top, relevance_fig, relevance, root / chosen["image"],
                             (float(chosen.spacing_x), float(chosen.spacing_y), float(chosen.spacing_z)), prompt,
                             str(chosen.report))
    result.viewer_cases = views.attention_viewer_cases(result)
    result.viewer_path = views.write_attention_viewer(result.viewer_cases, run, result.volume)
    return result


def _volume_to_explain(cfg: AttentionConfig, part: pd.DataFrame) -> int:
    """Row of ``part`` to explain: ``cfg.volume``, else the first volume with ``cfg.label``, else the first."""
    if cfg.volume:
        if cfg.volume not in set(part.volume):
            raise ValueError(f"volume {cfg.volume!r} is not in the {cfg.split} split of {cfg.manifest}")
        return int(np.flatnonzero(part.volume == cfg.volume)[0])
    positives = np.flatnonzero(part[cfg.label].astype(int).to_numpy() == 1)
    return int(positives[0]) if len(positives) else 0
