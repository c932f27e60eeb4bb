"""The four verbs of the cxr_report notebooks, in workflow order: preprocess, train, predict (reports with metrics
and baselines), attention_maps; and :func:`load_trained_model`.

Training follows the seed in two stages: (1) the vision model (DenseNet + disease attention + auxiliary
14-label classifier) is trained on the labels; (2) with the vision model frozen (the seed runs it in eval mode
inside its Dataset), its 14 disease tokens are computed once and the projection + LoRA adapters of the 4-bit LM
learn to write the report. Both stages run on the shared trainer (``nbsupport.train``), checkpoints in
``<run>/vision`` and ``<run>/report``; with ``resume`` a finished vision stage is reloaded and the report stage
continues from its last checkpoint. The 03 and 04 verbs write their offline viewers into the run folder.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import safetensors.torch
import torch

from nbsupport.checkpoints import SPEC_FILE, load_weights
from nbsupport.cxr_report import data as cxr_data
from nbsupport.cxr_report.chexbert import RULE_LABELER, ReportLabeler, report_labeler
from nbsupport.cxr_report.config import (
    DENSENET121_IMAGENET,
    AttentionConfig,
    InferConfig,
    PreprocessConfig,
    TrainConfig,
)
from nbsupport.cxr_report.inference import (
    SplitScores,
    TrainedModel,
    baseline_reports,
    best_checkpoint,
    choose_reports,
    disease_evidence,
    disease_tokens,
    generate_reports,
    lm_token_attention,
    load_vision_model,
    read_spec,
    reference_positives,
    report_on_image,
    score_systems,
)
from nbsupport.cxr_report.labeler import LABELS
from nbsupport.cxr_report.model import (
    LLAMA2_7B_CONFIG,
    CxrModelSpec,
    ReportGenerator,
    lm_prompts,
    load_language_model,
    place_on,
    prompt_token_ids,
    report_generator_parameters,
)
from nbsupport.cxr_report.task import ReportTrainingTask, VisionTrainingTask, label_aurocs
from nbsupport.cxr_report.views import (
    ATTENTION_VIEWER,
    CASE_VIEWER,
    attention_viewer_cases,
    disease_maps_figure,
    report_cases,
    report_figure,
    token_attention_figure,
    viewer_sources,
    write_bertviz_page,
    write_viewer,
)
from nbsupport.device import resolve_device
from nbsupport.export import Contents, base_model_name, write_export, write_peft_adapter, write_tensors
from nbsupport.manifest import read_manifest, write_manifest
from nbsupport.paths import resolve_path
from nbsupport.predict import PredictSummary
from nbsupport.runs import RunFolder, atomic_write_json, atomic_write_text, read_json
from nbsupport.spec import ParameterCount
from nbsupport.train import TrainResult

VIEWER_CASES = 8  # X-rays of the split in 03_case_viewer.html (plus the real DICOM)


# ============================================================================================ 01 preprocess
@dataclasses.dataclass
class PreprocessResult:
    manifest: pd.DataFrame
    manifest_path: Path
    summary: pd.DataFrame
    figure: Any
    labeler_agreement: pd.DataFrame  # rule labeler vs the dataset's CheXbert labels per finding (empty: none shipped)


def preprocess(cfg: PreprocessConfig, run: RunFolder) -> PreprocessResult:
    """Read the dataset, write the resized RGB images and the manifest, summarise, measure the rule labeler against
    the dataset's own CheXbert labels where it ships them (``labeler_agreement.csv``), and draw samples."""
    root = cfg.source_root()
    manifest = cxr_data.build_manifest(root, cfg.report_section, cfg.prompt, cfg.val_fraction, cfg.test_fraction,
                                       cfg.seed, cfg.frontal_only)
    manifest = cxr_data.write_resized_images(manifest, root, cfg.image_size, f"preprocessed_{cfg.image_size}")
    manifest_path = resolve_path(cfg.manifest)
    write_manifest(manifest, manifest_path, cxr_data.CXR_SCHEMA, root)
    manifest, _ = read_manifest(manifest_path, cxr_data.CXR_SCHEMA, data_root=root, check_files=False)
    summary = cxr_data.summarise_manifest(manifest)
    atomic_write_text(run.file("manifest_summary.csv"), summary.to_csv())
    run.write_metrics(cfg.STAGE, {"images": len(manifest), "patients": int(manifest["patient"].nunique()),
                                  "image_size": cfg.image_size, **{f"{s}_images": int((manifest.split == s).sum())
                                                                   for s in ("train", "val", "test")}})
    agreement = cxr_data.rule_labeler_agreement(manifest)
    if not agreement.empty:
        atomic_write_text(run.file("labeler_agreement.csv"), agreement.to_csv())
        overall = agreement.loc["all findings (micro)"]
        run.write_metrics(cfg.STAGE, {"chexbert_labelled_images": int(overall["n"]),
                                      "rule_vs_chexbert_agreement": float(overall["agreement"]),
                                      "rule_vs_chexbert_positive_f1": float(overall["f1"])})
    sample = manifest.sample(n=min(cfg.n_examples, len(manifest)), random_state=cfg.seed)
    fig = report_figure([cxr_data.read_xray(root / r.image) for r in sample.itertuples()],
                        [{"report": r.report} for r in sample.itertuples()], list(sample["id"]),
                        "CheXpert Plus layout: resized inputs and their reports")
    run.save_figure(fig, "01_sample_images")
    return PreprocessResult(manifest, manifest_path, summary, fig, agreement)


