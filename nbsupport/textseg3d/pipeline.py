"""The verbs the textseg3d notebooks call: preprocess, train, predict (with the text ablation), attention maps.

Each verb takes the stage's frozen config and its run folder, does one thing, records what it measured in
``metrics.json``, writes the views the run folder promises, and returns a small result object with the tables,
figures and viewer cases a notebook shows. :func:`load_trained_model` rebuilds a trained network on a device;
:func:`predict_files` (``nbsupport predict textseg3d``) segments a user's own volumes with a trained run.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nbsupport.checkpoints import SPEC_FILE, load_model
from nbsupport.device import resolve_device
from nbsupport.export import export_checkpoint
from nbsupport.manifest import write_manifest
from nbsupport.paths import resolve_path
from nbsupport.predict import (
    PredictError,
    PredictSummary,
    check_outputs_free,
    expand_inputs,
    for_each_input,
    run_config,
    training_run,
)
from nbsupport.runs import RunFolder, atomic_write_text
from nbsupport.spec import count_parameters
from nbsupport.textseg3d import data as ts_data
from nbsupport.textseg3d import views
from nbsupport.textseg3d.config import SYSTEM, AttentionConfig, InferConfig, PreprocessConfig, TrainConfig
from nbsupport.textseg3d.inference import (
    ABLATION_NAMES,
    CaseEvaluation,
    ablation_table,
    dice_results,
    evaluate_cases,
    fusion_attention,
    predict_volume,
    result_table,
    save_prediction_nifti,
    write_mask_nifti,
    write_result_csv,
)
from nbsupport.textseg3d.model import LLMSeg, LLMSegSpec, build_llmseg
from nbsupport.textseg3d.task import TextSeg3DTrainingTask
from nbsupport.textseg3d.transforms import eval_transforms
from nbsupport.train import TrainResult

TOKEN_READOUT_SCALE = 2  # 04_attention, token readout, scale -1: one row per report word at the 1/8 scale
# 02_train's metrics.json names for the ablation rows, <split>_dice_<name>, as the first release wrote them
TRAIN_METRIC_NAMES = {"true": "LLMSeg_true_report", "flipped": "LLMSeg_flipped_report",
                      "empty": "LLMSeg_empty_report", "image_only": "image_only_UNet"}


def load_trained_model(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> LLMSeg:
    """LLMSeg (or the image-only UNet) rebuilt from ``model_spec.json`` next to ``checkpoints/`` with the trained
    weights, every tensor on ``device`` (the frozen text encoder, which checkpoints do not store, comes from its own
    path), in eval mode."""
    return load_model(checkpoint, LLMSegSpec, build_llmseg, device=device, system=SYSTEM)


# ============================================================================================ 01 preprocess
@dataclasses.dataclass
class PreprocessResult:
    manifest: pd.DataFrame
    manifest_path: Path
    excluded: pd.DataFrame  # cases left out (e.g. bilateral) with the reason
    summary: pd.DataFrame
    figure: Any


def preprocess(cfg: PreprocessConfig, run: RunFolder) -> PreprocessResult:
    """Read the dataset at ``cfg.data_root``, write the manifest, summarise and show a few cases."""
    root = resolve_path(cfg.source_root())
    table = ts_data.build_manifest(root, cfg.report_table or None, cfg.val_fraction, cfg.test_fraction)
    manifest_path = resolve_path(cfg.manifest)
    write_manifest(table.manifest, manifest_path, ts_data.TEXTSEG3D_SCHEMA, root)
    summary = summarise_manifest(table.manifest)
    atomic_write_text(run.file("manifest_summary.csv"), summary.to_csv())
    if len(table.excluded):
        atomic_write_text(run.file("excluded_cases.csv"), table.excluded.to_csv(index=False))
    run.write_metrics(cfg.STAGE, {"cases": len(table.manifest), "excluded": len(table.excluded),
                                  "layouts": sorted(set(table.manifest["layout"])),
                                  "report_table": table.report_path.name})
    examples = table.manifest.groupby("side").head(max(1, cfg.n_examples // 2)).head(cfg.n_examples)
    fig = views.case_figure([ts_data.load_case(root / r.image, root / r.label if r.label else None)
                             for r in examples.itertuples()], list(examples["case"]), list(examples["prompt"]))
    run.save_figure(fig, "01_cases")
    return PreprocessResult(table.manifest, manifest_path, table.excluded, summary, fig)


def summarise_manifest(manifest: pd.DataFrame) -> pd.DataFrame:
    """Cases per split and side, and how many reports name each surgery type and N+."""
    out = manifest.assign(
        surgery=manifest["prompt"].str.extract(r"(breast conserving|total mastectomy|unknown type)")[0],
        node_positive=~manifest["prompt"].str.startswith("N0"))
    return out.groupby(["split", "side"]).agg(cases=("case", "count"), mastectomy=(
        "surgery", lambda s: int((s == "total mastectomy").sum())), node_positive=("node_positive", "sum"))


# ============================================================================================ 02 train
@dataclasses.dataclass
class TrainOutcome:
    history: list[dict[str, Any]]
    checkpoint: Path
    image_only_checkpoint: Path | None
    test_split: str
    scores: pd.DataFrame  # model x report variant -> mean Dice, IoU, HD95 on the test split
    table: pd.DataFrame  # the same, each as "mean (95 % interval)"
    curves: Any


def model_spec(cfg: TrainConfig, use_text: bool = True) -> LLMSegSpec:
    """The network 02_train builds: LLMSeg, or with ``use_text=False`` the same UNet without the text path."""
    return LLMSegSpec(feature_size=cfg.feature_size, n_prompts=cfg.n_prompts, context_length=cfg.context_length,
                      num_heads=cfg.num_heads, wiring=cfg.wiring, use_text=use_text, center_text=cfg.center_text,
                      image_pe=cfg.image_pe,
                      text_readout=cfg.text_readout if "sentence" in cfg.text_encoder else "mean",
                      text_encoder=cfg.text_encoder,
                      text_encoder_path=cfg.text_encoder_path if cfg.text_encoder in ("causal", "sentence") else "",
                      roi=tuple(cfg.roi))


def train(cfg: TrainConfig, run: RunFolder) -> TrainOutcome:
    """Train LLMSeg (and the image-only UNet) on the train split; report test Dice with true/flipped/empty reports."""
    from nbsupport.viz import plot_training_curves

    manifest, root = cfg.load_manifest()
    spec = model_spec(cfg, use_text=True)
    counts = count_parameters(build_llmseg(spec, cfg.seed))
    print(f"LLMSeg: {counts.trainable / 1e6:.2f} M trainable, {counts.frozen / 1e6:.1f} M frozen (text "
          f"encoder {cfg.text_encoder}), roi {cfg.roi}")
    result, best = _train_one(cfg, spec, run.path, root, manifest)
    image_only_best = None
    histories = {"LLMSeg": result.history}
    if cfg.image_only_baseline:
        print("image-only UNet, same budget:")
        base_result, image_only_best = _train_one(cfg, model_spec(cfg, use_text=False), run.path / "image_only",
                                                  root, manifest)
        histories["image only"] = base_result.history
    test_split = "test" if (manifest.split == "test").any() else "val"
    evaluations = _test_evaluations(manifest[manifest.split == test_split], root, best, image_only_best,
                                    resolve_device(cfg.device))
    scores = pd.DataFrame({ABLATION_NAMES[k]: ev.metrics[["dice", "iou", "hd95"]].mean()
                           for k, ev in evaluations.items()}).T
    keys = {variant: f"{test_split}_dice_{TRAIN_METRIC_NAMES[variant]}" for variant in evaluations}
    metrics = dice_results(evaluations, keys, test_split)
    metrics.update({"steps": result.steps, "best_val": result.best_metric, "trainable": counts.trainable,
                    "frozen": counts.frozen})
    run.write_metrics(cfg.STAGE, metrics)
    write_dice_headline(run, cfg.STAGE, metrics, keys)
    curves = plot_training_curves(_merge_histories(histories))
    run.save_figure(curves, "02_training_curves")
    export_checkpoint(run, cfg.STAGE, best, spec, build_llmseg)
    return TrainOutcome(result.history, best, image_only_best, test_split, scores, ablation_table(evaluations), curves)


def write_dice_headline(run: RunFolder, stage: str, metrics: dict[str, Any], keys: dict[str, str]) -> None:
    """The run's headline: Dice with the true report (its interval) next to Dice with the side flipped, the baseline
    that shows whether the report's side steers the segmentation."""
    true, flipped = keys["true"], keys["flipped"]
    run.write_headline(stage, "Dice, true report", metrics[true], "Dice, side-flipped report", metrics[flipped],
                       ci95=metrics[f"{true}_ci95"])


