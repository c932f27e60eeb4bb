"""The verbs the cxr_report notebooks call: preprocess, train, generate reports (with metrics and baselines),
attention maps.

Training follows the seed in two stages: (1) the vision model (DenseNet + disease attention + auxiliary
14-label classifier) is trained on the labels; (2) with the vision model frozen (the seed runs it in eval mode
inside its Dataset), its 14 disease tokens are computed once and the projection + LoRA adapters of the 4-bit LM
learn to write the report. Both stages run on the shared trainer (``nbsupport.train``), checkpoints in
``<run>/vision`` and ``<run>/report``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import safetensors.torch
import torch

from nbsupport.config import StageConfig, param
from nbsupport.cxr_report import data as cxr_data
from nbsupport.cxr_report.labeler import LABELS, label_report, label_reports, positive_matrix
from nbsupport.cxr_report.model import (
    LLAMA2_7B_CONFIG,
    LORA_TARGETS,
    REPORTING_ORDER,
    CxrModelSpec,
    ReportGenerator,
    VisionModel,
    count_trainable_parameters,
    encode_example,
    keep_4bit_weights_trainable,
    lm_prompts,
    load_language_model,
    pad_examples,
    prompt_token_ids,
)
from nbsupport.device import resolve_device
from nbsupport.manifest import read_manifest, write_manifest
from nbsupport.metrics import bleu_scores, cider_d, clinical_efficacy, rouge_l
from nbsupport.paths import demo_data_root, resolve_path
from nbsupport.progress import progress
from nbsupport.runs import RunFolder, atomic_write_text, runs_root
from nbsupport.checkpoints import load_weights
from nbsupport.launch import launch
from nbsupport.train import TrainSettings

SYSTEM = "cxr_report"
DEFAULT_MANIFEST = "data_manifests/chexpert_plus_demo.csv"
REAL_CXR_DICOM = "RG1_UNCR.dcm"  # the one real chest radiograph pydicom-data ships
REAL_CXR_TITLE = "real PA chest radiograph (pydicom-data RG1_UNCR)"


def _demo_root() -> str:
    return str(demo_data_root() / SYSTEM)


# ============================================================================================ configs
@dataclasses.dataclass(frozen=True)
class PreprocessConfig(StageConfig):
    """01_preprocess: read CheXpert Plus (or the seed CSV), resize to RGB, write the manifest."""

    SYSTEM = SYSTEM
    STAGE = "01_preprocess"
    PROFILES = {"smoke": {"image_size": 64}, "demo": {"image_size": 128}, "full": {"image_size": 224}}

    data_root: str = param("", "dataset root (CheXpert Plus CSV + chexbert_labels, or the seed CSV); '' = demo data")
    manifest: str = param(DEFAULT_MANIFEST, "where to write the manifest (CSV, paths relative to data_root)")
    report_section: Literal["findings", "impression", "findings+impression"] = param(
        "findings", "CheXpert Plus section(s) that form the target report")
    prompt: str = param(cxr_data.DEFAULT_PROMPT, "diagnostic prompt put before every report")
    image_size: int = param(224, "side of the resized RGB images (pixels); 224 gives DenseNet-121 its 7x7 patches")
    frontal_only: bool = param(True, "keep frontal views only (the synthetic and the seed data are frontal)")
    val_fraction: float = param(0.1, "fraction of (non-valid) patients held out for checkpoint selection")
    test_fraction: float = param(0.2, "fraction of patients held out for test when the data ship no valid split")
    n_examples: int = param(6, "images shown with their reports")

    def __post_init__(self) -> None:
        if self.image_size % 32 or self.image_size < 32:
            raise ValueError(f"image_size must be a multiple of 32 (DenseNet stride), got {self.image_size}")
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise ValueError("val_fraction and test_fraction must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class _ManifestStage(StageConfig):
    SYSTEM = SYSTEM

    data_root: str = param("", "dataset root; '' = the root recorded in the manifest")
    manifest: str = param(DEFAULT_MANIFEST, "manifest written by 01_preprocess")


@dataclasses.dataclass(frozen=True)
class TrainConfig(_ManifestStage):
    """02_train: the vision model on the 14 labels, then the QLoRA report generator on its disease tokens."""

    STAGE = "02_train"
    PROFILES = {
        "smoke": {"encoder": "densenet_tiny", "image_size": 64, "language_model": "tiny", "vision_epochs": 2,
                  "vision_batch_size": 8, "vision_lr": 3e-3, "epochs": 1, "batch_size": 4, "max_steps": 4,
                  "max_report_tokens": 24, "optimizer": "adamw", "findings_prompt": True},
        # the demo dataset (~420 training images) in under 10 minutes on 2 cores: vision ~50 s, report stage 160
        # steps of batch 4 at ~2 s (benchmarks/RESULTS.md). Our additions, off in `full`: the findings in the
        # prompt (the classifier's; each training report's own labels in training), a 5x faster rate for the
        # visual projection than for LoRA.
        "demo": {"encoder": "densenet_small", "image_size": 128, "language_model": "smollm2-135m",
                 "vision_epochs": 12, "vision_batch_size": 16, "vision_lr": 3e-3, "epochs": 3, "batch_size": 4,
                 "max_steps": 160, "lr": 2e-3, "projection_lr": 1e-2, "max_report_tokens": 56, "optimizer": "adamw",
                 "findings_prompt": True},
        "full": {"encoder": "densenet121", "image_size": 224, "language_model": "meta-llama/Llama-2-7b-hf",
                 "vision_epochs": 50, "epochs": 20, "batch_size": 1, "optimizer": "paged_adamw", "num_workers": 4},
    }

    encoder: Literal["densenet121", "densenet_small", "densenet_tiny"] = param(
        "densenet121", "image encoder: the seed's DenseNet-121, or smaller DenseNets for CPU profiles")
    encoder_weights: str = param("", "local safetensors state_dict of the encoder's features (e.g. ImageNet); '' = "
                                     "random init (no ImageNet weights ship offline)")
    image_size: int = param(224, "model input side (pixels); patches = (image_size / 32)^2")
    language_model: str = param("meta-llama/Llama-2-7b-hf", "causal LM: local folder, hub id in the local cache, "
                                "'smollm2-135m' (packaged) or 'tiny' (random-init Llama, smoke)")
    quantization: Literal["nf4", "none"] = param("nf4", "nf4: 4-bit NormalFloat base weights (QLoRA); none: full")
    lora_r: int = param(8, "LoRA rank (seed lora_r)")
    lora_alpha: int = param(8, "LoRA scaling alpha (seed lora_alpha)")
    lora_dropout: float = param(0.1, "LoRA dropout (seed lora_dropout)")
    lora_targets: tuple[str, ...] = param(LORA_TARGETS, "modules of every decoder layer that get LoRA adapters (seed: "
                                          "q/k/v/o; QLoRA's paper adapts all linear layers)")
    vision_epochs: int = param(50, "epochs of the vision model on the 14 labels (seed: dense_net_121_d_e50)")
    vision_batch_size: int = param(16, "batch size of the vision stage")
    vision_lr: float = param(1e-3, "learning rate of the vision stage (AdamW, warm-up + cosine)")
    epochs: int = param(20, "epochs of the report stage (seed num_train_epochs)")
    max_steps: int | None = param(None, "stop the report stage after this many optimizer steps (None: epochs)")
    batch_size: int = param(1, "report-stage batch size (seed per_device_train_batch_size)")
    lr: float = param(5e-4, "report-stage learning rate, constant (seed)")
    projection_lr: float | None = param(None, "learning rate of the visual projection (it feeds the frozen LM's "
                                        "input, like prompt tuning); None: lr (seed)")
    weight_decay: float = param(0.001, "report-stage weight decay (seed)")
    grad_clip: float | None = param(0.3, "report-stage max gradient norm (seed max_grad_norm)")
    optimizer: Literal["adamw", "paged_adamw"] = param("paged_adamw", "paged_adamw (seed; CUDA) or adamw")
    max_report_tokens: int = param(256, "report tokens kept for training (longer reports are cut)")
    findings_prompt: bool = param(False, "our addition (PromptMRG-style): append the auxiliary classifier's positive "
                                  "labels to the diagnostic prompt; False = the seed's prompt alone")
    findings_threshold: float = param(0.5, "classifier probability from which a label is named in the prompt")
    num_processes: int = param(1, "processes for data-parallel training (accelerate launch)")
    num_workers: int = param(0, "data-loader worker processes (vision stage)")


@dataclasses.dataclass(frozen=True)
class _TrainedStage(_ManifestStage):
    checkpoint: str = param("", "training run folder (holding model_spec.json); '' = run_dir, else the newest run")
    split: Literal["train", "val", "test"] = param("test", "manifest split to use")


@dataclasses.dataclass(frozen=True)
class InferConfig(_TrainedStage):
    """03_infer: beam-search reports for a split (scored against the references and two baselines), an image
    file or DICOM, and the real radiograph shipped by pydicom-data."""

    STAGE = "03_infer"
    # demo: 40 test images keep 5-beam generation with SmolLM2 on 2 CPU cores within a few minutes; 64 new tokens
    # cover the longest demo reports (p99 54 SmolLM2 tokens). No n-gram blocking: 57 % of the demo references
    # repeat a bigram ("is present", ". There"), which no_repeat_ngram_size=2 forbids (benchmarks/RESULTS.md);
    # the seed's 2 stays the default and `full`.
    PROFILES = {"smoke": {"max_new_tokens": 12, "max_reports": 8, "beam_choice": "findings"},
                "demo": {"max_new_tokens": 64, "max_reports": 40, "no_repeat_ngram_size": 0,
                         "beam_choice": "findings"},
                "full": {"max_new_tokens": 512}}

    input_image: str = param("", "an image file or DICOM to write a report for, besides the split")
    real_dicom: bool = param(True, "also report on the real chest radiograph RG1_UNCR.dcm from pydicom-data")
    num_beams: int = param(5, "beam width (seed)")
    no_repeat_ngram_size: int = param(2, "no n-gram of this size is generated twice (seed: 2; 0: off)")
    max_new_tokens: int = param(512, "longest generated report in tokens (seed max_length 512)")
    beam_choice: Literal["score", "findings"] = param(
        "score", "report kept from the finished beams: the best beam score (seed), or the first whose labeled "
        "findings differ least from the classifier's (a findings-prompt model)")
    batch_size: int = param(8, "images per generate call")
    max_reports: int = param(0, "score only the first N images of the split (0: all)")
    n_examples: int = param(4, "images shown with generated and reference reports")


@dataclasses.dataclass(frozen=True)
class AttentionConfig(_TrainedStage):
    """04_attention: the 14 disease attention maps on an X-ray beside the generated sentences, and the LM's
    token-level attention over the visual and text tokens."""

    STAGE = "04_attention"
    PROFILES = {"smoke": {"max_new_tokens": 8, "beam_choice": "findings"},
                "demo": {"max_new_tokens": 64, "no_repeat_ngram_size": 0, "beam_choice": "findings"},
                "full": {"max_new_tokens": 256}}

    image_id: str = param("", "manifest id of the image; '' = the split's image with most positive labels")
    input_image: str = param("", "an image file or DICOM to use instead of a manifest image")
    num_beams: int = param(5, "beam width for the report shown")
    no_repeat_ngram_size: int = param(2, "no n-gram of this size is generated twice (0: off)")
    max_new_tokens: int = param(256, "longest generated report in tokens")
    beam_choice: Literal["score", "findings"] = param(
        "score", "report kept from the finished beams: the best beam score (seed), or the first whose labeled "
        "findings differ least from the classifier's (a findings-prompt model)")
    layer: int = param(-1, "LM layer whose attention is drawn (-1: last)")


# ============================================================================================ 01 preprocess
@dataclasses.dataclass
class PreprocessResult:
    manifest: pd.DataFrame
    manifest_path: Path
    summary: pd.DataFrame
    figure: Any


def preprocess(cfg: PreprocessConfig, run: RunFolder) -> PreprocessResult:
    """Read the dataset, write the resized RGB images and the manifest, summarise and draw samples."""
    root = resolve_path(cfg.data_root or _demo_root())
    manifest = cxr_data.build_manifest(root, cfg.report_section, cfg.prompt, cfg.val_fraction, cfg.test_fraction,
                                       cfg.seed, cfg.frontal_only)
    manifest = cxr_data.write_resized_images(manifest, root, cfg.image_size, f"preprocessed_{cfg.image_size}")
    manifest_path = resolve_path(cfg.manifest)
    write_manifest(manifest, manifest_path, cxr_data.CXR_SCHEMA, root)
    manifest, _ = read_manifest(manifest_path, cxr_data.CXR_SCHEMA, data_root=root, check_files=False)
    summary = summarise_manifest(manifest)
    atomic_write_text(run.file("manifest_summary.csv"), summary.to_csv())
    run.write_metrics(cfg.STAGE, {"images": len(manifest), "patients": int(manifest["patient"].nunique()),
                                  "image_size": cfg.image_size, **{f"{s}_images": int((manifest.split == s).sum())
                                                                   for s in ("train", "val", "test")}})
    sample = manifest.sample(n=min(cfg.n_examples, len(manifest)), random_state=cfg.seed)
    fig = report_figure([cxr_data.read_xray(root / r.image) for r in sample.itertuples()],
                        [{"report": r.report} for r in sample.itertuples()], list(sample["id"]),
                        "CheXpert Plus layout: resized inputs and their reports")
    run.save_figure(fig, "01_sample_images")
    return PreprocessResult(manifest, manifest_path, summary, fig)


def summarise_manifest(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per split: images, patients and the fraction of images positive for each label."""
    rows = {}
    for split in ("train", "val", "test"):
        part = manifest[manifest.split == split]
        row: dict[str, Any] = {"images": len(part), "patients": part["patient"].nunique()}
        for column, name in zip(cxr_data.LABEL_COLUMNS, LABELS):
            row[name] = round(float((part[column] == 1).mean()), 3) if len(part) else 0.0
        rows[split] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def report_figure(images: list[np.ndarray], texts: list[dict[str, str]], titles: list[str], suptitle: str = "",
                  ncols: int = 3) -> Any:
    """Images with report texts under them (each ``texts`` entry: {caption: text})."""
    import textwrap

    import matplotlib.pyplot as plt

    n = max(1, len(images))
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 6.2 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, text, title in zip(axes.flat, images, texts, titles):
        ax.imshow(image, cmap="gray")
        ax.set_title(title, fontsize=8)
        caption = "\n".join(f"{k}: " + textwrap.fill(v, 52) for k, v in text.items())
        ax.text(0, -0.03, caption, transform=ax.transAxes, va="top", ha="left", fontsize=7, wrap=True)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


