"""The verbs the prs_med notebooks call: preprocess, train, predict (answer + segment), attention maps.

Each verb takes its stage's frozen config and the run folder, does one thing, records what it measured in
``metrics.json`` and returns a small result object holding the tables and figures a notebook shows.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pandas as pd
import torch

from nbsupport.config import StageConfig, param
from nbsupport.device import resolve_device
from nbsupport.manifest import read_manifest, write_manifest
from nbsupport.metrics import (
    POSITIONS,
    most_frequent_position_baseline,
    parse_position,
    position_accuracy,
    segmentation_metrics,
)
from nbsupport.paths import demo_data_root, resolve_path
from nbsupport.progress import progress
from nbsupport.prs_med import data as prs_data
from nbsupport.prs_med.model import ImageOnlySegmenter, PRSMedNet, PRSMedSpec, count_parameters, structure_loss
from nbsupport.runs import RunFolder, atomic_write_json, atomic_write_text, find_checkpoint, read_json
from nbsupport.checkpoints import load_weights
from nbsupport.launch import launch
from nbsupport.train import TrainSettings

SYSTEM = "prs_med"
DEFAULT_MANIFEST = "data_manifests/prs_med_demo.csv"
SPEC_FILE = "model_spec.json"
BASELINE_DIR = "image_only"  # the question-free baseline's own training folder inside the run
PREDICTION_COLUMNS = ("image_path", "question", "answer", "pred_answer", "pred_position", "dice", "iou", "hd95")


def _demo_root() -> str:
    return str(demo_data_root() / SYSTEM)


# ============================================================================================ configs
@dataclasses.dataclass(frozen=True)
class PreprocessConfig(StageConfig):
    """01_preprocess: read the released layout (or the demo data), check it, write the manifest."""

    SYSTEM = SYSTEM
    STAGE = "01_preprocess"

    data_root: str = param("", "dataset root holding <task>/{split}_images and annotations/<task>.csv; '' = demo")
    manifest: str = param(DEFAULT_MANIFEST, "where to write the manifest (CSV, paths relative to data_root)")
    tasks: tuple[str, ...] = param((), "task folders to read; () = every annotations/<task>.csv of a known task")
    n_examples: int = param(2, "examples shown per task")


@dataclasses.dataclass(frozen=True)
class _ManifestStage(StageConfig):
    SYSTEM = SYSTEM

    data_root: str = param("", "dataset root; '' = the root recorded in the manifest")
    manifest: str = param(DEFAULT_MANIFEST, "manifest written by 01_preprocess")


@dataclasses.dataclass(frozen=True)
class TrainConfig(_ManifestStage):
    """02_train: SAM-style encoder + LLaVA-style VLM (LoRA) + prompted mask decoder, the official loss."""

    STAGE = "02_train"
    PROFILES = {
        "smoke": {"vlm": "tiny", "image_size": 64, "sam_hidden": 32, "sam_out_channels": 32, "vision_size": 64,
                  "vision_patch": 16, "vision_hidden": 32, "decoder_hidden": 32, "epochs": 2, "batch_size": 10,
                  "lr": 3e-3, "lambda_txt": 1.0, "cls_epochs": 1, "max_new_tokens": 8},
        # 737 s of CPU time for all four notebooks (train, image-only baseline, test evaluation) on the 650-image demo
        # set; image tokens before the answer + the position loss on them (our additions, benchmarks/RESULTS.md)
        "demo": {"vlm": "smollm2-135m", "vlm_num_layers": 4, "image_size": 128, "vision_stem": "conv",
                 "projector": "spatial", "epochs": 6, "batch_size": 8, "lr": 2e-3, "vision_lr_scale": 0.75,
                 "lambda_txt": 1.0, "position_weight": 5.0, "cls_epochs": 2, "image_tokens_at": "before_answer",
                 "lambda_position": 1.0, "answer_loss_to_vision": False},
        "full": {"sam_path": "weights/sam-vit-base", "vlm": "weights/llava-med-v1.5-mistral-7b-hf", "image_size": 1024,
                 "decoder_hidden": 512, "lora_dropout": 0.1, "epochs": 20, "batch_size": 8, "lr": 1e-4,
                 "weight_decay": 0.01, "num_workers": 4, "train_baseline": False},
    }

    sam_path: str = param("", "local transformers SAM folder (SamModel/SamVisionModel); '' = random-init SAM ViT")
    vlm: str = param("smollm2-135m", "'tiny' (random, smoke), 'smollm2-135m' (packaged) or a local HF LLaVA folder")
    vlm_num_layers: int = param(0, "keep the first N decoder layers of the assembled VLM's LM (0 = all)")
    image_size: int = param(1024, "square model input in pixels (SAM: 1024)")
    sam_hidden: int = param(64, "random-init SAM ViT width")
    sam_layers: int = param(2, "random-init SAM ViT depth")
    sam_patch: int = param(8, "random-init SAM ViT patch size (grid = image_size / sam_patch)")
    sam_out_channels: int = param(64, "random-init SAM neck channels (256 in SAM)")
    vision_size: int = param(128, "assembled VLM: vision tower input size (pixels)")
    vision_patch: int = param(32, "assembled VLM: patch size; (vision_size / vision_patch)^2 image tokens")
    vision_hidden: int = param(64, "assembled VLM: vision tower width")
    vision_layers: int = param(2, "assembled VLM: vision tower depth")
    vision_stem: str = param("patch", "assembled VLM: 'patch' (CLIP's linear patch conv) or 'conv' (small conv stem)")
    projector: str = param("mlp", "assembled VLM: 'mlp' (LLaVA's per-token MLP) or 'spatial' (+ a whole-grid branch)")
    image_tokens_at: str = param("start", "where the image tokens sit: 'start' (after BOS, as LLaVA/official) or "
                                 "'before_answer' (after the prompt; our addition)")
    lora_r: int = param(16, "LoRA rank on q/k/v/o of the language model")
    lora_alpha: int = param(16, "LoRA alpha")
    lora_dropout: float = param(0.05, "LoRA dropout")
    decoder_hidden: int = param(128, "prompt-MLP width of the mask decoder (official 512)")
    epochs: int = param(20, "training epochs")
    max_steps: int | None = param(None, "stop after this many optimizer steps")
    batch_size: int = param(8, "batch size")
    lr: float = param(1e-4, "peak learning rate (AdamW, warm-up then cosine)")
    weight_decay: float = param(0.01, "weight decay")
    grad_clip: float | None = param(1.0, "gradient-norm clipping")
    lambda_txt: float = param(0.5, "weight of the VLM's answer loss next to the structure loss")
    position_weight: float = param(1.0, "weight of the answer's position-word tokens in the answer loss")
    vision_lr_scale: float = param(1.0, "lr of the assembled VLM's random vision tower + projector, times lr")
    lambda_cls: float = param(0.5, "weight of the modality cross-entropy")
    lambda_position: float = param(0.0, "weight of the image tokens' 5-way position loss (label from the mask; "
                                   "our addition, 0 = off as in the official code)")
    answer_loss_to_vision: bool = param(True, "the answer loss trains the assembled VLM's vision tower + projector "
                                        "too (official); False: only the position loss does (our addition)")
    cls_epochs: int = param(5, "epochs during which the modality loss is on (official: 5)")
    threshold: float = param(0.5, "sigmoid probability above which a pixel is in the mask")
    max_new_tokens: int = param(24, "longest generated answer (tokens)")
    eval_batch_size: int = param(16, "images per forward pass in evaluation")
    train_baseline: bool = param(True, "also train the image-only baseline (same decoder, no question)")
    num_processes: int = param(1, "processes for data-parallel training (accelerate launch)")
    num_workers: int = param(0, "data-loader worker processes")
    resume: bool = param(False, "continue from the last checkpoint in run_dir")

    def spec(self) -> PRSMedSpec:
        """The network these settings describe."""
        return PRSMedSpec(image_size=self.image_size, sam_path=self.sam_path, sam_hidden=self.sam_hidden,
                          sam_layers=self.sam_layers, sam_patch=self.sam_patch, sam_out_channels=self.sam_out_channels,
                          vlm=self.vlm, vlm_num_layers=self.vlm_num_layers, vision_size=self.vision_size,
                          vision_patch=self.vision_patch, vision_hidden=self.vision_hidden,
                          vision_layers=self.vision_layers, vision_stem=self.vision_stem,
                          projector=self.projector, image_tokens_at=self.image_tokens_at,
                          position_head=self.lambda_position > 0, answer_loss_to_vision=self.answer_loss_to_vision,
                          lora_r=self.lora_r, lora_alpha=self.lora_alpha,
                          lora_dropout=self.lora_dropout, decoder_hidden=self.decoder_hidden, seed=self.seed)


@dataclasses.dataclass(frozen=True)
class _TrainedModelStage(_ManifestStage):
    checkpoint: str = param("", "checkpoint folder; '' = best checkpoint of run_dir, else of the newest run")
    split: Literal["train", "val", "test"] = param("test", "manifest split to use")


@dataclasses.dataclass(frozen=True)
class InferConfig(_TrainedModelStage):
    """03_infer: answer + segment every image of a split, or one image + question."""

    STAGE = "03_infer"

    image_path: str = param("", "one image to answer about (with `question`); '' = only the split")
    question: str = param("Where is the lesion located in this image?", "question asked about `image_path`")
    threshold: float = param(0.5, "sigmoid probability above which a pixel is in the mask")
    max_new_tokens: int = param(24, "longest generated answer (tokens)")
    batch_size: int = param(16, "images per forward pass")
    n_examples: int = param(6, "examples in the overlay figure")


@dataclasses.dataclass(frozen=True)
class AttentionConfig(_TrainedModelStage):
    """04_attention: decoder cross-attention and VLM attention over the image for one question."""

    STAGE = "04_attention"

    sample_id: str = param("", "manifest id (e.g. 'polyp_endoscopy:7'); '' = the split's first sample")
    question: str = param("", "ask this instead of the sample's own question; '' = the manifest's")
    max_new_tokens: int = param(24, "longest generated answer (tokens)")


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
    from nbsupport.viz import image_grid

    root = resolve_path(cfg.data_root or _demo_root())
    manifest, disagreements = prs_data.build_manifest(root, tasks=list(cfg.tasks) or None)
    manifest_path = resolve_path(cfg.manifest)
    write_manifest(manifest, manifest_path, prs_data.PRSMED_SCHEMA, root)
    if len(disagreements):
        print(f"{len(disagreements)} rows give a position that disagrees with their mask (the mask's is kept):")
        print(disagreements.head(20).to_string(index=False))
    atomic_write_text(run.file("position_disagreements.csv"), disagreements.to_csv(index=False))
    summary = summarise_manifest(manifest)
    atomic_write_text(run.file("manifest_summary.csv"), summary.to_csv())
    run.write_metrics(cfg.STAGE, {"rows": len(manifest), "images": int(manifest["image"].nunique()),
                                  "tasks": sorted(manifest["task"].unique()),
                                  "position_disagreements": len(disagreements)})
    sample = manifest.groupby("task", sort=True).head(cfg.n_examples)
    images = [prs_data.read_image(root / r.image) for r in sample.itertuples()]
    masks = [{"finding": prs_data.read_mask(root / r.mask)} for r in sample.itertuples()]
    titles = [f"{r.task}\n{r.position}: {_wrap(r.question, 34)}" for r in sample.itertuples()]
    fig = image_grid(images, titles=titles, masks=masks, ncols=max(2, cfg.n_examples * 2),
                     suptitle="PRS-Med: examples per task (mask and the position it implies)")
    run.save_figure(fig, "01_examples_per_task")
    return PreprocessResult(manifest, manifest_path, summary, disagreements, fig)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(str(text), width)[:2])


def summarise_manifest(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per task: rows per split and per position."""
    splits = pd.crosstab(manifest["task"], manifest["split"]).reindex(columns=["train", "val", "test"], fill_value=0)
    positions = pd.crosstab(manifest["task"], manifest["position"]).reindex(columns=list(POSITIONS), fill_value=0)
    return pd.concat([splits, positions], axis=1)