def _train_one(cfg: TrainConfig, spec: LLMSegSpec, out_dir: Path, root: Path,
               manifest: pd.DataFrame) -> tuple[TrainResult, Path]:
    """Train one network into ``out_dir``: AdamW, linear warm-up then cosine (the defaults of ``--optim_name`` and
    ``--lrschedule`` in tvseg/MM-LLM-RO main.py); returns the result and its best (else last) checkpoint."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / SPEC_FILE, spec.to_json())
    steps_per_epoch = max(1, int((manifest.split == "train").sum()) // cfg.batch_size)
    has_val = bool((manifest.split == "val").any())
    settings = cfg.train_settings(
        optimizer="adamw", scheduler="warmup_cosine", warmup_steps=cfg.warmup_epochs * steps_per_epoch,
        monitor="val_dice" if has_val else "train_loss", monitor_mode="max" if has_val else "min",
        save_trainable_only=True,  # the frozen text encoder is rebuilt from its path, not copied per checkpoint
    )
    result = cfg.launch_training(TextSeg3DTrainingTask, out_dir, root, spec, settings)
    return result, Path(result.best_checkpoint or result.last_checkpoint)


def _test_evaluations(part: pd.DataFrame, root: Path, best: Path, image_only_best: Path | None,
                      device: torch.device) -> dict[str, CaseEvaluation]:
    """Per-case Dice, IoU and HD95 of the held-out cases: LLMSeg with each report variant, then the image-only
    UNet (key ``image_only``)."""
    model = load_trained_model(best, device)
    evaluations = {variant: evaluate_cases(model, part, root, variant, device) for variant in ts_data.REPORT_VARIANTS}
    if image_only_best is not None:
        evaluations["image_only"] = evaluate_cases(load_trained_model(image_only_best, device), part, root, "true",
                                                   device)
    return evaluations


def _merge_histories(histories: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One history with keys prefixed per model, so both curves share one figure."""
    if len(histories) == 1:
        return next(iter(histories.values()))
    merged: list[dict[str, Any]] = []
    for name, history in histories.items():
        tag = "" if name == "LLMSeg" else "image_only_"
        merged += [{("step" if k == "step" else "epoch" if k == "epoch" else tag + k): v for k, v in e.items()}
                   for e in history]
    return merged