# ============================================================================================ 02 train
def load_manifest(cfg: Any) -> tuple[pd.DataFrame, Path]:
    """The validated manifest named by ``cfg.manifest`` and its data root."""
    return read_manifest(resolve_path(cfg.manifest), cxr_data.CXR_SCHEMA,
                         data_root=resolve_path(cfg.data_root) if cfg.data_root else None)


def _masked_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)


def label_aurocs(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUROC per label with both classes present, (N, 14) scores and 0/1 labels -> {label: auroc}.

    The Mann-Whitney form: the probability that a random positive scores above a random negative (ties 1/2).
    """
    from scipy.stats import rankdata

    out = {}
    for j, name in enumerate(LABELS):
        positive = labels[:, j] == 1
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if n_pos and n_neg:
            ranks = rankdata(scores[:, j])
            out[name] = float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return out


class _CachedImages(cxr_data.ReportImageDataset):
    """The resized images are small: decode each once."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._cache: dict[int, torch.Tensor] = {}

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index not in self._cache:
            self._cache[index] = super().__getitem__(index)["image"]
        return {"image": self._cache[index], "labels": self.labels[index], "label_mask": self.label_mask[index],
                "index": index}


class VisionTrainingTask:
    """Stage 1 for the shared trainer: DenseNet + disease attention + auxiliary classifier on the 14 labels."""

    def __init__(self, config: dict[str, Any], manifest: str, data_root: str, spec_json: str):
        self.cfg = TrainConfig.from_params(config)
        self.manifest, self.root = read_manifest(Path(manifest), cxr_data.CXR_SCHEMA, data_root=Path(data_root),
                                                 check_files=False)
        self.spec = CxrModelSpec.from_json(spec_json)

    def build_model(self) -> VisionModel:
        torch.manual_seed(self.cfg.seed)
        model = VisionModel(self.spec)
        if self.cfg.encoder_weights:
            state = safetensors.torch.load_file(str(resolve_path(self.cfg.encoder_weights)))
            model.features.load_state_dict(state, strict=True)
        return model

    def _split(self, split: str) -> _CachedImages | None:
        part = self.manifest[self.manifest.split == split]
        return _CachedImages(part, self.root, self.spec.image_size) if len(part) else None

    def train_dataset(self) -> _CachedImages:
        return self._split("train")

    def val_dataset(self) -> _CachedImages | None:
        return self._split("val")

    def training_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        _, logits, _ = model(batch["image"])
        return _masked_bce(logits, batch["labels"], batch["label_mask"])

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """Validation loss and the mean AUROC of the auxiliary classifier over labels with both classes."""
        losses, scores, labels = [], [], []
        for batch in loader:
            _, logits, _ = model(batch["image"].to(device))
            losses.append(float(_masked_bce(logits, batch["labels"].to(device), batch["label_mask"].to(device))))
            scores.append(logits.sigmoid().cpu().numpy())
            labels.append(batch["labels"].numpy())
        aurocs = label_aurocs(np.concatenate(scores), np.concatenate(labels))
        return {"loss": float(np.mean(losses)), "auroc": float(np.mean(list(aurocs.values()))) if aurocs else 0.5}


def vision_task(config: dict[str, Any], manifest: str, data_root: str, spec_json: str) -> VisionTrainingTask:
    """Factory named in ``launch``."""
    return VisionTrainingTask(config, manifest, data_root, spec_json)


def prompt_findings(manifest: pd.DataFrame, probabilities: torch.Tensor) -> torch.Tensor:
    """(N, 14) label scores a findings prompt names for the manifest's rows in training: the report's own
    positive labels (1/0) in the train split, the classifier's ``probabilities`` elsewhere.

    Teacher forcing of the diagnosis: the LM learns to state exactly what its prompt names, which the classifier's
    imperfect calls on training images would blur; validation reads the classifier's calls, as inference does
    (val micro-F1 0.902 against 0.845: benchmarks/RESULTS.md, "Fourth pass").
    """
    train = torch.tensor((manifest.split == "train").to_numpy())
    own_labels = torch.tensor(cxr_data.label_matrix(manifest) == 1, dtype=probabilities.dtype)
    return torch.where(train[:, None], own_labels, probabilities)


class ReportTrainingTask:
    """Stage 2 for the shared trainer: projection + LoRA adapters of the (4-bit) LM on cached disease tokens."""

    def __init__(self, config: dict[str, Any], manifest: str, data_root: str, spec_json: str, tokens_file: str):
        self.cfg = TrainConfig.from_params(config)
        self.manifest, _ = read_manifest(Path(manifest), cxr_data.CXR_SCHEMA, data_root=Path(data_root),
                                         check_files=False)
        self.spec = CxrModelSpec.from_json(spec_json)
        stored = safetensors.torch.load_file(tokens_file)
        self.tokens = stored["disease_tokens"]  # (N, 14, C), manifest order
        self.prompts = lm_prompts(self.spec, list(self.manifest["prompt"]),
                                  prompt_findings(self.manifest, stored["probabilities"]))
        self.tokenizer = None

    def build_model(self) -> ReportGenerator:
        lm, tokenizer = load_language_model(self.spec)
        keep_4bit_weights_trainable(lm)  # validation between epochs must not repack the weights it trains through
        self.tokenizer = tokenizer
        torch.manual_seed(self.cfg.seed)
        return ReportGenerator(self.spec, lm, tokenizer)

    def _examples(self, split: str) -> list[dict[str, Any]] | None:
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            from nbsupport.models import resolve_pretrained

            self.tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(self.spec.language_model),
                                                           local_files_only=True)
        rows = np.flatnonzero((self.manifest.split == split).to_numpy())
        out = []
        for i in rows:
            example = encode_example(self.tokenizer, self.prompts[i], self.manifest.at[i, "report"],
                                     self.cfg.max_report_tokens)
            out.append({"disease_tokens": self.tokens[i], **example})
        return out or None

    def train_dataset(self) -> list[dict[str, Any]]:
        return self._examples("train")

    def val_dataset(self) -> list[dict[str, Any]] | None:
        return self._examples("val")

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad token ids (pad id) and labels (-100)."""
        ids, mask, labels = pad_examples(items, self.tokenizer.pad_token_id if self.tokenizer is not None else 0)
        return {"disease_tokens": torch.stack([x["disease_tokens"] for x in items]), "input_ids": ids,
                "attention_mask": mask, "labels": labels}

    def trainable_parameters(self, model: ReportGenerator) -> list[dict[str, Any]]:
        return report_parameter_groups(model, self.cfg.lr, self.cfg.projection_lr, self.cfg.weight_decay)

    def training_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """Token-weighted validation loss of the report tokens."""
        total, count = 0.0, 0
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
        return {"loss": total / max(count, 1)}


def report_parameter_groups(model: ReportGenerator, lr: float, projection_lr: float | None,
                            weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups of the report stage: the LoRA adapters at ``lr``, the visual projection at ``projection_lr``
    (None: ``lr``, the seed's single rate); weight decay on matrices only, as the shared trainer's default."""
    input_side = {id(p) for p in model.projection.parameters()}
    groups = []
    for group_lr, on_input_side in ((lr, False), (projection_lr or lr, True)):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in input_side) == on_input_side]
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": group_lr, "weight_decay": weight_decay if decay else 0.0})
    return groups