# ============================================================================================ 02 train
@dataclasses.dataclass
class TrainOutcome:
    spec: CxrModelSpec
    vision_history: list[dict[str, Any]]
    report_history: list[dict[str, Any]]
    metrics: dict[str, Any]
    label_auroc: pd.DataFrame  # auxiliary classifier on the test split, per label
    vision_curves: Any
    report_curves: Any
    parameters: pd.DataFrame  # this run and the full configuration (meta device): total, trainable, lora, ...


def train(cfg: TrainConfig, run: RunFolder) -> TrainOutcome:
    """Stage 1 (vision, best val AUROC) then stage 2 (report generator, best val loss); returns curves, the
    auxiliary classifier's test AUROC per label and the parameter counts. With ``cfg.resume`` both stages continue
    in ``run`` from their last complete checkpoint (a finished stage is reloaded, not trained again)."""
    manifest, root = cfg.load_manifest()
    _check_encoder_weights(cfg)
    spec = model_spec(cfg, run)
    atomic_write_text(run.file(SPEC_FILE), spec.to_json())
    print(f"stage 1: {spec.encoder} + disease attention + 14-label classifier, {spec.num_patches} patches")
    vision_result = train_vision(cfg, run, manifest, root, spec)
    device = resolve_device(cfg.device)
    tokens, probs = disease_tokens(load_vision_model(run.path, device), manifest, root, device)
    tokens_file = run.file("disease_tokens.safetensors")
    safetensors.torch.save_file({"disease_tokens": tokens.contiguous(), "probabilities": probs.contiguous()},
                                str(tokens_file))
    print(f"stage 2: {spec.language_model} ({spec.quantization}) + LoRA r={spec.lora_r} on the disease tokens")
    report_result = train_report(cfg, run, manifest, root, spec, tokens_file)
    outcome = _train_outcome(cfg, run, manifest, spec, probs, vision_result, report_result)
    export_model(run, cfg.STAGE, device)
    return outcome


def model_spec(cfg: TrainConfig, run: RunFolder | None) -> CxrModelSpec:
    """The model this config describes; ``language_model='tiny'`` writes a random-init Llama into the run folder
    (so the smoke profile loads it through the same 4-bit ``from_pretrained`` path as a real LM)."""
    language_model = cfg.language_model
    if language_model == "tiny":
        from nbsupport.models import tiny_causal_lm

        assert run is not None, "language_model='tiny' is written into the run folder"
        folder = run.file("tiny_lm/config.json").parent
        lm, tokenizer = tiny_causal_lm(seed=cfg.seed)
        lm.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        language_model = str(folder)
    return CxrModelSpec(encoder=cfg.encoder, image_size=cfg.image_size, language_model=language_model,
                        quantization=cfg.quantization, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                        lora_dropout=cfg.lora_dropout, lora_targets=tuple(cfg.lora_targets),
                        findings_prompt=cfg.findings_prompt, findings_threshold=cfg.findings_threshold)