# ============================================================================================ 03 infer
@dataclasses.dataclass
class InferResult:
    result: pd.DataFrame  # result.csv of the true report
    result_path: Path
    ablation: pd.DataFrame  # model/report -> Dice, IoU, HD95
    ablation_table: pd.DataFrame  # the same, each as "mean (95 % interval)"
    figure: Any
    evaluations: dict[str, CaseEvaluation]
    viewer_path: Path | None = None  # 03_case_viewer.html
    viewer_cases: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # for viz.slice_viewer


def predict(cfg: InferConfig, run: RunFolder) -> InferResult:
    """Predict a split with the true, flipped and empty reports (and the image-only model when trained); write
    ``<case>.nii.gz`` (true report), ``result.csv`` per variant, the ablation table and ``03_case_viewer.html``.
    With ``cfg.input_image``: segment that one image from ``cfg.input_report`` instead."""
    device = resolve_device(cfg.device)
    model = load_trained_model(cfg.find_checkpoint(run), device)
    result = predict_new_case(cfg, run, model, device) if cfg.input_image else _predict_split(cfg, run, model, device)
    result.viewer_cases, result.viewer_path = views.write_case_viewer(result, cfg, run)
    return result


def _predict_split(cfg: InferConfig, run: RunFolder, model: LLMSeg, device: torch.device) -> InferResult:
    manifest, root = cfg.load_manifest()
    part = manifest[manifest.split == cfg.split].reset_index(drop=True)
    evaluations = {v: evaluate_cases(model, part, root, v, device, cfg.overlap, cfg.sw_batch_size)
                   for v in ts_data.REPORT_VARIANTS}
    try:
        image_only = load_trained_model(cfg.find_checkpoint(run, model="image_only"), device)
        evaluations["image_only"] = evaluate_cases(image_only, part, root, "true", device, cfg.overlap,
                                                   cfg.sw_batch_size)
    except FileNotFoundError:
        print("no image-only checkpoint next to the LLMSeg one: ablation without it")
    out_dir = run.file("predictions/.keep").parent
    for case, pred, rel in zip(evaluations["true"].cases, evaluations["true"].predictions, part["image"]):
        save_prediction_nifti(pred, root / rel, out_dir / f"{case}.nii.gz")
    tables = {name: result_table(ev) for name, ev in evaluations.items()}
    result_path = write_result_csv(tables["true"], run.file("result.csv"))
    for name, table in tables.items():
        if name != "true":
            write_result_csv(table, run.file(f"result_{name}.csv"))
    ablation = pd.DataFrame({ABLATION_NAMES[k]: ev.metrics[["dice", "iou", "hd95"]].mean()
                             for k, ev in evaluations.items()}).T
    keys = {variant: f"{cfg.split}_dice_{variant}" for variant in evaluations}
    metrics = dice_results(evaluations, keys, cfg.split)
    run.write_metrics(cfg.STAGE, metrics)
    write_dice_headline(run, cfg.STAGE, metrics, keys)
    atomic_write_text(run.file("ablation.csv"), ablation.to_csv())
    fig = views.ablation_figure(part, root, evaluations, cfg.n_examples)
    run.save_figure(fig, "03_ablation")
    return InferResult(tables["true"], result_path, ablation, ablation_table(evaluations), fig, evaluations)