def report_task(config: dict[str, Any], manifest: str, data_root: str, spec_json: str,
                tokens_file: str) -> ReportTrainingTask:
    """Factory named in ``launch``."""
    return ReportTrainingTask(config, manifest, data_root, spec_json, tokens_file)


@dataclasses.dataclass
class TrainOutcome:
    spec: CxrModelSpec
    vision_history: list[dict[str, Any]]
    report_history: list[dict[str, Any]]
    metrics: dict[str, Any]
    label_auroc: pd.DataFrame  # auxiliary classifier on the test split, per label
    vision_curves: Any
    report_curves: Any
    parameters: pd.DataFrame  # trainable parameters, this run and the full configuration (meta device)


def model_spec(cfg: TrainConfig, run: RunFolder) -> CxrModelSpec:
    """The model this config describes; ``language_model='tiny'`` writes a random-init Llama into the run folder
    (so the smoke profile loads it through the same 4-bit ``from_pretrained`` path as a real LM)."""
    language_model = cfg.language_model
    if language_model == "tiny":
        from nbsupport.models import tiny_causal_lm

        folder = run.file("tiny_lm/config.json").parent
        lm, tokenizer = tiny_causal_lm(seed=cfg.seed)
        lm.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        language_model = str(folder)
    return CxrModelSpec(encoder=cfg.encoder, image_size=cfg.image_size, language_model=language_model,
                        quantization=cfg.quantization, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                        lora_dropout=cfg.lora_dropout, lora_targets=tuple(cfg.lora_targets),
                        findings_prompt=cfg.findings_prompt, findings_threshold=cfg.findings_threshold)


