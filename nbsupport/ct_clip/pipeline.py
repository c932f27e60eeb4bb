"""The verbs the ct_clip notebooks call: preprocess (01), train (02), predict (03: retrieval, zero-shot, features)
and attention_maps (04: similarity, retrieved reports, relevance), ``load_trained_model``, and ``predict_files``
(``nbsupport predict ct_clip``: embeddings and zero-shot probabilities of a user's own CT files).

Each verb takes the stage's frozen config and its run folder, does one thing, records what it measured in
``metrics.json``, writes the views the run folder promises (03/04: the offline viewer pages) and returns a small
result object with the tables, figures and viewer cases a notebook shows.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nbsupport.checkpoints import load_model
from nbsupport.ct_clip import preprocessing as ct_pre
from nbsupport.ct_clip import views
from nbsupport.ct_clip.config import (PROMPT_ABSENT, PROMPT_PRESENT, SYSTEM, AttentionConfig, InferConfig,
                                      PreprocessConfig, TrainConfig)
from nbsupport.ct_clip.data import LABELS, CTVolumeDataset, label_matrix, read_ct, read_real_ct, read_volume
from nbsupport.ct_clip.inference import (Evaluation, LinearProbe, ci95_list, embed_ct, encode_volumes, evaluate_split,
                                         linear_probe, mean_auroc, paired_diff, relevance_map, retrieval_with_intervals,
                                         retrieve_reports, zero_shot_scores)
from nbsupport.ct_clip.model import CTClip, CTClipSpec, report_features
from nbsupport.ct_clip.task import CTClipTrainingTask, checkpoint_monitor, distributed_config
from nbsupport.device import resolve_device
from nbsupport.export import export_checkpoint
from nbsupport.metrics import bootstrap_ci95, format_with_ci
from nbsupport.paths import resolve_path
from nbsupport.predict import (PredictError, PredictSummary, check_outputs_free, expand_inputs, for_each_input,
                               run_config, training_run)
from nbsupport.runs import RunFolder, atomic_path, atomic_write_json, atomic_write_text
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
    table: pd.DataFrame  # the test metrics, each as "value (95 % interval)"


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
    model = load_trained_model(best, resolve_device(cfg.device))
    parameters = count_parameters(model)
    print(f"{spec.image_arch} image encoder + {spec.text_encoder} ({spec.text_tuning}): "
          f"{parameters.total / 1e6:.1f} M parameters, {parameters.trainable / 1e6:.2f} M trained")
    test_split = "test" if (manifest.split == "test").any() else "val"
    evaluation = evaluate_split(model, manifest, root, test_split, resolve_device(cfg.device), cfg.batch_size)
    test_metrics = {f"{test_split}_{k}": v for k, v in evaluation.headline_with_intervals().items()}
    run.write_metrics(cfg.STAGE, {"steps": result.steps, "best_val": result.best_metric, "n_params": parameters.total,
                                  "n_trainable": parameters.trainable, **test_metrics})
    write_retrieval_headline(run, cfg.STAGE, test_metrics, test_split, len(evaluation.manifest))
    curves = plot_training_curves(result.history)
    run.save_figure(curves, "02_training_curves")
    export_checkpoint(run, cfg.STAGE, best, spec, CTClip)
    return TrainOutcome(result.history, best, evaluation, curves, parameters, test_table(test_metrics))


def write_retrieval_headline(run: RunFolder, stage: str, metrics: dict[str, Any], split: str, volumes: int) -> None:
    """The run's headline: report->volume R@5 (R@k of the largest k under 5 on a split of fewer volumes) with its
    interval, next to chance (k / volumes). The zero-shot mean AUROC against 0.5 is in metrics.json beside it."""
    recall = {int(key.rsplit("@", 1)[1]): key for key in metrics
              if key.startswith(f"{split}_report_to_volume_R@") and key.rsplit("@", 1)[1].isdigit()}
    k = max(n for n in recall if n <= 5)
    key = recall[k]
    run.write_headline(stage, f"report->volume R@{k} ({split})", metrics[key], f"chance R@{k}",
                       k / volumes, ci95=metrics[f"{key}_ci95"])


def test_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """The test metrics as the notebooks show them: ``0.80 (0.74–0.85)``, the value with its 95 % interval."""
    return pd.DataFrame({"value (95 % interval)": pd.Series(format_with_ci(metrics, digits=3))})


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
    table: pd.DataFrame  # the test metrics, each as "value (95 % interval)"


def predict(cfg: InferConfig, run: RunFolder) -> InferResult:
    """Evaluate the checkpoint on ``cfg.split`` (retrieval, zero-shot, linear probe), extract the features of one
    CT file, and write the case viewer."""
    device = resolve_device(cfg.device)
    checkpoint = cfg.find_checkpoint(run)
    model = load_trained_model(checkpoint, device)
    manifest, root = cfg.load_manifest()
    evaluation = evaluate_split(model, manifest, root, cfg.split, device, cfg.batch_size, cfg.prompt_present,
                                cfg.prompt_absent)
    zero_shot = evaluation.zero_shot.copy()
    probe = None
    if cfg.linear_probe and (manifest.split == "train").any():
        probe = linear_probe(model, manifest, root, cfg.split, device, cfg.batch_size)
        zero_shot["linear_probe_auroc"] = probe.auroc["auroc"].reindex(zero_shot.index)
    atomic_write_text(run.file("retrieval.csv"), evaluation.retrieval.to_csv())
    atomic_write_text(run.file("zero_shot.csv"), zero_shot.to_csv())
    metrics = _infer_metrics(evaluation, probe)
    run.write_metrics(cfg.STAGE, metrics)
    write_retrieval_headline(run, cfg.STAGE, metrics, evaluation.split, len(evaluation.manifest))
    features = _features_of_one_file(model, cfg, root, evaluation, run, _preprocessing_of(checkpoint))
    fig = views.auroc_figure(zero_shot)
    run.save_figure(fig, "03_zero_shot_auroc")
    cases = views.viewer_cases(evaluation, root, limit=4)
    return InferResult(evaluation, evaluation.retrieval, zero_shot, features, fig, cases,
                       views.write_case_viewer(cases, run, evaluation.split), test_table(metrics))


def _infer_metrics(evaluation: Evaluation, probe: LinearProbe | None) -> dict[str, Any]:
    """The headline metrics, volume->report retrieval and the linear probe's mean AUROC, prefixed by the split, each
    with its 95 % interval; the probe against zero-shot as a paired difference on the same volumes and labels."""
    split = evaluation.split
    metrics = {f"{split}_{k}": v for k, v in evaluation.headline_with_intervals().items()}
    metrics.update(retrieval_with_intervals(evaluation.similarity.T, f"{split}_volume_to_report_"))
    if probe is not None and len(probe.auroc):
        truth, labels = label_matrix(evaluation.manifest), [n for n in probe.auroc.index if n != "mean"]
        key = f"{split}_linear_probe_mean_auroc"
        metrics[key] = float(probe.auroc.loc["mean", "auroc"])
        metrics[f"{key}_ci95"] = ci95_list(bootstrap_ci95(lambda s, t: mean_auroc(t, s, labels), probe.scores, truth))
        metrics[f"{key}_minus_zero_shot"] = paired_diff((probe.scores, truth), (evaluation.scores, truth),
                                                        lambda s, t: mean_auroc(t, s, labels))
    return metrics


def _preprocessing_of(checkpoint: Path) -> ct_pre.PreprocessSpec:
    """The preprocessing the checkpoint's training run recorded (01_preprocess), else CT-Data's (said so)."""
    try:
        return _trained_preprocessing(training_run(checkpoint)[0])[0]
    except PredictError as err:
        print(f"features of one file: CT-Data's preprocessing geometry, since {err}")
        return ct_pre.PreprocessSpec()


def _features_of_one_file(model: CTClip, cfg: InferConfig, root: Path, evaluation: Evaluation,
                          run: RunFolder, spec: ct_pre.PreprocessSpec) -> dict[str, Any]:
    """Feature extraction for one file, as a user would do it on a new CT: ``cfg.input_file`` (:func:`read_ct`),
    else the source NIfTI of the split's first volume (decoded as its CT-RATE release stores it), preprocessed by
    ``spec`` (the training run's). Saved as ``features/<name>.npy``."""
    if cfg.input_file:
        source = resolve_path(cfg.input_file)
        ct = read_ct(source)
    else:
        row = evaluation.manifest.iloc[0]
        source, ct = root / row.nifti, read_volume(root, row.volume)
    embedding = embed_ct(model, ct, spec)
    feature_path = run.file(f"features/{Path(source).name.split('.')[0]}.npy")
    np.save(feature_path, embedding)
    return {"file": str(source), "embedding": embedding, "path": str(feature_path)}


# ============================================================================================ your own files
CT_SUFFIXES = (".nii.gz", ".nii")


def predict_files(checkpoint: str | os.PathLike, inputs: list[str | os.PathLike], out_dir: str | os.PathLike, *,
                  device: str = "auto", overwrite: bool = False) -> PredictSummary:
    """Embed new CT volumes with a trained run and score the 18 labels zero-shot; no manifest needed.

    Args:
        checkpoint: the training run folder (``outputs/runs/<id>/ct_clip``; its best checkpoint) or a checkpoint
            folder.
        inputs: CT ``.nii(.gz)`` files (HU from the header's scaling), DICOM series folders or single DICOM files,
            or folders holding them.
        out_dir: receives per input ``<id>.npy`` (the unit-length image embedding, float32 (embed_dim,)) and
            ``<id>_zero_shot.json`` (the probability of each label), and for all inputs together ``features.csv``
            (one row per input: its embedding) and ``zero_shot.csv`` (one row per input: the 18 probabilities).
            ``<id>`` is the file name without ``.nii(.gz)`` / ``.dcm`` or the series folder's name.

    The run's own preprocessing is applied: the geometry and HU window its 01_preprocess recorded, the resize to the
    model input, and the zero-shot prompts of its 03_infer (else CT-CLIP's "X is present." / "X is not present.").
    Existing outputs are refused unless ``overwrite``.
    """
    run_dir, checkpoint_dir = training_run(checkpoint)
    spec, present, absent = _trained_preprocessing(run_dir)
    files = expand_inputs(inputs, CT_SUFFIXES, series_folders=True)
    names = [_input_id(f) for f in files]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PredictError(f"several inputs would write the same output name(s) {twice}: "
                           + ", ".join(str(f) for f, n in zip(files, names) if n in twice))
    out = resolve_path(out_dir)
    planned = {f: (out / f"{n}.npy", out / f"{n}_zero_shot.json") for f, n in zip(files, names)}
    tables = (out / "features.csv", out / "zero_shot.csv")
    check_outputs_free([p for paths in planned.values() for p in paths] + list(tables), overwrite)
    model = load_trained_model(checkpoint_dir, resolve_device(device))
    rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def predict_one(path: Path) -> list[Path]:
        embedding = embed_ct(model, read_ct(path), spec)
        probability = zero_shot_scores(model, torch.from_numpy(embedding)[None], LABELS, present, absent)[0]
        npy, probabilities = planned[path]
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(npy, overwrite=overwrite) as tmp, open(tmp, "wb") as fh:
            np.save(fh, embedding)
        atomic_write_json(probabilities, {"input": str(path), "embedding": npy.name, "prompts": [present, absent],
                                          "zero_shot": dict(zip(LABELS, map(float, probability)))}, overwrite)
        rows[_input_id(path)] = (embedding, probability)
        return [npy, probabilities]

    summary = for_each_input(files, predict_one, out, desc="ct_clip predict")
    if rows:
        ids = pd.Index(list(rows), name="input")
        embeddings = np.stack([e for e, _ in rows.values()])
        features = pd.DataFrame(embeddings, index=ids, columns=[f"e{i}" for i in range(embeddings.shape[1])])
        zero_shot = pd.DataFrame(np.stack([p for _, p in rows.values()]), index=ids, columns=list(LABELS))
        for table, path in zip((features, zero_shot), tables):
            atomic_write_text(path, table.to_csv(), overwrite)
            summary.written.append(path)
    return summary


def _input_id(path: Path) -> str:
    """The output name of an input: its file name without ``.nii(.gz)`` / ``.dcm``, or a series folder's name."""
    name = path.name
    for suffix in (*CT_SUFFIXES, ".dcm"):
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return name


def _trained_preprocessing(run_dir: Path) -> tuple[ct_pre.PreprocessSpec, str, str]:
    """(01_preprocess's PreprocessSpec, present prompt, absent prompt) of a training run folder."""
    try:
        prep = run_config(run_dir, "01_preprocess")
    except PredictError as err:
        raise PredictError(f"{err}: the preprocessing the model was trained with is unknown; predict with the run "
                           "folder 01_preprocess and 02_train ran in (as nbsupport run writes it)") from None
    spec = ct_pre.PreprocessSpec(tuple(prep["spacing"]), tuple(prep["shape"]), prep["hu_min"], prep["hu_max"])
    try:
        infer = run_config(run_dir, "03_infer")
    except PredictError:
        infer = {}
    return spec, infer.get("prompt_present", PROMPT_PRESENT), infer.get("prompt_absent", PROMPT_ABSENT)


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
    device = resolve_device(cfg.device)
    model = load_trained_model(cfg.find_checkpoint(run), device)
    manifest, root = cfg.load_manifest()
    part = manifest[manifest.split == cfg.split].reset_index(drop=True)
    index = _volume_to_explain(cfg, part)
    batch = part.iloc[sorted({*range(min(cfg.n_batch, len(part))), index})].reset_index(drop=True)
    dataset = CTVolumeDataset(batch, root, model.spec.input_size)
    image_emb, _ = encode_volumes(model, dataset, device, cfg.batch_size)
    text_emb = model.project_text(report_features(model, list(batch.report))).detach().cpu()
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