def predict_new_case(cfg: InferConfig, run: RunFolder, model: LLMSeg, device: torch.device) -> InferResult:
    """Segment one image file given only its report text; writes ``<case>.nii.gz`` with the input's affine."""
    image_path = resolve_path(cfg.input_image)
    case_id = ts_data.volume_id(image_path)
    data = eval_transforms(with_label=False)({"image": str(image_path)})
    prob = predict_volume(model, data["image"][None], cfg.input_report, model.spec.roi, cfg.overlap,
                          cfg.sw_batch_size, device)
    pred = (prob.argmax(0) == 1).numpy().astype(np.uint8)
    out = save_prediction_nifti(pred, image_path, run.file(f"predictions/{case_id}.nii.gz"))
    loaded = ts_data.load_case(image_path)
    fig = views.case_figure([loaded], [case_id], [cfg.input_report or "(empty report)"], [{"prediction": pred}])
    run.save_figure(fig, "03_new_case")
    table = pd.DataFrame([{"case": case_id, "voxels": int(pred.sum()), "prediction": str(out)}])
    ev = CaseEvaluation("true", [case_id], [cfg.input_report], [pred], pd.DataFrame())
    return InferResult(table, out, pd.DataFrame(), pd.DataFrame(), fig, {"true": ev})


# ============================================================================================ your own files
def predict_files(checkpoint: str | os.PathLike, inputs: list[str | os.PathLike], out_dir: str | os.PathLike, *,
                  device: str = "auto", overwrite: bool = False, report: str | None = None) -> PredictSummary:
    """Segment new volumes with a trained run, guided by ``report``; no manifest needed.

    Args:
        checkpoint: the training run folder (``outputs/runs/<id>/textseg3d``; its best checkpoint) or a checkpoint
            folder.
        inputs: NIfTI (``.nii``, ``.nii.gz``) or npz volumes, DICOM series folders, or folders holding them.
        out_dir: where ``<id>.nii.gz`` (the target mask, uint8, in the input's voxel order with its affine) and,
            for a DICOM input, ``<id>_seg.dcm`` (a DICOM-SEG referencing the source series) are written; ``<id>``
            is :func:`nbsupport.textseg3d.data.volume_id`.
        report: the report text (a prompt like ``"N0, cT2, breast conserving surgery, left side"``), the same
            for every input; ``""`` is the empty report. Required unless the run is the image-only UNet.

    The run's own preprocessing is applied: the same load, canonical orientation and HU window as 02_train's
    validation, the sliding window of the model's ``roi``, and the overlap and window batch of the run's 03_infer
    (else of the 02_train profile's defaults). Existing outputs are refused unless ``overwrite``; a file that cannot
    be read is named in the summary with its reason and the others go on.

    Example: ``predict_files("outputs/runs/R/textseg3d", ["ct.nii.gz", "ct_series/"], "masks/",
    report="N0, cT2, breast conserving surgery, left side")``.
    """
    run_dir, checkpoint_dir = training_run(checkpoint)
    overlap, sw_batch_size = _inference_window(run_dir)
    spec_path = checkpoint_dir.parent.parent / SPEC_FILE
    if not spec_path.is_file():
        raise PredictError(f"{spec_path} is missing: {checkpoint_dir} is not a textseg3d checkpoint")
    if report is None and LLMSegSpec.from_json(spec_path.read_text()).use_text:
        raise PredictError("textseg3d segments what the report describes: pass --report \"...\" (\"\" for the "
                           "empty report)")
    files = expand_inputs(inputs, ts_data.VOLUME_SUFFIXES, series_folders=True)
    names = [ts_data.volume_id(f) for f in files]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PredictError(f"several inputs would write the same output name(s) {twice}: "
                           + ", ".join(str(f) for f, n in zip(files, names) if n in twice))
    out = resolve_path(out_dir)
    planned = {f: [out / f"{n}.nii.gz"] + ([out / f"{n}_seg.dcm"] if _is_dicom(f) else [])
               for f, n in zip(files, names)}
    check_outputs_free([p for paths in planned.values() for p in paths], overwrite)
    torch_device = resolve_device(device)
    model = load_trained_model(checkpoint_dir, torch_device)

    def predict_one(path: Path) -> list[Path]:
        data = eval_transforms(with_label=False)({"image": str(path)})
        prob = predict_volume(model, data["image"][None], report or "", model.spec.roi, overlap, sw_batch_size,
                              torch_device)
        affine = np.asarray(data["image"].meta["original_affine"])
        stored = ts_data.from_canonical((prob.argmax(0) == 1).numpy().astype(np.uint8), affine)
        written = [write_mask_nifti(stored, affine, planned[path][0], overwrite=overwrite)]
        if len(planned[path]) > 1:
            from nbsupport.dicom_seg import Segment, write_dicom_seg

            written.append(write_dicom_seg(stored, path, planned[path][1], [Segment("CTV", TARGET_DESCRIPTION)],
                                           algorithm="textseg3d", series_description="textseg3d target volume",
                                           overwrite=overwrite))
        return written

    return for_each_input(files, predict_one, out, desc="textseg3d predict")