# ============================================================================================ 02 train
def load_manifest(cfg: Any) -> tuple[pd.DataFrame, Path]:
    """The validated manifest named by ``cfg.manifest`` and its data root."""
    return read_manifest(resolve_path(cfg.manifest), prs_data.PRSMED_SCHEMA,
                         data_root=resolve_path(cfg.data_root) if cfg.data_root else None)


class PRSMedTrainingTask:
    """What the shared trainer needs (see ``nbsupport.train.TrainingTask``): the official PRS-Med objective."""

    def __init__(self, config: dict[str, Any], manifest: str, data_root: str):
        self.cfg = TrainConfig.from_params(config)
        frame, root = read_manifest(Path(manifest), prs_data.PRSMED_SCHEMA, data_root=Path(data_root),
                                    check_files=False)
        self.manifest, self.root = frame, root
        self.spec = self.cfg.spec()
        n_train = int((frame.split == "train").sum())
        # The modality loss is on for the first cls_epochs epochs; the trainer counts steps, so convert.
        self.cls_steps = self.cfg.cls_epochs * max(1, n_train // self.cfg.batch_size)
        self.collate = prs_data.collate_qa

    def build_model(self) -> PRSMedNet:
        return PRSMedNet(self.spec)

    def train_dataset(self) -> prs_data.PositionQADataset:
        return prs_data.PositionQADataset(self.manifest[self.manifest.split == "train"], self.root,
                                          self.cfg.image_size)

    def val_dataset(self) -> prs_data.PositionQADataset | None:
        part = self.manifest[self.manifest.split == "val"]
        return prs_data.PositionQADataset(part, self.root, self.cfg.image_size) if len(part) else None

    def losses(self, model: PRSMedNet, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``seg`` (structure loss), ``lm`` (answer tokens' cross-entropy), ``cls`` (modality) for one batch."""
        device = batch["image"].device
        enc = model.encode(batch["question"], batch["answer"], device=device)
        out = model(batch["image"], enc["input_ids"], enc["attention_mask"], enc["labels"],
                    position_weight=self.cfg.position_weight)
        parts = {"seg": structure_loss(out.mask_logits, batch["mask"]), "lm": out.lm_loss,
                 "cls": torch.nn.functional.cross_entropy(out.modality_logits, batch["modality"].to(device)),
                 "logits": out.mask_logits}
        if out.position_logits is not None:  # every image token classified; the label is position_of(mask)
            labels = torch.tensor([POSITIONS.index(p) for p in batch["position"]], device=device)
            per_token = out.position_logits.flatten(0, 1)
            parts["position"] = torch.nn.functional.cross_entropy(
                per_token, labels.repeat_interleave(out.position_logits.shape[1]))
        return parts

    def trainable_parameters(self, model: PRSMedNet) -> list[dict[str, Any]]:
        """AdamW groups: the assembled VLM's random vision tower + projector at ``vision_lr_scale * lr`` (they start
        from nothing, unlike the LoRA-adapted language model); weight decay on matrices only."""
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            vision = ".vision_tower." in name or ".multi_modal_projector." in name
            groups.setdefault((vision, p.ndim >= 2), []).append(p)
        return [{"params": ps, "lr": self.cfg.lr * (self.cfg.vision_lr_scale if vision else 1.0),
                 "weight_decay": self.cfg.weight_decay if matrix else 0.0}
                for (vision, matrix), ps in sorted(groups.items())]

    def training_step(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        bare = getattr(model, "module", model)
        parts = self.losses(bare, batch)
        loss = parts["seg"] + self.cfg.lambda_txt * parts["lm"]
        if "position" in parts:
            loss = loss + self.cfg.lambda_position * parts["position"]
        # The step count lives in the model (restored from the checkpoint on resume), not in this task object,
        # which a resumed run rebuilds from scratch.
        if int(bare.trained_batches) < self.cls_steps:
            loss = loss + self.cfg.lambda_cls * parts["cls"]
        bare.trained_batches += 1
        return loss

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """Teacher-forced validation: structure loss, answer loss and mean Dice at model resolution."""
        bare = getattr(model, "module", model)
        seg, lm, dice = [], [], []
        for batch in loader:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            parts = self.losses(bare, batch)
            seg.append(float(parts["seg"]))
            lm.append(float(parts["lm"]))
            pred = parts["logits"].sigmoid() > self.cfg.threshold
            truth = batch["mask"] > 0.5
            inter = (pred & truth).flatten(1).sum(-1).float()
            total = (pred.flatten(1).sum(-1) + truth.flatten(1).sum(-1)).float()
            dice += ((2 * inter + 1e-6) / (total + 1e-6)).tolist()
        return {"loss": float(np.mean(seg) + self.cfg.lambda_txt * np.mean(lm)), "seg_loss": float(np.mean(seg)),
                "lm_loss": float(np.mean(lm)), "dice": float(np.mean(dice))}


class ImageOnlyTrainingTask(PRSMedTrainingTask):
    """The baseline: the same encoder and decoder trained on the structure loss with no question."""

    def __init__(self, config: dict[str, Any], manifest: str, data_root: str, prompt_dim: int):
        super().__init__(config, manifest, data_root)
        self.prompt_dim = prompt_dim

    def build_model(self) -> ImageOnlySegmenter:  # type: ignore[override]
        return ImageOnlySegmenter(self.spec, self.prompt_dim)

    def training_step(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return structure_loss(model(batch["image"]), batch["mask"])

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        losses, dice = [], []
        for batch in loader:
            logits = model(batch["image"].to(device))
            mask = batch["mask"].to(device)
            losses.append(float(structure_loss(logits, mask)))
            pred, truth = logits.sigmoid() > self.cfg.threshold, mask > 0.5
            inter = (pred & truth).flatten(1).sum(-1).float()
            total = (pred.flatten(1).sum(-1) + truth.flatten(1).sum(-1)).float()
            dice += ((2 * inter + 1e-6) / (total + 1e-6)).tolist()
        return {"loss": float(np.mean(losses)), "dice": float(np.mean(dice))}


def training_task(config: dict[str, Any], manifest: str, data_root: str) -> PRSMedTrainingTask:
    """Factory named in ``launch`` so that every accelerate process rebuilds the same task."""
    return PRSMedTrainingTask(config, manifest, data_root)


def image_only_task(config: dict[str, Any], manifest: str, data_root: str, prompt_dim: int) -> ImageOnlyTrainingTask:
    """Factory of the image-only baseline's task."""
    return ImageOnlyTrainingTask(config, manifest, data_root, prompt_dim)


def _settings(cfg: TrainConfig, manifest: pd.DataFrame) -> TrainSettings:
    steps_per_epoch = max(1, int((manifest.split == "train").sum()) // cfg.batch_size)
    has_val = bool((manifest.split == "val").any())
    return TrainSettings(epochs=cfg.epochs, max_steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                         weight_decay=cfg.weight_decay, optimizer="adamw", scheduler="warmup_cosine",
                         warmup_steps=min(steps_per_epoch, 50), grad_clip=cfg.grad_clip,
                         monitor="val_dice" if has_val else "train_loss", monitor_mode="max" if has_val else "min",
                         resume=cfg.resume, num_processes=cfg.num_processes, num_workers=cfg.num_workers,
                         seed=cfg.seed, log_every=5, save_trainable_only=True)


@dataclasses.dataclass
class TrainOutcome:
    history: list[dict[str, Any]]
    checkpoint: Path
    test_split: str
    parameters: dict[str, int]
    per_task: pd.DataFrame  # Dice / IoU / HD95 / position accuracy per task, with the baselines
    predictions: pd.DataFrame
    curves: Any
    examples: Any


def train(cfg: TrainConfig, run: RunFolder) -> TrainOutcome:
    """Train on the train split (best checkpoint by val Dice), then answer + segment the test split."""
    from nbsupport.viz import plot_training_curves

    manifest, root = load_manifest(cfg)
    spec = cfg.spec()
    atomic_write_text(run.file(SPEC_FILE), spec.to_json())
    settings = _settings(cfg, manifest)
    kwargs = {"config": cfg.to_dict(), "manifest": str(resolve_path(cfg.manifest)), "data_root": str(root)}
    result = launch("nbsupport.prs_med.pipeline:training_task", kwargs, settings, run.path,
                    config_hash=spec.fingerprint())
    model = load_trained_model(Path(result.best_checkpoint or result.last_checkpoint))
    parameters = count_parameters(model)
    print("parameters:", json.dumps(parameters))
    baseline = None
    if cfg.train_baseline:
        prompt_dim = int(model.llava.config.text_config.hidden_size)
        atomic_write_json(run.file(f"{BASELINE_DIR}/baseline.json"), {"prompt_dim": prompt_dim})
        base_result = launch("nbsupport.prs_med.pipeline:image_only_task", {**kwargs, "prompt_dim": prompt_dim},
                             settings, run.path / BASELINE_DIR, config_hash=spec.fingerprint() + "-image-only")
        baseline = load_image_only(run.path / BASELINE_DIR, spec, prompt_dim,
                                   Path(base_result.best_checkpoint or base_result.last_checkpoint))
    test_split = "test" if (manifest.split == "test").any() else "val"
    evaluation = evaluate_split(model, manifest, test_split, root, resolve_device(cfg.device), cfg.eval_batch_size,
                                cfg.threshold, cfg.max_new_tokens, baseline=baseline)
    atomic_write_text(run.file("test_predictions.csv"), evaluation.predictions.to_csv(index=False))
    atomic_write_text(run.file("test_per_task.csv"), evaluation.per_task.to_csv())
    metrics = {f"{test_split}_{k}": v for k, v in evaluation.overall.items()}
    metrics.update({"steps": result.steps, "best_val_dice": result.best_metric, "parameters": parameters,
                    "per_task": json.loads(evaluation.per_task.to_json(orient="index"))})
    run.write_metrics(cfg.STAGE, metrics)
    curves = plot_training_curves(result.history)
    run.save_figure(curves, "02_training_curves")
    examples = evaluation.figure(root, n=6)
    run.save_figure(examples, "02_test_predictions")
    return TrainOutcome(result.history, Path(result.best_checkpoint or result.last_checkpoint), test_split,
                        parameters, evaluation.per_task, evaluation.predictions, curves, examples)


# ============================================================================================ loading
def load_trained_model(checkpoint_dir: Path) -> PRSMedNet:
    """Rebuild the network from the run's ``model_spec.json`` and load the checkpoint (trainable weights)."""
    spec_path = checkpoint_dir.parent.parent / SPEC_FILE
    if not spec_path.exists():
        raise FileNotFoundError(f"{spec_path} is missing: {checkpoint_dir} is not a prs_med checkpoint")
    spec = PRSMedSpec.from_json(spec_path.read_text())
    model = PRSMedNet(spec)
    load_weights(model, checkpoint_dir, expected_config_hash=spec.fingerprint())
    return model.eval()


def load_image_only(folder: Path, spec: PRSMedSpec, prompt_dim: int, checkpoint: Path | None = None
                    ) -> ImageOnlySegmenter:
    """The image-only baseline trained in ``<run>/image_only``."""
    model = ImageOnlySegmenter(spec, prompt_dim)
    load_weights(model, checkpoint or folder / "checkpoints" / "best",
                 expected_config_hash=spec.fingerprint() + "-image-only")
    return model.eval()


def _baseline_of(checkpoint: Path, model: PRSMedNet) -> ImageOnlySegmenter | None:
    folder = checkpoint.parent.parent / BASELINE_DIR
    info = read_json(folder / "baseline.json")
    best = folder / "checkpoints" / "best"
    if info is None or not (best / "meta.json").exists():
        return None
    return load_image_only(folder, model.spec, int(info["prompt_dim"]), best)


# ============================================================================================ evaluation
@dataclasses.dataclass
class SplitEvaluation:
    """Answers, masks (at each image's own size) and scores of a split."""

    manifest: pd.DataFrame
    predictions: pd.DataFrame  # PREDICTION_COLUMNS + task, position, mask_position, ... per row
    pred_masks: list[np.ndarray]
    per_task: pd.DataFrame
    overall: dict[str, float]

    def figure(self, root: Path, n: int = 6) -> Any:
        """Predicted vs true mask with the question, the true and the generated answer, for ``n`` rows."""
        from nbsupport.viz import compare_masks_grid

        order = list(self.manifest.groupby("task", sort=True).head(max(1, n // max(1, self.manifest.task.nunique())))
                     .index[:n])
        images = [prs_data.read_image(root / self.manifest.loc[i, "image"]) for i in order]
        truths = [{"finding": prs_data.read_mask(root / self.manifest.loc[i, "mask"])} for i in order]
        preds = [{"finding": self.pred_masks[i]} for i in order]
        titles = [f"{self.manifest.loc[i, 'task']}\ntrue: {self.manifest.loc[i, 'position']} | "
                  f"said: {self.predictions.loc[i, 'pred_position'] or '?'}" for i in order]
        return compare_masks_grid(images, preds, truths, titles=titles)


@torch.no_grad()
def evaluate_split(model: PRSMedNet, manifest: pd.DataFrame, split: str, root: Path, device: torch.device,
                   batch_size: int = 16, threshold: float = 0.5, max_new_tokens: int = 24,
                   baseline: ImageOnlySegmenter | None = None) -> SplitEvaluation:
    """Answer and segment every row of ``split``; score masks (Dice, IoU, HD95 in px at the image's size) and the
    position parsed from each generated answer, per task, next to the baselines.

    Baselines: the image-only decoder's Dice (when given) and "always the most frequent training position".
    """
    part = manifest[manifest.split == split].reset_index(drop=True)
    dataset = prs_data.PositionQADataset(part, root, model.spec.image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         collate_fn=prs_data.collate_qa)
    model.eval().to(device)
    if baseline is not None:
        baseline.eval().to(device)
    answers: list[str] = []
    masks: list[np.ndarray] = []
    base_dice: list[float] = []
    records: list[dict[str, Any]] = []
    for batch in progress(loader, desc=f"answer + segment {split}"):
        images = batch["image"].to(device)
        said, probs = model.answer_and_segment(images, batch["question"], max_new_tokens)
        base_probs = baseline(images).sigmoid() if baseline is not None else None
        for k, index in enumerate(batch["index"].tolist()):
            row = part.iloc[index]
            truth = prs_data.read_mask(root / row["mask"])
            pred = _restore(probs[k, 0], truth.shape) > threshold
            seg = segmentation_metrics(pred[None, None], truth[None, None]).iloc[0]
            mask_position = prs_data.position_of(pred).position if pred.any() else ""
            pred_position = parse_position(said[k]) or ""
            answers.append(said[k])
            masks.append(pred)
            if base_probs is not None:
                base = _restore(base_probs[k, 0], truth.shape) > threshold
                base_dice.append(float(segmentation_metrics(base[None, None], truth[None, None]).iloc[0]["dice"]))
            records.append({"image_path": row["image"], "question": row["question"], "answer": row["answer"],
                            "pred_answer": said[k], "pred_position": pred_position, "dice": float(seg["dice"]),
                            "iou": float(seg["iou"]), "hd95": float(seg["hd95"]), "id": row["id"],
                            "task": row["task"], "position": row["position"], "mask_position": mask_position,
                            "position_correct": pred_position == row["position"],
                            "mask_position_correct": mask_position == row["position"],
                            "answer_mask_agree": bool(pred_position) and pred_position == mask_position})
    predictions = pd.DataFrame(records)
    if baseline is not None:
        predictions["image_only_dice"] = base_dice
    train_positions = list(manifest.loc[manifest.split == "train", "position"]) or list(part["position"])
    per_task = per_task_table(predictions, manifest)
    overall = {k: float(v) for k, v in per_task.loc["all"].items() if isinstance(v, (int, float, np.number))}
    overall["most_frequent_position"] = most_frequent_position_baseline(train_positions, part["position"])["position"]
    return SplitEvaluation(part, predictions, masks, per_task, overall)


def _restore(prob: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """A model-resolution probability map resized (bilinear) to the image's (H, W), as the official evaluation."""
    return cv2.resize(prob.float().cpu().numpy(), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def per_task_table(predictions: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """Per task and overall ("all"): n, Dice, IoU, HD95 (px), position accuracy of the answers, of the mask's
    implied position, how often the two agree, and the baselines' numbers on the same rows."""
    train_positions = list(manifest.loc[manifest.split == "train", "position"]) or list(predictions["position"])
    rows = {}
    groups = [(task, g) for task, g in predictions.groupby("task", sort=True)] + [("all", predictions)]
    for task, g in groups:
        task_train = [p for p, t in zip(manifest.position, manifest.task) if t == task and p] if task != "all" else []
        mf = most_frequent_position_baseline(task_train or train_positions, list(g["position"]))
        row = {"n": len(g), "dice": g["dice"].mean(), "iou": g["iou"].mean(), "hd95_px": g["hd95"].mean(),
               "position_accuracy": position_accuracy(list(g["pred_answer"]), list(g["position"]))["accuracy"],
               "mask_position_accuracy": float(g["mask_position_correct"].mean()),
               "answer_mask_agreement": float(g["answer_mask_agree"].mean()),
               "baseline_most_frequent_position_accuracy": mf["accuracy"]}
        if "image_only_dice" in g:
            row["baseline_image_only_dice"] = g["image_only_dice"].mean()
        rows[task] = row
    return pd.DataFrame.from_dict(rows, orient="index")


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


def answer_image(model: PRSMedNet, image: np.ndarray, question: str, threshold: float = 0.5,
                 max_new_tokens: int = 24) -> dict[str, Any]:
    """Answer ``question`` about one uint8 RGB image (H, W, 3) and segment the finding.

    Returns:
        ``{"answer", "position" (parsed from the answer), "mask" (bool (H, W)), "mask_position"}``.
    """
    device = next(model.parameters()).device
    tensor = prs_data.image_to_tensor(image, model.spec.image_size)[None].to(device)
    answers, probs = model.answer_and_segment(tensor, [question], max_new_tokens)
    mask = _restore(probs[0, 0], image.shape[:2]) > threshold
    return {"answer": answers[0], "position": parse_position(answers[0]), "mask": mask,
            "mask_position": prs_data.position_of(mask).position if mask.any() else None}


def predict(cfg: InferConfig, run: RunFolder) -> InferResult:
    """Answer + segment a split (``predictions.csv`` and the per-task table) and optionally ``cfg.image_path``."""
    from nbsupport.viz import overlay_masks

    checkpoint = find_checkpoint(cfg.checkpoint, run, SYSTEM)
    model = load_trained_model(checkpoint)
    baseline = _baseline_of(checkpoint, model)
    manifest, root = load_manifest(cfg)
    evaluation = evaluate_split(model, manifest, cfg.split, root, resolve_device(cfg.device), cfg.batch_size,
                                cfg.threshold, cfg.max_new_tokens, baseline=baseline)
    path = run.file("predictions.csv")
    atomic_write_text(path, evaluation.predictions.to_csv(index=False))
    atomic_write_text(run.file("per_task.csv"), evaluation.per_task.to_csv())
    run.write_metrics(cfg.STAGE, {f"{cfg.split}_{k}": v for k, v in evaluation.overall.items()}
                      | {"per_task": json.loads(evaluation.per_task.to_json(orient="index"))})
    fig = evaluation.figure(root, n=cfg.n_examples)
    run.save_figure(fig, "03_predictions")
    single, single_fig = None, None
    if cfg.image_path:
        image = prs_data.read_image(resolve_path(cfg.image_path))
        single = answer_image(model, image, cfg.question, cfg.threshold, cfg.max_new_tokens)
        single_fig = overlay_masks(image, {"predicted": single["mask"]},
                                   title=f"Q: {cfg.question}\nA: {single['answer']}")
        single_fig = getattr(single_fig, "figure", single_fig)
        run.save_figure(single_fig, "03_single_image")
    return InferResult(evaluation.predictions, path, evaluation.per_task, fig, single, single_fig, evaluation, root)


def _viewer_image(image: np.ndarray) -> dict[str, Any]:
    """``image`` and ``modality`` of a viewer case: uint8 RGB (H, W, 3) in colour (endoscopy, dermoscopy; grey
    scans are repeated over the channels)."""
    return {"image": image, "modality": "RGB"} if image.ndim == 3 else {"image": image}


def _qa_text(task: str, question: str, answer: str, said: str, extra: str = "") -> str:
    text = (f"task: {task}\nQ: {question}\nreference answer: {answer}\nmodel answer: {said}" if task else
            f"Q: {question}\nreference answer: {answer}\nmodel answer: {said}")
    return text + (f"\n\n{extra}" if extra else "")


def viewer_cases(result: InferResult, limit: int = 12) -> list[dict[str, Any]]:
    """Cases for ``viz.slice_viewer`` / ``viz.save_case_viewer_html``: up to ``limit`` rows of the split, the same
    number from each task, each image (in colour) with its true and predicted mask, and the question, the
    reference answer and the model's answer (with Dice and the positions) as text."""
    ev = result.evaluation
    per_task = max(1, limit // max(1, ev.manifest.task.nunique()))
    order = list(ev.manifest.groupby("task", sort=True).head(per_task).index[:limit])
    cases = []
    for i in order:
        row, pred = ev.manifest.loc[i], ev.predictions.loc[i]
        truth = prs_data.read_mask(result.root / row["mask"]) > 0
        if ev.pred_masks[i].shape != truth.shape:
            raise ValueError(f"{result.root / row['mask']}: predicted mask has shape {ev.pred_masks[i].shape}, "
                             f"expected the true mask's {truth.shape}")
        extra = (f"Dice {pred['dice']:.3f} · position: true {row['position'] or '?'}, answered "
                 f"{pred['pred_position'] or '?'}, of the predicted mask {pred['mask_position'] or '?'}")
        cases.append({**_viewer_image(prs_data.read_image(result.root / row["image"])),
                      "masks": {"true finding": truth, "predicted finding": ev.pred_masks[i]},
                      "title": str(row["id"]),
                      "text": _qa_text(str(row["task"]), str(row["question"]), str(row["answer"]),
                                       str(pred["pred_answer"]), extra)})
    return cases


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


def attention_maps(cfg: AttentionConfig, run: RunFolder) -> AttentionResult:
    """For one sample: the decoder's image-to-prompt cross-attention for the question's tokens, the VLM's
    attention from the generated answer's tokens over the image patches (per layer), and predicted vs true mask."""
    from nbsupport.viz import attention_grid, compare_masks_grid

    checkpoint = find_checkpoint(cfg.checkpoint, run, SYSTEM)
    model = load_trained_model(checkpoint)
    manifest, root = load_manifest(cfg)
    part = manifest[manifest.split == cfg.split].reset_index(drop=True)
    if cfg.sample_id:
        if cfg.sample_id not in set(part["id"]):
            raise ValueError(f"sample_id {cfg.sample_id!r} is not in the {cfg.split} split of {cfg.manifest}")
        row = part[part["id"] == cfg.sample_id].iloc[0]
    else:
        row = part.iloc[0]
    question = cfg.question or row["question"]
    image = prs_data.read_image(root / row["image"])
    truth = prs_data.read_mask(root / row["mask"])
    tensor = prs_data.image_to_tensor(image, model.spec.image_size)[None]
    said = model.generate_answers(tensor, [question], cfg.max_new_tokens)[0]
    enc = model.encode([question], [said])
    model.llava.model.language_model.set_attn_implementation("eager")  # sdpa returns no attention weights
    with torch.no_grad():
        out = model(tensor, enc["input_ids"], enc["attention_mask"], return_attention=True)
    decoder_maps, vlm_maps = attention_over_image(model, out, enc["input_ids"][0], enc["labels"][0])
    shown = cv2.resize(image, (model.spec.image_size, model.spec.image_size))
    decoder_fig = attention_grid(shown, decoder_maps, ncols=4)
    vlm_fig = attention_grid(shown, vlm_maps, ncols=4)
    run.save_figure(decoder_fig, "04_decoder_cross_attention")
    run.save_figure(vlm_fig, "04_vlm_attention_over_patches")
    pred = _restore(out.mask_logits.sigmoid()[0, 0], truth.shape) > 0.5
    overlay = compare_masks_grid([image], [{"finding": pred}], [{"finding": truth}],
                                 titles=[f"Q: {_wrap(question, 50)}\ntrue: {row['answer']}\nsaid: {said}"])
    run.save_figure(overlay, "04_prediction_vs_truth")
    return AttentionResult(str(row["id"]), question, str(row["answer"]), said, decoder_maps, vlm_maps, image,
                           decoder_fig, vlm_fig, overlay, pred, truth > 0, str(row["task"]))


def attention_viewer_cases(att: AttentionResult, vlm: bool = False) -> list[dict[str, Any]]:
    """Cases for ``viz.slice_viewer`` / ``viz.save_case_viewer_html``: the image once per mask-decoder
    cross-attention map (the question's mean, the answer's position words, the question's words) as the heatmap,
    with the true and predicted masks and the question / answers as text; ``vlm`` adds one case per LM layer
    (the answer tokens' attention over the image patches)."""
    masks = {}
    if att.true_mask is not None:
        masks["true finding"] = att.true_mask
    if att.pred_mask is not None:
        masks["predicted finding"] = att.pred_mask
    image = _viewer_image(att.image)
    maps = [("decoder cross-attention", title, amap) for title, amap in att.decoder_maps]
    if vlm:
        maps += [("VLM attention of the answer", title, amap) for title, amap in att.vlm_maps]
    return [{**image, "masks": masks, "attention": amap, "title": f"{kind}: {title}",
             "text": _qa_text(att.task, att.question, att.answer, att.pred_answer,
                              f"{att.sample_id}\nheatmap: {kind} over the image, {title} "
                              f"(grid {amap.shape[0]}x{amap.shape[1]})")}
            for kind, title, amap in maps]


def attention_over_image(model: PRSMedNet, out: Any, input_ids: torch.Tensor, labels: torch.Tensor
                         ) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray]]]:
    """Maps of attention over the image for one sample.

    Decoder: the image tokens are the queries of the cross-attention (g*g, T); the map of a prompt token is its
    column, reshaped to the encoder grid: first the mean over the question's tokens, then the answer's position
    words and the individual question words. VLM: per LM layer, the mean over heads and answer tokens of their
    attention to the image-token positions, reshaped to the vision tower's patch grid.
    """
    tok = model.tokenizer
    grid = model.spec.image_size // model.spec.sam_patch if not model.spec.sam_path else None
    cross = out.cross_attention[0]  # (g*g, T)
    side = grid or round(cross.shape[0] ** 0.5)
    is_image = input_ids == model.image_token_id
    is_answer = labels != -100
    words = [tok.decode([int(t)]).strip() for t in input_ids]
    question_positions = [i for i in range(len(words)) if not is_image[i] and not is_answer[i] and words[i]
                          and words[i] not in ("###", "User", "Assistant", ":", "\n")]
    decoder_maps = [("question (mean)", cross[:, question_positions].mean(-1).reshape(side, side).numpy())]
    answer_positions = [i for i in range(len(words)) if is_answer[i] and words[i].lower() in
                        ("top", "bottom", "left", "right", "center")]
    for i in answer_positions + question_positions[:8]:
        decoder_maps.append((f"'{words[i]}'", cross[:, i].reshape(side, side).numpy()))
    image_index = torch.nonzero(is_image).flatten()
    answer_index = torch.nonzero(is_answer).flatten()
    vside = round(len(image_index) ** 0.5)
    vlm_maps = []
    for layer, att in enumerate(out.vlm_attentions or ()):
        a = att[0].mean(0)  # (T, T) over heads
        rows = a[answer_index - 1] if len(answer_index) else a[-1:]  # the positions that predict answer tokens
        over_image = rows[:, image_index].mean(0)
        vlm_maps.append((f"LM layer {layer + 1}", over_image.reshape(vside, vside).float().numpy()))
    return decoder_maps, vlm_maps


__all__ = ["AttentionConfig", "InferConfig", "PreprocessConfig", "TrainConfig", "answer_image", "attention_maps",
           "attention_viewer_cases", "evaluate_split", "load_manifest", "predict", "preprocess", "train",
           "viewer_cases"]