def train_vision(cfg: TrainConfig, run: RunFolder, manifest: pd.DataFrame, root: Path,
                 spec: CxrModelSpec) -> TrainResult:
    """Stage 1 into ``<run>/vision``: AdamW with a one-epoch warm-up and a cosine decay at ``vision_lr``, the
    best checkpoint by validation AUROC. Its own ``vision_*`` sizes; ``resume``, processes, workers and seed are
    the config's."""
    settings = cfg.train_settings(
        epochs=cfg.vision_epochs, max_steps=None, batch_size=cfg.vision_batch_size, grad_accum=1, lr=cfg.vision_lr,
        weight_decay=1e-4, optimizer="adamw", grad_clip=None, scheduler="warmup_cosine",
        warmup_steps=max(1, int((manifest.split == "train").sum()) // cfg.vision_batch_size),
        monitor="val_auroc", monitor_mode="max", mixed_precision="auto")
    return cfg.launch_training(VisionTrainingTask, run.path / "vision", root, spec, settings,
                               config_hash=spec.fingerprint("vision"))


def train_report(cfg: TrainConfig, run: RunFolder, manifest: pd.DataFrame, root: Path, spec: CxrModelSpec,
                 tokens_file: Path) -> TrainResult:
    """Stage 2 into ``<run>/report``: the seed's constant rate (``lr``; ``projection_lr`` for the projection),
    the best checkpoint by validation loss (training loss without a val split), only the trainable tensors stored
    (LoRA, projection); four evaluations per run. Its data are the cached tokens: no loader workers."""
    settings = cfg.train_settings(
        scheduler="constant", monitor="val_loss" if (manifest.split == "val").any() else "train_loss",
        save_trainable_only=True, eval_every=max(1, cfg.epochs // 4), num_workers=0)
    return cfg.launch_training(ReportTrainingTask, run.path / "report", root, spec, settings,
                               config_hash=spec.fingerprint("report"), tokens_file=str(tokens_file))


def _check_encoder_weights(cfg: TrainConfig) -> None:
    """Stop before training when ``encoder_weights`` names a file that is not there, saying where to get it."""
    if cfg.encoder_weights and not resolve_path(cfg.encoder_weights).is_file():
        raise FileNotFoundError(
            f"encoder_weights {resolve_path(cfg.encoder_weights)} does not exist. The ImageNet DenseNet-121 of the "
            f"seed (profile full: {DENSENET121_IMAGENET}) is torchvision's published file: download "
            "https://download.pytorch.org/models/densenet121-a639ec97.pth there; or set encoder_weights='' to "
            "train the encoder from scratch")


def _train_outcome(cfg: TrainConfig, run: RunFolder, manifest: pd.DataFrame, spec: CxrModelSpec,
                   probs: torch.Tensor, vision_result: TrainResult, report_result: TrainResult) -> TrainOutcome:
    """Metrics (``metrics.json``, the held-out AUROC with its 95 % bootstrap interval over images; the headline:
    that AUROC against chance), curves, the classifier's held-out AUROC per label, parameter counts."""
    from nbsupport.metrics import format_with_ci, with_ci95
    from nbsupport.viz import plot_training_curves

    test_split = "test" if (manifest.split == "test").any() else "val"
    rows = (manifest.split == test_split).to_numpy()
    labels = (np.nan_to_num(cxr_data.label_matrix(manifest[rows]), nan=0.0) == 1).astype(int)
    scores = probs.numpy()[rows]
    aurocs = label_aurocs(scores, labels)
    auroc_key = f"{test_split}_aux_auroc_mean"
    this_run = _this_run_parameters(spec)
    full = report_generator_parameters(LLAMA2_7B_CONFIG, model_spec(TrainConfig.from_params({"profile": "full"}), run))
    parameters = pd.DataFrame({"this run": this_run.to_dict(), "full (Llama-2-7b, meta device)": full.to_dict()}).T
    metrics = {"vision_best_val_auroc": vision_result.best_metric, "vision_steps": vision_result.steps,
               f"{test_split}_images": int(rows.sum()),
               auroc_key: float(np.mean(list(aurocs.values()))) if aurocs else None,
               "report_best_val_loss": report_result.best_metric, "report_steps": report_result.steps,
               "trainable_parameters": this_run.trainable, "full_trainable_parameters_llama2_7b": full.trainable,
               "language_model": cfg.language_model, "quantization": cfg.quantization,
               "encoder_weights": cfg.encoder_weights or "none (random init)"}
    if aurocs:
        metrics = with_ci95(metrics, lambda s, y: {auroc_key: _mean_auroc(s, y)},
                            scores, labels)
        run.write_headline(cfg.STAGE, f"{test_split} mean AUROC, auxiliary 14-label classifier", metrics[auroc_key],
                           "chance", 0.5, ci95=metrics[f"{auroc_key}_ci95"])
    run.write_metrics(cfg.STAGE, metrics)
    vision_curves = plot_training_curves(vision_result.history, title="stage 1: vision model on the 14 labels")
    report_curves = plot_training_curves(report_result.history, title="stage 2: report generator (LM loss)")
    run.save_figure(vision_curves, "02_vision_curves")
    run.save_figure(report_curves, "02_report_curves")
    per_label = with_ci95(aurocs, label_aurocs, scores, labels) if aurocs else {}
    table = pd.DataFrame({"auroc": aurocs, "auroc (95% CI)": format_with_ci(per_label, digits=3)}).rename_axis("label")
    return TrainOutcome(spec, vision_result.history, report_result.history, metrics, table, vision_curves,
                        report_curves, parameters)


def _mean_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """The mean AUROC over the labels that have both classes; None (undefined: the bootstrap leaves the resample
    out, rather than numpy warning about the mean of nothing) where none has."""
    aurocs = list(label_aurocs(scores, labels).values())
    return float(np.mean(aurocs)) if aurocs else None


def _this_run_parameters(spec: CxrModelSpec) -> ParameterCount:
    """Parameters of this run's report generator (from its LM config, on the meta device)."""
    from transformers import AutoConfig

    from nbsupport.models import resolve_pretrained

    config = AutoConfig.from_pretrained(resolve_pretrained(spec.language_model), local_files_only=True)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings")
    return report_generator_parameters({k: getattr(config, k) for k in keys}, spec)


# ============================================================================================ trained model
def load_trained_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Both stages of a training run, in eval mode, every parameter and buffer on ``device``: ``checkpoint`` is the
    02_train run folder (``model_spec.json``, ``vision/``, ``report/``; each stage's best checkpoint is loaded).
    03/04 then apply their ``lm_dtype`` (:meth:`TrainedModel.with_lm_dtype`).

    A 4-bit LM is quantized on a CUDA ``device`` directly; elsewhere it is loaded on the CPU, the trained weights
    go in there, and :func:`place_on` moves the report generator (``"meta"`` too: nothing is computed there, which
    is how the tests check that no tensor is left behind without a GPU).
    """
    place = torch.device(device)
    training_run = Path(checkpoint)
    spec = read_spec(training_run)
    vision = load_vision_model(training_run, "cpu")
    lm, tokenizer = load_language_model(spec, place)
    generator = ReportGenerator(spec, lm, tokenizer)
    load_weights(generator, best_checkpoint(training_run / "report"), expected_config_hash=spec.fingerprint("report"))
    return TrainedModel(spec, vision.to(place), place_on(generator, place).eval(), tokenizer)


def export_model(run: RunFolder, stage: str, device: str | torch.device = "cpu") -> Path:
    """``<run>/export``: the report LM's LoRA adapter as a PEFT folder (``adapter/``, with the tokenizer; its base is
    the run's ``language_model``), the vision model and the projection as ``visual/model.safetensors`` +
    ``config.json``, and the model card. The trained model is loaded on ``device`` to write them."""
    model = load_trained_model(run.path, device)
    spec = model.spec
    base = base_model_name(spec.language_model)

    def files(folder: Path) -> Contents:
        contents = write_peft_adapter(model.generator.lm, folder / "adapter", base, model.tokenizer)
        tensors = {**{f"vision.{k}": v for k, v in model.vision.state_dict().items()},
                   **{f"projection.{k}": v for k, v in model.generator.projection.state_dict().items()}}
        return contents | write_tensors(folder, tensors, spec, "vision.*: nbsupport.cxr_report.model.VisionModel "
                                        "(DenseNet features, disease attention, 14-label classifier); projection.*: "
                                        "Linear(disease token -> LM embedding)", sub="visual")

    quantization = ("quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\", "
                    "bnb_4bit_compute_dtype=torch.float32), " if spec.quantization == "nf4" else "")
    loading = f"""
import json, safetensors.torch, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from nbsupport.cxr_report.model import CxrModelSpec, VisionModel

base = AutoModelForCausalLM.from_pretrained("{base}", {quantization}dtype=torch.float32)
lm = PeftModel.from_pretrained(base, "export/adapter").eval()   # the report LM as trained
tokenizer = AutoTokenizer.from_pretrained("export/adapter")
spec = CxrModelSpec(**json.load(open("export/visual/config.json"))["model_spec"])
tensors = safetensors.torch.load_file("export/visual/model.safetensors")
vision = VisionModel(spec)
vision.load_state_dict({{k[len("vision."):]: v for k, v in tensors.items() if k.startswith("vision.")}})
projection = torch.nn.Linear(spec.feature_dim, base.config.hidden_size)
projection.load_state_dict({{k[len("projection."):]: v for k, v in tensors.items() if k.startswith("projection.")}})
# the LM reads [projection(disease tokens) | prompt + newline] as inputs_embeds
# (nbsupport.cxr_report.model.ReportGenerator)
"""
    return write_export(run, stage, files, loading)


# ============================================================================================ 03 infer
@dataclasses.dataclass
class InferResult:
    predictions: pd.DataFrame
    scores: pd.DataFrame  # model vs baselines, numbers
    per_label: pd.DataFrame
    figure: Any
    real_dicom: dict[str, Any] | None  # {"image", "report", "probabilities", "figure"}
    input_image: dict[str, Any] | None
    viewer_cases: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # for viz.slice_viewer
    viewer_path: Path | None = None  # 03_case_viewer.html in the run folder
    table: pd.DataFrame | None = None  # ``scores`` as "0.80 (0.74–0.85)": 95 % bootstrap intervals over reports
    comparisons: pd.DataFrame | None = None  # paired CE micro-F1 differences against the nearest-neighbour report
    labelers: dict[str, str] = dataclasses.field(default_factory=dict)  # who labelled what, for every CE number


def predict(cfg: InferConfig, run: RunFolder) -> InferResult:
    """Reports for a split with BLEU/ROUGE-L/CIDEr-D/clinical efficacy (95 % bootstrap intervals) beside the two
    baselines, written to ``predictions.csv`` and ``metrics.json`` (headline: CE micro-F1 against the
    nearest-neighbour report); plus ``input_image``, the real pydicom-data radiograph, and the offline viewer
    ``03_case_viewer.html`` (the first X-rays with both reports and an evidence map)."""
    device = resolve_device(cfg.device)
    model = load_trained_model(cfg.find_checkpoint(run), device).with_lm_dtype(cfg.lm_dtype)
    manifest, root = cfg.load_manifest()
    part = manifest[manifest.split == cfg.split].reset_index(drop=True)
    if cfg.max_reports:
        part = part.head(cfg.max_reports)
    train_part = manifest[manifest.split == "train"].reset_index(drop=True)
    tokens, probabilities = disease_tokens(model.vision, part, root, device)
    train_tokens, _ = disease_tokens(model.vision, train_part, root, device)
    beams = generate_reports(model, tokens, list(part["prompt"]), cfg.num_beams, cfg.no_repeat_ngram_size,
                             cfg.max_new_tokens, cfg.batch_size, probabilities)
    generated = choose_reports(beams, cfg.beam_choice, probabilities, model.spec.findings_threshold)
    references = list(part["report"])
    systems = {"model (this run)": generated}
    if cfg.beam_choice != "score":  # what the choice adds, beside the seed's best-scoring beam
        systems["model, best-scoring beam"] = choose_reports(beams, "score")
    systems.update(baseline_reports(train_tokens, list(train_part["report"]), tokens))
    labeler = report_labeler(cfg.chexbert_path, device)
    reference_pos, reference_source = reference_positives(part, labeler)
    scored = score_systems(systems, references, reference_pos, labeler)
    labelers = _labelers(cfg, labeler, reference_source)
    predictions = pd.DataFrame({"id": part["id"], "reference": references, "generated": generated,
                                "nearest_neighbour": systems["nearest-neighbour report"]})
    atomic_write_text(run.file("predictions.csv"), predictions.to_csv(index=False))
    _write_infer_metrics(cfg, run, len(part), scored, labelers)
    n = min(cfg.n_examples, len(part))
    fig = report_figure([cxr_data.read_xray(root / r.image) for r in part.head(n).itertuples()],
                        [{"generated": g, "reference": r} for g, r in zip(generated[:n], references[:n])],
                        list(part["id"][:n]), f"{cfg.split} split: generated vs reference", ncols=2)
    run.save_figure(fig, "03_generated_reports")
    real, single = _single_images(model, cfg, run)
    result = InferResult(predictions, scored.values, scored.per_label, fig, real, single, table=scored.table,
                         comparisons=scored.comparisons, labelers=labelers)
    result.viewer_cases = report_cases(model.vision, viewer_sources(result, manifest, root, VIEWER_CASES))
    result.viewer_path = write_viewer(result.viewer_cases, run, CASE_VIEWER,
                                      f"cxr_report {cfg.split}: generated vs reference")
    return result


def _labelers(cfg: InferConfig, labeler: ReportLabeler, reference_source: str) -> dict[str, str]:
    """Who read the findings behind every CE number, and who chose among the beams (metrics.json keys)."""
    out = {"ce_labeler": labeler.name, "ce_reference_labels": reference_source}
    if labeler.note:
        out["ce_labeler_note"] = labeler.note
    if cfg.beam_choice == "findings":
        out["beam_choice_labeler"] = RULE_LABELER.name
        if labeler.name == RULE_LABELER.name:
            out["beam_choice_note"] = ("the findings beam choice reads the beams with the CE scorer's own labeler; "
                                       "model_top_beam_* scores the seed's best-scoring beam, chosen without it")
    return out


def _write_infer_metrics(cfg: InferConfig, run: RunFolder, n_reports: int, scored: SplitScores,
                         labelers: dict[str, str]) -> None:
    """``metrics.json``: each system's scores under ``model_``, ``model_top_beam_``, ``baseline_nn_`` and
    ``baseline_common_`` with their ``_ci95``, the paired CE micro-F1 differences against the nearest-neighbour
    report, the labelers; ``headline.json``: the model's CE micro-F1 against the nearest-neighbour report's."""
    metrics: dict[str, Any] = {"n_reports": n_reports, "split": cfg.split, "beam_choice": cfg.beam_choice,
                               **labelers, **scored.metrics}
    run.write_metrics(cfg.STAGE, metrics)
    short = "CheXbert" if labelers["ce_labeler"].startswith("CheXbert") else "rule labeler"
    run.write_headline(cfg.STAGE, f"{cfg.split} CE micro-F1 ({short})", metrics["model_ce_micro_f1"],
                       "nearest-neighbour report", metrics["baseline_nn_ce_micro_f1"],
                       ci95=metrics["model_ce_micro_f1_ci95"])


# ============================================================================================ your own files
PREDICT_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
PREDICTIONS_CSV, PREDICTIONS_JSON = "reports.csv", "reports.json"
BEAM_FIELDS = ("num_beams", "no_repeat_ngram_size", "max_new_tokens", "beam_choice", "lm_dtype")


def predict_files(checkpoint: str | Path, inputs: Any, out_dir: str | Path, *, device: str = "auto",
                  overwrite: bool = False) -> PredictSummary:
    """The report and the 14 finding probabilities of each radiograph among ``inputs`` (PNG, JPEG or DICOM files,
    or folders of them), with no manifest: ``reports.csv`` (one row per image: file, report, a probability column
    per label) and ``reports.json`` (a list of ``{"file", "report", "probabilities": {label: p}}``) in ``out_dir``.

    The trained run's own preprocessing: its ``image_size`` (``model_spec.json``; the X-ray area-resized to RGB and
    ImageNet-normalised as 01_preprocess and the encoder do), and the beam settings its 03_infer recorded (else the
    defaults of its profile). ``checkpoint``: the 02_train run folder, or a checkpoint folder inside it. A file
    that fails is named with its reason and the others go on; existing outputs are never replaced unless
    ``overwrite``.
    """
    from nbsupport.predict import check_outputs_free, expand_inputs, for_each_input

    run_dir = _training_run_folder(checkpoint)
    settings = _beam_settings(run_dir)
    files = expand_inputs([inputs] if isinstance(inputs, (str, Path)) else inputs, PREDICT_SUFFIXES)
    out = resolve_path(out_dir)
    outputs = [out / PREDICTIONS_CSV, out / PREDICTIONS_JSON]
    check_outputs_free(outputs, overwrite)
    model = load_trained_model(run_dir, resolve_device(device)).with_lm_dtype(settings.lm_dtype)
    entries: list[dict[str, Any]] = []

    def one(path: Path) -> list[Path]:
        image = report_on_image(model, path, settings)
        entries.append({"file": str(path), "report": image.report,
                        "probabilities": dict(zip(LABELS, map(float, image.probabilities)))})
        return []

    summary = for_each_input(files, one, out, desc="report radiographs")
    if entries:
        out.mkdir(parents=True, exist_ok=True)
        table = pd.DataFrame([{"file": e["file"], "report": e["report"], **e["probabilities"]} for e in entries])
        atomic_write_text(outputs[0], table.to_csv(index=False))
        atomic_write_json(outputs[1], entries)
        summary.written += outputs
    return summary


def _training_run_folder(checkpoint: str | Path) -> Path:
    """The 02_train run folder holding ``model_spec.json``: ``checkpoint`` or the nearest folder above it."""
    from nbsupport.predict import PredictError

    path = resolve_path(checkpoint)
    for folder in (path, *path.parents[:4]):
        if (folder / SPEC_FILE).is_file():
            return folder
    raise PredictError(f"{path} is not a cxr_report training run: no {SPEC_FILE} in it or above it; pass --run "
                       "outputs/runs/<run_id>/cxr_report")


def _beam_settings(run_dir: Path) -> InferConfig:
    """The 03_infer settings of beam search for new files: those the run's 03_infer recorded, else the defaults
    of the profile its 02_train ran with."""
    from nbsupport.predict import run_config

    params = {"profile": run_config(run_dir, "02_train").get("profile")}
    recorded = (read_json(run_dir / "config.json", {}) or {}).get(InferConfig.STAGE, {})
    params.update({k: recorded[k] for k in BEAM_FIELDS if k in recorded})
    return InferConfig.from_params(params)


def _single_images(model: TrainedModel, cfg: InferConfig, run: RunFolder
                   ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The reports on the real pydicom-data radiograph (``real_dicom``) and on ``input_image``, with their
    evidence figures; no ground truth, so no metric but the real radiograph's report."""
    def one(path: Path, title: str, figure_name: str) -> dict[str, Any]:
        image = report_on_image(model, path, cfg)
        fig = disease_maps_figure(image.image, image.evidence, image.probabilities, image.report, title)
        run.save_figure(fig, figure_name)
        return {"image": image.image, "report": image.report,
                "probabilities": dict(zip(LABELS, image.probabilities.tolist())), "figure": fig}

    real = single = None
    if cfg.real_dicom:
        real = one(cxr_data.real_cxr_path(), cxr_data.REAL_CXR_TITLE, "03_real_dicom")
        run.write_metrics(cfg.STAGE, {"real_dicom_report": real["report"]})
    if cfg.input_image:
        path = resolve_path(cfg.input_image)
        single = one(path, path.name, "03_input_image")
    return real, single


# ============================================================================================ 04 attention
@dataclasses.dataclass
class AttentionResult:
    image_id: str
    report: str
    prior_figure: Any  # the learned (14, P) attention, the same for every image (as in the seed)
    evidence_figure: Any  # per-image evidence per disease beside the generated sentences
    token_figure: Any  # LM attention from generated tokens over visual + prompt + report tokens
    bertviz_html: Path | None
    # for attention_viewer_cases: the X-ray, each disease's evidence map and probability, the reference report
    image: np.ndarray | None = None  # uint8 (H, W)
    evidence: np.ndarray | None = None  # (14, side, side), >= 0
    probabilities: np.ndarray | None = None  # (14,)
    reference: str = ""
    viewer_cases: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # one per disease
    viewer_path: Path | None = None  # 04_attention_viewer.html in the run folder


def attention_maps(cfg: AttentionConfig, run: RunFolder) -> AttentionResult:
    """Disease attention maps and LM token attention for one image; writes ``04_attention_viewer.html`` (the 14
    evidence maps) and ``04_bertviz_head_view.html``."""
    from nbsupport.viz import attention_grid

    device = resolve_device(cfg.device)
    model = load_trained_model(cfg.find_checkpoint(run), device).with_lm_dtype(cfg.lm_dtype)
    path, image_id, prompt, reference = _attention_image(cfg)
    gray = cxr_data.read_xray(path)
    x = cxr_data.load_encoder_input(path, model.spec.image_size)[None]
    with torch.no_grad():
        tokens, logits, weights = model.vision(x.to(device))
    probabilities = logits.sigmoid().cpu()
    prompt_ids = prompt_token_ids(model.tokenizer, lm_prompts(model.spec, [prompt], probabilities)[0])
    beams = generate_reports(model, tokens.cpu(), [prompt], cfg.num_beams, cfg.no_repeat_ngram_size,
                             cfg.max_new_tokens, 1, probabilities)
    report = choose_reports(beams, cfg.beam_choice, probabilities, model.spec.findings_threshold)[0]
    side = int(round(weights.shape[1] ** 0.5))
    prior = [(label, weights[k].reshape(side, side).cpu().numpy()) for k, label in enumerate(LABELS)]
    prior_fig = attention_grid(gray, prior, ncols=5)
    run.save_figure(prior_fig, "04_disease_attention_prior")
    evidence, class_probabilities = disease_evidence(model.vision, x)
    evidence_fig = disease_maps_figure(gray, evidence, class_probabilities, report, image_id)
    run.save_figure(evidence_fig, "04_disease_evidence")
    attentions, names = lm_token_attention(model, tokens.cpu(), prompt_ids, report)
    token_fig = token_attention_figure(attentions, names, len(prompt_ids), cfg.layer)
    run.save_figure(token_fig, "04_token_attention")
    html = write_bertviz_page(attentions, names, run)
    run.write_metrics(cfg.STAGE, {"image_id": image_id, "report": report})
    result = AttentionResult(image_id, report, prior_fig, evidence_fig, token_fig, html, gray, evidence,
                             class_probabilities, reference)
    result.viewer_cases = attention_viewer_cases(result)
    result.viewer_path = write_viewer(result.viewer_cases, run, ATTENTION_VIEWER, f"cxr_report evidence: {image_id}")
    return result


def _attention_image(cfg: AttentionConfig) -> tuple[Path, str, str, str]:
    """(path, id, prompt, reference report) of the image 04 looks at: ``input_image``, else ``image_id`` of the
    split, else the split's image with the most positive labels."""
    if cfg.input_image:
        path = resolve_path(cfg.input_image)
        return path, path.name, cxr_data.DEFAULT_PROMPT, ""
    manifest, root = cfg.load_manifest()
    part = manifest[manifest.split == cfg.split].reset_index(drop=True)
    if cfg.image_id:
        if cfg.image_id not in set(part["id"]):
            raise ValueError(f"image_id {cfg.image_id!r} is not in the {cfg.split} split of {cfg.manifest}")
        row = part[part["id"] == cfg.image_id].iloc[0]
    else:
        positives = (part[list(cxr_data.LABEL_COLUMNS[1:])] == 1).sum(axis=1)
        row = part.iloc[int(positives.to_numpy().argmax())]
    return root / row["image"], str(row["id"]), str(row["prompt"]), str(row["report"])