TARGET_DESCRIPTION = "clinical target volume predicted by textseg3d from the report"


def _is_dicom(path: Path) -> bool:
    return path.is_dir() or path.name.lower().endswith(".dcm")


def _inference_window(run_dir: Path) -> tuple[float, int]:
    """(overlap, windows per pass) the run's 03_infer used, else the defaults of its 02_train profile."""
    trained = run_config(run_dir, "02_train")
    try:
        infer = run_config(run_dir, "03_infer")
    except PredictError:
        infer = InferConfig.from_params({"profile": trained.get("profile", "full")}).to_dict()
    return float(infer["overlap"]), int(infer["sw_batch_size"])


# ============================================================================================ 04 attention
@dataclasses.dataclass
class AttentionResult:
    case: str
    prompt: str
    tokens: list[str]
    bertviz_html: Path | None  # 04_bertviz_head_view.html (None without bertviz)
    token_figure: Any  # encoder self-attention, per layer (mean over heads), static
    fusion_figure: Any  # per text token and scale: attention over voxels on axial / coronal slices
    # for attention_viewer_cases: the case in HU (canonical IPL), its target and prediction, the fusion maps
    image_hu: np.ndarray | None = None  # (D, H, W)
    label: np.ndarray | None = None  # (D, H, W) bool
    pred: np.ndarray | None = None  # (D, H, W) bool
    fusion_maps: list[np.ndarray] | None = None  # per scale (n_prompts, d, h, w), over the volume padded to 32
    spacing: tuple[float, float, float] | None = None  # (D, H, W) mm
    viewer_path: Path | None = None  # 04_attention_viewer.html
    viewer_cases: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # for viz.slice_viewer