@torch.no_grad()
def disease_tokens(vision: VisionModel, manifest: pd.DataFrame, root: Path, device: torch.device,
                   batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 14, C) disease tokens and (N, 14) classifier probabilities of the manifest's rows, in order."""
    dataset = cxr_data.ReportImageDataset(manifest, root, vision.spec.image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    vision.eval().to(device)
    tokens, probs = [], []
    for batch in progress(loader, desc="disease tokens"):
        t, logits, _ = vision(batch["image"].to(device))
        tokens.append(t.float().cpu())
        probs.append(logits.sigmoid().float().cpu())
    return torch.cat(tokens), torch.cat(probs)


def train(cfg: TrainConfig, run: RunFolder) -> TrainOutcome:
    """Stage 1 (vision, best val AUROC) then stage 2 (report generator, best val loss); returns curves, the
    auxiliary classifier's test AUROC per label and the trainable-parameter counts."""
    from nbsupport.viz import plot_training_curves

    manifest, root = load_manifest(cfg)
    spec = model_spec(cfg, run)
    atomic_write_text(run.file("model_spec.json"), spec.to_json())
    common = {"config": cfg.to_dict(), "manifest": str(resolve_path(cfg.manifest)), "data_root": str(root),
              "spec_json": spec.to_json()}
    vision_settings = TrainSettings(
        epochs=cfg.vision_epochs, batch_size=cfg.vision_batch_size, lr=cfg.vision_lr, weight_decay=1e-4,
        scheduler="warmup_cosine", warmup_steps=max(1, int((manifest.split == "train").sum()) // cfg.vision_batch_size),
        monitor="val_auroc", monitor_mode="max", num_processes=cfg.num_processes, num_workers=cfg.num_workers,
        seed=cfg.seed, log_every=5)
    print(f"stage 1: {spec.encoder} + disease attention + 14-label classifier, {spec.num_patches} patches")
    vision_result = launch("nbsupport.cxr_report.pipeline:vision_task", common, vision_settings,
                           run.path / "vision", config_hash=spec.fingerprint("vision"))
    vision = VisionModel(spec)
    load_weights(vision, Path(vision_result.best_checkpoint or vision_result.last_checkpoint),
                 expected_config_hash=spec.fingerprint("vision"))
    device = resolve_device(cfg.device)
    tokens, probs = disease_tokens(vision, manifest, root, device)
    tokens_file = run.file("disease_tokens.safetensors")
    safetensors.torch.save_file({"disease_tokens": tokens.contiguous(), "probabilities": probs.contiguous()},
                                str(tokens_file))

    report_settings = TrainSettings(
        epochs=cfg.epochs, max_steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr,
        weight_decay=cfg.weight_decay, optimizer=cfg.optimizer, scheduler="constant", grad_clip=cfg.grad_clip,
        monitor="val_loss" if (manifest.split == "val").any() else "train_loss", save_trainable_only=True,
        num_processes=cfg.num_processes, seed=cfg.seed, log_every=5,
        eval_every=max(1, cfg.epochs // 4))
    print(f"stage 2: {spec.language_model} ({spec.quantization}) + LoRA r={spec.lora_r} on the disease tokens")
    report_result = launch("nbsupport.cxr_report.pipeline:report_task", {**common, "tokens_file": str(tokens_file)},
                           report_settings, run.path / "report", config_hash=spec.fingerprint("report"))

    test_split = "test" if (manifest.split == "test").any() else "val"
    rows = (manifest.split == test_split).to_numpy()
    labels = (np.nan_to_num(cxr_data.label_matrix(manifest[rows]), nan=0.0) == 1).astype(int)
    aurocs = label_aurocs(probs[rows].numpy(), labels)
    trainable_now = _trainable_counts(spec)
    full = count_trainable_parameters(LLAMA2_7B_CONFIG, model_spec(TrainConfig.from_params({"profile": "full"}), run))
    parameters = pd.DataFrame({"this run": trainable_now, "full (Llama-2-7b, meta device)": full}).T
    metrics = {"vision_best_val_auroc": vision_result.best_metric, "vision_steps": vision_result.steps,
               f"{test_split}_aux_auroc_mean": float(np.mean(list(aurocs.values()))) if aurocs else None,
               "report_best_val_loss": report_result.best_metric, "report_steps": report_result.steps,
               "trainable_parameters": trainable_now["trainable"],
               "full_trainable_parameters_llama2_7b": full["trainable"], "language_model": cfg.language_model,
               "quantization": cfg.quantization}
    run.write_metrics(cfg.STAGE, metrics)
    vision_curves = plot_training_curves(vision_result.history, title="stage 1: vision model on the 14 labels")
    report_curves = plot_training_curves(report_result.history, title="stage 2: report generator (LM loss)")
    run.save_figure(vision_curves, "02_vision_curves")
    run.save_figure(report_curves, "02_report_curves")
    table = pd.DataFrame({"auroc": aurocs}).rename_axis("label")
    return TrainOutcome(spec, vision_result.history, report_result.history, metrics, table, vision_curves,
                        report_curves, parameters)


def _trainable_counts(spec: CxrModelSpec) -> dict[str, int]:
    """Trainable parameters of this run's report generator (from its LM config, on the meta device)."""
    from transformers import AutoConfig

    from nbsupport.models import resolve_pretrained

    config = AutoConfig.from_pretrained(resolve_pretrained(spec.language_model), local_files_only=True)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings")
    return count_trainable_parameters({k: getattr(config, k) for k in keys}, spec)


# ============================================================================================ trained model
def find_training_run(checkpoint: str, run: RunFolder) -> Path:
    """The training run folder: ``checkpoint`` if given, else this run, else the newest cxr_report run."""
    if checkpoint:
        path = resolve_path(checkpoint)
        if not (path / "model_spec.json").is_file():
            raise FileNotFoundError(f"{path} is not a cxr_report training run (no model_spec.json)")
        return path
    if (run.path / "report" / "checkpoints").is_dir():
        return run.path
    candidates = sorted(runs_root().glob(f"*/{SYSTEM}/report/checkpoints/*/meta.json"),
                        key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"no trained {SYSTEM} model in {run.path} or under {runs_root()}; run 02_train "
                                "first or set the `checkpoint` parameter")
    found = candidates[-1].parents[3]
    print(f"using the newest training run: {found}")
    return found


def _best(stage_dir: Path) -> Path:
    best = stage_dir / "checkpoints" / "best"
    return best if (best / "meta.json").is_file() else stage_dir / "checkpoints" / "last"


@dataclasses.dataclass
class TrainedModel:
    spec: CxrModelSpec
    vision: VisionModel
    generator: ReportGenerator
    tokenizer: Any


def load_trained_model(training_run: Path, device: torch.device) -> TrainedModel:
    """Rebuild both stages from ``model_spec.json`` and load their best checkpoints."""
    spec = CxrModelSpec.from_json((training_run / "model_spec.json").read_text())
    vision = VisionModel(spec)
    load_weights(vision, _best(training_run / "vision"), expected_config_hash=spec.fingerprint("vision"))
    lm, tokenizer = load_language_model(spec)
    generator = ReportGenerator(spec, lm, tokenizer)
    load_weights(generator, _best(training_run / "report"), expected_config_hash=spec.fingerprint("report"))
    return TrainedModel(spec, vision.eval().to(device), generator.eval(), tokenizer)


def generate_reports(model: TrainedModel, tokens: torch.Tensor, prompts: list[str], num_beams: int,
                     no_repeat_ngram_size: int, max_new_tokens: int, batch_size: int,
                     probabilities: torch.Tensor | None = None) -> list[list[str]]:
    """Beam search for (N, 14, C) disease tokens, ``batch_size`` images per generate call: per image its
    ``num_beams`` finished beams, best beam score first. With a ``findings_prompt`` model the (N, 14) classifier
    ``probabilities`` complete the prompts."""
    if model.spec.findings_prompt:
        if probabilities is None:
            raise ValueError("this model reads the classifier's findings in its prompt: pass probabilities")
        prompts = lm_prompts(model.spec, prompts, probabilities)
    out: list[list[str]] = []
    for start in progress(range(0, len(prompts), batch_size), desc="generate reports"):
        chunk = slice(start, start + batch_size)
        ids = [prompt_token_ids(model.tokenizer, p) for p in prompts[chunk]]
        beams = model.generator.generate(tokens[chunk], ids, num_beams, no_repeat_ngram_size, max_new_tokens,
                                         num_return_sequences=num_beams)
        out.extend(beams[k:k + num_beams] for k in range(0, len(beams), num_beams))
    return out


def choose_reports(beams: list[list[str]], beam_choice: str, probabilities: torch.Tensor | None = None,
                   threshold: float = 0.5) -> list[str]:
    """One report per image from its beams (best beam score first): ``score`` keeps the first; ``findings`` the
    first whose rule-labeled positive findings differ in the fewest labels from the classifier's decisions
    (``probabilities >= threshold``) on the labels a findings prompt can name (``REPORTING_ORDER``), i.e. the beam
    that best states what the prompt named."""
    if beam_choice == "score":
        return [b[0] for b in beams]
    if beam_choice != "findings":
        raise ValueError(f"beam_choice must be 'score' or 'findings', got {beam_choice!r}")
    if probabilities is None:
        raise ValueError("beam_choice='findings' needs the classifier's probabilities")
    named = [LABELS.index(label) for label in REPORTING_ORDER]
    decided = (probabilities.numpy() >= threshold)[:, named]
    chosen = []
    for candidates, wanted in zip(beams, decided):
        stated = positive_matrix(label_reports(candidates))[:, named].astype(bool)
        chosen.append(candidates[int(np.argmin((stated != wanted).sum(axis=1)))])
    return chosen


def score_reports(generated: list[str], references: list[str]) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L, CIDEr-D and clinical efficacy (rule labeler on both sides, positives only)."""
    scores: dict[str, float] = {**bleu_scores(generated, references), "rouge_l": rouge_l(generated, references),
                                "cider_d": cider_d(generated, references)}
    ce = clinical_efficacy(positive_matrix(label_reports(generated)), positive_matrix(label_reports(references)),
                           LABELS)
    scores.update({f"ce_{k}": v for k, v in ce.items() if k != "per_label"})
    return scores


def baseline_reports(train_tokens: torch.Tensor, train_reports: list[str], query_tokens: torch.Tensor
                     ) -> dict[str, list[str]]:
    """Two baselines per query image: the training report of the nearest training image (cosine similarity of
    the flattened disease tokens of the trained vision model) and the most common training report."""
    a = torch.nn.functional.normalize(train_tokens.flatten(1).float(), dim=1)
    b = torch.nn.functional.normalize(query_tokens.flatten(1).float(), dim=1)
    nearest = (b @ a.T).argmax(dim=1).tolist()
    common = pd.Series(train_reports).value_counts().index[0]
    return {"nearest-neighbour report": [train_reports[i] for i in nearest],
            "most common report": [common] * len(query_tokens)}


@dataclasses.dataclass
class InferResult:
    predictions: pd.DataFrame
    scores: pd.DataFrame  # model vs baselines
    per_label: pd.DataFrame
    figure: Any
    real_dicom: dict[str, Any] | None  # {"image", "report", "figure"}
    input_image: dict[str, Any] | None


def _single_image_report(model: TrainedModel, path: Path, title: str, cfg: Any) -> dict[str, Any]:
    """Report and per-disease evidence for one image file or DICOM (never shows DICOM identifiers)."""
    gray = cxr_data.read_xray(path)
    x = cxr_data.load_encoder_input(path, model.spec.image_size)[None]
    device = next(model.vision.parameters()).device
    with torch.no_grad():
        tokens, logits, _ = model.vision(x.to(device))
    probabilities = logits.sigmoid().cpu()
    beams = generate_reports(model, tokens.cpu(), [cxr_data.DEFAULT_PROMPT], cfg.num_beams,
                             cfg.no_repeat_ngram_size, cfg.max_new_tokens, 1, probabilities)
    report = choose_reports(beams, cfg.beam_choice, probabilities, model.spec.findings_threshold)[0]
    fig = disease_maps_figure(model, gray, x, report, title)
    return {"image": gray, "report": report, "probabilities": dict(zip(LABELS, probabilities[0].tolist())),
            "figure": fig}


def predict(cfg: InferConfig, run: RunFolder) -> InferResult:
    """Reports for a split with BLEU/ROUGE-L/CIDEr-D/clinical efficacy beside the two baselines, written to
    ``predictions.csv`` and ``metrics.json``; plus ``input_image`` and the real pydicom-data radiograph."""
    device = resolve_device(cfg.device)
    model = load_trained_model(find_training_run(cfg.checkpoint, run), device)
    manifest, root = load_manifest(cfg)
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
    table = pd.DataFrame({name: score_reports(reports, references) for name, reports in systems.items()}).T
    ce = clinical_efficacy(positive_matrix(label_reports(generated)), positive_matrix(label_reports(references)),
                           LABELS)
    per_label = pd.DataFrame(ce["per_label"]).T.rename_axis("label")
    predictions = pd.DataFrame({"id": part["id"], "reference": references, "generated": generated,
                                "nearest_neighbour": systems["nearest-neighbour report"]})
    atomic_write_text(run.file("predictions.csv"), predictions.to_csv(index=False))
    metrics: dict[str, Any] = {"n_reports": len(part), "split": cfg.split}
    for name, key in (("model (this run)", "model"), ("model, best-scoring beam", "model_top_beam"),
                      ("nearest-neighbour report", "baseline_nn"), ("most common report", "baseline_common")):
        if name in table.index:
            metrics.update({f"{key}_{k}": float(v) for k, v in table.loc[name].items()})
    run.write_metrics(cfg.STAGE, metrics)
    n = min(cfg.n_examples, len(part))
    fig = report_figure([cxr_data.read_xray(root / r.image) for r in part.head(n).itertuples()],
                        [{"generated": g, "reference": r} for g, r in zip(generated[:n], references[:n])],
                        list(part["id"][:n]), f"{cfg.split} split: generated vs reference", ncols=2)
    run.save_figure(fig, "03_generated_reports")
    real = None
    if cfg.real_dicom:
        real = _single_image_report(model, real_cxr_path(), REAL_CXR_TITLE, cfg)
        run.save_figure(real["figure"], "03_real_dicom")
        run.write_metrics(cfg.STAGE, {"real_dicom_report": real["report"]})
    single = None
    if cfg.input_image:
        path = resolve_path(cfg.input_image)
        single = _single_image_report(model, path, path.name, cfg)
        run.save_figure(single["figure"], "03_input_image")
    return InferResult(predictions, table, per_label, fig, real, single)


def real_cxr_path() -> Path:
    """RG1_UNCR.dcm from pydicom-data (found offline through pydicom's external data sources)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(REAL_CXR_DICOM)
    if path is None:
        raise FileNotFoundError(f"{REAL_CXR_DICOM} not found: `pip install pydicom-data` ships it")
    return Path(path)


# ============================================================================================ attention figures
def finding_sentences(report: str) -> dict[str, str]:
    """Label -> the first sentence of ``report`` that mentions it (positive, negative or uncertain)."""
    import re

    out: dict[str, str] = {}
    for sentence in re.split(r"(?<=[.!?])\s+", report.strip()):
        for label, value in label_report(sentence).items():
            if value is not None and label not in out and (label != "No Finding" or len(out) == 0):
                out[label] = sentence
    return out


def disease_maps_figure(model: TrainedModel, gray: np.ndarray, x: torch.Tensor, report: str, title: str) -> Any:
    """14 panels: each disease's image-specific evidence map (``VisionModel.patch_evidence``) upsampled over the
    X-ray, titled with the classifier probability and the generated sentence naming that finding."""
    import textwrap

    import matplotlib.pyplot as plt

    from nbsupport.viz import attention_overlay

    device = next(model.vision.parameters()).device
    with torch.no_grad():
        evidence = model.vision.patch_evidence(x.to(device))[0].cpu().numpy()  # (14, P)
        probs = model.vision(x.to(device))[1].sigmoid()[0].cpu().numpy()
    side = int(round(evidence.shape[1] ** 0.5))
    sentences = finding_sentences(report)
    fig, axes = plt.subplots(3, 5, figsize=(17, 11))
    axes = axes.flat
    axes[0].imshow(gray, cmap="gray")
    axes[0].set_title(textwrap.fill(title, 40), fontsize=8)
    axes[0].axis("off")
    for k, label in enumerate(LABELS):
        ax = axes[k + 1]
        heat = np.clip(evidence[k].reshape(side, side), 0, None)
        attention_overlay(gray, heat, ax=ax, alpha=0.45)
        caption = f"{label} p={probs[k]:.2f}"
        if label in sentences:
            caption += "\n" + textwrap.fill(f"\u201c{sentences[label]}\u201d", 40)
        ax.set_title(caption, fontsize=7)
    fig.suptitle(textwrap.fill("generated: " + report, 150), fontsize=9)
    fig.tight_layout()
    return fig


def disease_evidence(vision: VisionModel, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """One encoder input (1, 3, S, S) -> (each disease's image-specific evidence over the patch grid, clipped at 0:
    (14, side, side); the classifier's probabilities (14,)), as ``disease_maps_figure`` draws them."""
    device = next(vision.parameters()).device
    with torch.no_grad():
        evidence = vision.patch_evidence(x.to(device))[0].float().cpu().numpy()  # (14, P)
        probs = vision(x.to(device))[1].sigmoid()[0].float().cpu().numpy()
    side = int(round(evidence.shape[1] ** 0.5))
    return np.clip(evidence, 0, None).reshape(len(evidence), side, side), probs


def _most_probable_finding(probabilities: np.ndarray) -> int:
    """Index of the most probable label other than "No Finding" (the map a reader looks at first)."""
    order = np.argsort(-probabilities)
    return int(next((k for k in order if LABELS[k] != "No Finding"), order[0]))


def _xray_case(gray: np.ndarray, evidence: np.ndarray, probabilities: np.ndarray, k: int, title: str,
               report: str, reference: str) -> dict[str, Any]:
    sentence = finding_sentences(report).get(LABELS[k])
    ranked = ", ".join(f"{LABELS[j]} {probabilities[j]:.2f}" for j in np.argsort(-probabilities)[:5])
    text = f"heatmap: evidence for {LABELS[k]} (classifier p = {probabilities[k]:.2f})"
    if sentence:
        text += f"\nthe generated sentence naming it: \u201c{sentence}\u201d"
    text += f"\n\ngenerated report:\n{report}"
    if reference:
        text += f"\n\nreference report:\n{reference}"
    text += f"\n\nmost probable labels: {ranked}"
    return {"image": gray, "masks": {}, "attention": evidence[k], "title": title, "text": text, "modality": "XR"}


def viewer_cases(result: InferResult, cfg: InferConfig, run: RunFolder, limit: int = 8,
                 disease: str | None = None) -> list[dict[str, Any]]:
    """Cases for ``viz.slice_viewer`` / ``viz.save_case_viewer_html``: the first ``limit`` X-rays of the split (and
    the real DICOM when 03 read it) with the generated and the reference report as text and one disease's
    image-specific evidence map as the heatmap: ``disease`` (one of the 14 labels) for every image, or by default
    each image's most probable finding. (The trained vision model is reloaded: the maps are not part of the result.)

    ``attention_viewer_cases`` shows all 14 maps of one image.
    """
    if disease is not None and disease not in LABELS:
        raise ValueError(f"disease must be one of the 14 labels {list(LABELS)}, got {disease!r}")
    device = resolve_device(cfg.device)
    training_run = find_training_run(cfg.checkpoint, run)
    spec = CxrModelSpec.from_json((training_run / "model_spec.json").read_text())
    vision = VisionModel(spec)
    load_weights(vision, _best(training_run / "vision"), expected_config_hash=spec.fingerprint("vision"))
    vision.eval().to(device)
    manifest, root = load_manifest(cfg)
    images = dict(zip(manifest["id"], manifest["image"]))
    sources = [(root / images[r.id], str(r.id), str(r.generated), str(r.reference))
               for r in result.predictions.head(limit).itertuples()]
    if result.real_dicom is not None:
        sources.append((real_cxr_path(), REAL_CXR_TITLE, str(result.real_dicom["report"]), ""))
    cases = []
    for path, title, generated, reference in sources:
        x = cxr_data.load_encoder_input(path, spec.image_size)[None]
        evidence, probs = disease_evidence(vision, x)
        k = LABELS.index(disease) if disease is not None else _most_probable_finding(probs)
        cases.append(_xray_case(cxr_data.read_xray(path), evidence, probs, k, f"{title}: {LABELS[k]}", generated,
                                reference))
    return cases


def attention_viewer_cases(att: AttentionResult) -> list[dict[str, Any]]:
    """Cases for ``viz.slice_viewer`` / ``viz.save_case_viewer_html``: the X-ray once per disease (14 cases, the
    most probable first), that disease's image-specific evidence map as the heatmap, the generated and the
    reference report as text."""
    if att.image is None or att.evidence is None or att.probabilities is None:
        raise ValueError("the attention result carries no image or evidence maps (made by an older attention_maps)")
    order = np.argsort(-att.probabilities)
    return [_xray_case(att.image, att.evidence, att.probabilities, int(k),
                       f"{LABELS[k]} p={att.probabilities[k]:.2f}", att.report, att.reference) for k in order]


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


def attention_maps(cfg: AttentionConfig, run: RunFolder) -> AttentionResult:
    """Disease attention maps and LM token attention for one image."""
    from nbsupport.viz import attention_grid

    device = resolve_device(cfg.device)
    model = load_trained_model(find_training_run(cfg.checkpoint, run), device)
    if cfg.input_image:
        path = resolve_path(cfg.input_image)
        image_id, prompt = path.name, cxr_data.DEFAULT_PROMPT
    else:
        manifest, root = load_manifest(cfg)
        part = manifest[manifest.split == cfg.split].reset_index(drop=True)
        if cfg.image_id:
            if cfg.image_id not in set(part["id"]):
                raise ValueError(f"image_id {cfg.image_id!r} is not in the {cfg.split} split of {cfg.manifest}")
            row = part[part["id"] == cfg.image_id].iloc[0]
        else:
            positives = (part[list(cxr_data.LABEL_COLUMNS[1:])] == 1).sum(axis=1)
            row = part.iloc[int(positives.to_numpy().argmax())]
        path, image_id, prompt = root / row["image"], str(row["id"]), str(row["prompt"])
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
    evidence_fig = disease_maps_figure(model, gray, x, report, image_id)
    run.save_figure(evidence_fig, "04_disease_evidence")
    token_fig, html = token_attention(model, tokens.cpu(), prompt_ids, report, cfg.layer, run)
    run.save_figure(token_fig, "04_token_attention")
    run.write_metrics(cfg.STAGE, {"image_id": image_id, "report": report})
    evidence, probabilities = disease_evidence(model.vision, x)
    reference = "" if cfg.input_image else str(row["report"])
    return AttentionResult(image_id, report, prior_fig, evidence_fig, token_fig, html, gray, evidence,
                           probabilities, reference)


def token_attention(model: TrainedModel, tokens: torch.Tensor, prompt_ids: list[int], report: str, layer: int,
                    run: RunFolder) -> tuple[Any, Path | None]:
    """Attention of the generated report tokens over [14 visual | prompt | report] in one LM layer (mean of heads)
    as a heatmap, and bertviz's head view of all layers as a standalone HTML file."""
    import matplotlib.pyplot as plt

    report_ids = model.tokenizer(report, add_special_tokens=False)["input_ids"] or [model.tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + report_ids])
    lm = model.generator.lm
    base = lm.get_base_model()
    previous = base.config._attn_implementation
    base.config._attn_implementation = "eager"  # sdpa returns no attention weights
    try:
        with torch.no_grad():
            visual = model.generator.visual_embeddings(tokens)
            embeds = torch.cat([visual, lm.get_input_embeddings()(ids)], dim=1)
            out = lm(inputs_embeds=embeds, output_attentions=True)
    finally:
        base.config._attn_implementation = previous
    names = [f"V:{label}" for label in LABELS] + model.tokenizer.convert_ids_to_tokens(prompt_ids + report_ids)
    names = [n.replace("\u0120", " ").replace("\u010a", "\\n") for n in names]
    att = out.attentions[layer][0].float().mean(0).numpy()  # (T, T)
    start = len(LABELS) + len(prompt_ids)
    rows = att[start:]
    fig, ax = plt.subplots(figsize=(min(24, 2 + 0.22 * len(names)), min(14, 2 + 0.22 * len(rows))))
    ax.imshow(rows, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(rows)), names[start:], fontsize=6)
    ax.axvline(len(LABELS) - 0.5, color="w", lw=1)
    ax.axvline(start - 0.5, color="w", lw=1)
    ax.set_title(f"LM attention (layer {layer}, mean of heads): report tokens over visual | prompt | report")
    fig.tight_layout()
    html = None
    try:
        from nbsupport.viz import save_attention_html  # offline: d3/jQuery inlined, no CDN

        html = save_attention_html([a.float() for a in out.attentions], names, run.file("04_bertviz_head_view.html"),
                                   title="LM attention over visual, prompt and report tokens (bertviz head view)")
    except Exception as err:  # bertviz is a view; the heatmap above carries the same numbers
        print(f"bertviz head view not written: {err}")
    return fig, html