def attention_maps(cfg: AttentionConfig, run: RunFolder) -> AttentionResult:
    """bertviz head view of the report in the frozen text encoder, a static per-layer token map, and the fusion
    attention of each text token over the voxels at each scale, on axial and coronal slices next to the mask;
    writes ``04_bertviz_head_view.html`` and ``04_attention_viewer.html``."""
    model = load_trained_model(cfg.find_checkpoint(run), resolve_device(cfg.device))
    if model.text_encoder is None:
        raise ValueError("the checkpoint is an image-only model; 04_attention needs LLMSeg")
    manifest, root = cfg.load_manifest()
    part = manifest[manifest.split == cfg.split].reset_index(drop=True)
    if cfg.case and cfg.case not in set(part["case"]):
        raise ValueError(f"case {cfg.case!r} is not in the {cfg.split} split of {cfg.manifest}")
    row = part[part["case"] == cfg.case].iloc[0] if cfg.case else part.iloc[0]
    tokens, attentions = model.text_encoder.encoder_attentions(row["prompt"])
    html_path = views.write_bertviz_view(attentions, tokens, run)
    token_fig = views.token_attention_figure(tokens, attentions)
    run.save_figure(token_fig, "04_report_token_attention")
    data = eval_transforms()(ts_data.case_items(part[part["case"] == row["case"]], root)[0])
    maps, probs = fusion_attention(model, torch.as_tensor(data["image"]).as_subclass(torch.Tensor)[None],
                                   row["prompt"])
    image = np.asarray(data["image"])[0]
    label = np.asarray(data["label"])[0] > 0.5
    scales = range(len(maps)) if cfg.scale < 0 else [cfg.scale]
    names = None
    if model.spec.text_readout == "tokens":
        # one fusion token per report token and prompt: show the first prompt's report tokens, by word, at one scale
        ids, _ = model.text_encoder._token_ids([row["prompt"]])
        names = model.text_encoder.tokenizer.convert_ids_to_tokens(ids[0].tolist())
        maps = [m[:len(names)] for m in maps]
        scales = [TOKEN_READOUT_SCALE] if cfg.scale < 0 else [cfg.scale]
    fusion_fig = views.fusion_attention_figure(image, label, probs[1] > 0.5, maps, list(scales), row["prompt"], names)
    run.save_figure(fusion_fig, "04_fusion_attention")
    loaded = ts_data.load_case(root / row["image"])
    att = AttentionResult(str(row["case"]), str(row["prompt"]), tokens, html_path, token_fig, fusion_fig,
                          loaded["image"], label, probs[1] > 0.5, maps, loaded["spacing"])
    att.viewer_cases, att.viewer_path = views.write_attention_viewer(att, cfg, run)
    return att
