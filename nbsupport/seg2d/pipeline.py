"""The verbs the seg2d notebooks call: preprocess, train, predict, attention maps.

Each verb takes the stage's frozen config and its run folder, does one thing, records what it measured in
``metrics.json`` and returns a small result object with the tables and figures a notebook shows.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from nbsupport.config import StageConfig, param
from nbsupport.device import resolve_device
from nbsupport.manifest import read_manifest, write_manifest
from nbsupport.paths import demo_data_root, resolve_path
from nbsupport.progress import progress
from nbsupport.runs import RunFolder, atomic_write_text, find_checkpoint
from nbsupport.seg2d import data as seg_data
from nbsupport.seg2d.model import (BCEDiceLoss, Seg2DModelSpec, Seg2DNet, build_seg2d_model, model_from_spec)
from nbsupport.seg2d.scoring import competition_score
from nbsupport.checkpoints import load_weights
from nbsupport.launch import launch
from nbsupport.train import TrainSettings

SYSTEM = "seg2d"
CLASSES = seg_data.CLASSES
DEFAULT_MANIFEST = "data_manifests/uwmgi_demo.csv"
POSTPROCESS_FILE = "postprocess.json"  # in the run folder, next to model_spec.json
# The grid `postprocess="val_tuned"` searches, per class, on the val split.
TUNED_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
TUNED_MIN_AREAS = (0, 32, 64, 128, 256, 512)


def _demo_root() -> str:
    return str(demo_data_root() / SYSTEM)


# ============================================================================================ configs
@dataclasses.dataclass(frozen=True)
class PreprocessConfig(StageConfig):
    """01_preprocess: read a dataset in the Kaggle layout and write the slice manifest."""

    SYSTEM = SYSTEM
    STAGE = "01_preprocess"

    data_root: str = param("", "dataset root holding train.csv and train/caseN/...; '' = the demo dataset")
    manifest: str = param(DEFAULT_MANIFEST, "where to write the slice manifest (CSV, paths relative to data_root)")
    val_fraction: float = param(0.2, "fraction of cases held out for validation (checkpoint selection)")
    test_fraction: float = param(0.2, "fraction of cases held out for the final test metrics")
    n_examples: int = param(6, "slices shown in the sample figure")

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")


@dataclasses.dataclass(frozen=True)
class _ManifestStage(StageConfig):
    """Stages that read the manifest written by 01_preprocess."""

    SYSTEM = SYSTEM

    data_root: str = param("", "dataset root; '' = the root recorded in the manifest")
    manifest: str = param(DEFAULT_MANIFEST, "slice manifest written by 01_preprocess")


@dataclasses.dataclass(frozen=True)
class _TrainedModelStage(_ManifestStage):
    """Stages that use a trained checkpoint on one split."""

    checkpoint: str = param("", "checkpoint folder; '' = best checkpoint of run_dir, else of the newest run")
    split: Literal["train", "val", "test"] = param("test", "manifest split to use")


@dataclasses.dataclass(frozen=True)
class TrainConfig(_ManifestStage):
    """02_train: transfer-learn (or train from a config) one of the four HF architectures."""

    STAGE = "02_train"
    PROFILES = {
        "smoke": {"width": "tiny", "image_size": 96, "epochs": 40, "batch_size": 8, "lr": 5e-3,
                  "scheduler": "warmup_cosine", "postprocess": "val_tuned"},
        # 480 steps of ~0.52 CPU s on the 768-slice demo dataset; 160 px (logits at 40x40) rather than 128 px,
        # paid for by the lighter 128-channel decoder of the `small` SegFormer; per-class threshold and min_area
        # chosen on val (benchmarks/RESULTS.md, "seg2d demo accuracy")
        "demo": {"width": "small", "image_size": 160, "epochs": 8, "batch_size": 8, "lr": 2e-3,
                 "scheduler": "warmup_cosine", "postprocess": "val_tuned"},
        "full": {"arch": "upernet", "model_name_or_path": "openmmlab/upernet-convnext-small", "image_size": 384,
                 "epochs": 6, "batch_size": 32, "lr": 2e-4, "weight_decay": 1e-4, "scheduler": "multistep",
                 "num_workers": 4},
    }

    arch: Literal["segformer", "dpt", "beit", "upernet"] = param("segformer", "model family (seed --base_model)")
    model_name_or_path: str = param("", "hub id or local folder of a pretrained checkpoint; '' = random init")
    width: Literal["tiny", "small"] = param("small", "size of a random-init model")
    image_size: int = param(256, "square model input (pixels); slices are resized to it")
    epochs: int = param(6, "training epochs (seed --epochs)")
    max_steps: int | None = param(None, "stop after this many optimizer steps (None: epochs decide)")
    batch_size: int = param(8, "global batch size (seed --train_batch_size)")
    lr: float = param(2e-4, "peak learning rate (seed --lr)")
    weight_decay: float = param(1e-4, "weight decay (seed --weight_decay)")
    optimizer: Literal["adamw", "adam", "sgd"] = param("adamw", "optimizer (seed --optimizer)")
    scheduler: Literal["constant", "warmup_cosine", "multistep"] = param("multistep", "seed --scheduler_name")
    grad_clip: float | None = param(1.0, "gradient norm clipping (None: off)")
    augment: bool = param(False, "random left-right flips and intensity jitter (flips hide the organs' side)")
    threshold: float = param(0.5, "sigmoid probability above which a pixel belongs to a class")
    min_area: int = param(64, "predicted regions smaller than this (pixels at the slice's own size) are dropped")
    postprocess: Literal["fixed", "val_tuned"] = param(
        "fixed", "'fixed': threshold and min_area for every class; 'val_tuned': each class's threshold and "
                 "min_area chosen on the val split after training (our addition; the test split is never used)")
    num_processes: int = param(1, "processes for data-parallel training (accelerate launch)")
    num_workers: int = param(0, "data-loader worker processes")
    resume: bool = param(False, "continue from the last checkpoint in run_dir")


@dataclasses.dataclass(frozen=True)
class InferConfig(_TrainedModelStage):
    """03_infer: predict masks for a split or a folder of new PNGs and write ``submission.csv``."""

    STAGE = "03_infer"

    input_dir: str = param("", "folder in the Kaggle layout (train/ or test/ case folders) to predict instead of a split")
    threshold: float = param(0.5, "sigmoid probability above which a pixel belongs to a class")
    min_area: int = param(64, "predicted regions smaller than this (pixels at the slice's own size) are dropped")
    postprocess: Literal["from_training", "fixed"] = param(
        "from_training", "'from_training': the per-class threshold and min_area that 02_train chose on val when it "
                         "wrote postprocess.json next to the checkpoint, else threshold/min_area; 'fixed': those two")
    batch_size: int = param(16, "slices per forward pass")
    n_examples: int = param(6, "slices shown in the overlay figure")


@dataclasses.dataclass(frozen=True)
class AttentionConfig(_TrainedModelStage):
    """04_attention: self-attention of the transformer for a query pixel, and prediction vs truth."""

    STAGE = "04_attention"

    slice_id: str = param("", "slice id (e.g. case123_day20_slice_0065); '' = the split's slice with most organ")
    query_organ: Literal["large_bowel", "small_bowel", "stomach"] = param(
        "stomach", "the query pixel is this organ's centre (used when query_point is None)")
    query_point: tuple[float, float] | None = param(None, "query pixel as (row, col) fractions of the slice")
    layer: int = param(-1, "layer whose heads are shown one by one (-1: last)")


# ============================================================================================ 01 preprocess
@dataclasses.dataclass
class PreprocessResult:
    manifest: pd.DataFrame
    manifest_path: Path
    summary: pd.DataFrame  # slices and class prevalence per split
    figure: Any


def preprocess(cfg: PreprocessConfig, run: RunFolder) -> PreprocessResult:
    """Read the dataset at ``cfg.data_root`` (Kaggle layout), write the manifest, summarise, draw samples."""
    from nbsupport.viz import image_grid

    root = resolve_path(cfg.data_root or _demo_root())
    manifest = seg_data.build_manifest(root, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                                       seed=cfg.seed)
    manifest_path = resolve_path(cfg.manifest)
    write_manifest(manifest, manifest_path, seg_data.SEG2D_SCHEMA, root)
    summary = summarise_manifest(manifest)
    atomic_write_text(run.file("manifest_summary.csv"), summary.to_csv())
    run.write_metrics(cfg.STAGE, {"slices": len(manifest), "cases": int(manifest["case"].nunique()),
                                  "sizes": sorted({f"{w}x{h}" for w, h in zip(manifest.width, manifest.height)})})
    sample = _example_rows(manifest, cfg.n_examples, cfg.seed)
    images = [seg_data.read_slice(root / r.image) for r in sample.itertuples()]
    masks = [dict(zip(CLASSES, seg_data.masks_for_row(r))) for r in sample.itertuples()]
    titles = [f"{r.id}\n{r.width}x{r.height} px, {r.pixel_spacing_w:.2f} mm" for r in sample.itertuples()]
    fig = image_grid(images, titles=titles, masks=masks, ncols=3, suptitle="UW-Madison GI tract: sample slices")
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


def _example_rows(manifest: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Slices with at least two organs, taken in turn from each image size, so the figure shows the data's variety."""
    with_organs = manifest[(manifest[[f"rle_{c}" for c in CLASSES]] != "").sum(axis=1) >= 2]
    pool = (with_organs if len(with_organs) >= n else manifest).sample(frac=1.0, random_state=seed)
    turn = pool.groupby(["width", "height"]).cumcount()
    return pool.iloc[np.argsort(turn.to_numpy(), kind="stable")].head(n)


# ============================================================================================ 02 train
def load_manifest(cfg: Any) -> tuple[pd.DataFrame, Path]:
    """The validated slice manifest named by ``cfg.manifest`` and its data root."""
    return read_manifest(resolve_path(cfg.manifest), seg_data.SEG2D_SCHEMA,
                         data_root=resolve_path(cfg.data_root) if cfg.data_root else None)


class Seg2DTrainingTask:
    """What the shared trainer needs from seg2d (see ``nbsupport.train.TrainingTask``)."""

    def __init__(self, config: dict[str, Any], manifest: str, data_root: str, spec_json: str):
        self.cfg = TrainConfig.from_params(config)
        # The notebook validated every file before launching; worker processes need not read them all again.
        frame, root = read_manifest(Path(manifest), seg_data.SEG2D_SCHEMA, data_root=Path(data_root),
                                    check_files=False)
        self.manifest, self.root = frame, root
        self.spec = Seg2DModelSpec.from_json(spec_json)
        self.loss = BCEDiceLoss()

    def build_model(self) -> Seg2DNet:
        torch.manual_seed(self.cfg.seed)
        return model_from_spec(self.spec)

    def train_dataset(self) -> seg_data.SliceDataset:
        return seg_data.SliceDataset(self.manifest[self.manifest.split == "train"], self.root,
                                     image_size=self.cfg.image_size, augment=self.cfg.augment)

    def val_dataset(self) -> seg_data.SliceDataset | None:
        part = self.manifest[self.manifest.split == "val"]
        return seg_data.SliceDataset(part, self.root, image_size=self.cfg.image_size) if len(part) else None

    def training_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss(model(batch["image"]), batch["masks"])

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """Validation loss and mean Dice at model resolution (both-empty pairs skipped, as the competition)."""
        losses, inter, sizes = [], [], []
        for batch in loader:
            logits = model(batch["image"].to(device))
            target = batch["masks"].to(device)
            losses.append(float(self.loss(logits, target)))
            pred = logits.sigmoid() > self.cfg.threshold
            inter.append((pred & (target > 0.5)).flatten(2).sum(-1).cpu())
            sizes.append((pred.flatten(2).sum(-1) + (target > 0.5).flatten(2).sum(-1)).cpu())
        inter_t, sizes_t = torch.cat(inter).float(), torch.cat(sizes).float()
        dice = torch.where(sizes_t > 0, 2 * inter_t / sizes_t.clamp(min=1), torch.nan)
        return {"loss": float(np.mean(losses)), "dice": float(torch.nanmean(dice))}


def training_task(config: dict[str, Any], manifest: str, data_root: str, spec_json: str) -> Seg2DTrainingTask:
    """Factory named in ``launch`` so that every accelerate process rebuilds the same task."""
    return Seg2DTrainingTask(config, manifest, data_root, spec_json)


@dataclasses.dataclass
class TrainOutcome:
    history: list[dict[str, Any]]
    checkpoint: Path
    test_split: str  # "test", or "val" when the manifest has no test cases
    test_metrics: dict[str, float]
    per_class: pd.DataFrame
    curves: Any
    examples: Any
    baselines: pd.DataFrame  # Dice / Hausdorff / score of the model next to no-skill predictors, same slices


def train(cfg: TrainConfig, run: RunFolder) -> TrainOutcome:
    """Train on the manifest's train split, pick the best checkpoint on val, report test Dice and score."""
    from nbsupport.viz import plot_training_curves

    manifest, root = load_manifest(cfg)
    model = build_seg2d_model(cfg.arch, len(CLASSES), cfg.image_size, cfg.model_name_or_path, cfg.width)
    spec = model.spec
    atomic_write_text(run.file("model_spec.json"), spec.to_json())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{cfg.arch} ({spec.source}): {n_params / 1e6:.2f} M parameters, input {cfg.image_size} px")
    settings = TrainSettings(
        epochs=cfg.epochs, max_steps=cfg.max_steps, batch_size=cfg.batch_size,
        lr=cfg.lr, weight_decay=cfg.weight_decay, optimizer=cfg.optimizer, scheduler=cfg.scheduler,
        warmup_steps=_warmup_steps(cfg, manifest), grad_clip=cfg.grad_clip, monitor="val_dice",
        monitor_mode="max", resume=cfg.resume, num_processes=cfg.num_processes, num_workers=cfg.num_workers,
        seed=cfg.seed, log_every=5,
    )
    result = launch("nbsupport.seg2d.pipeline:training_task",
                    {"config": cfg.to_dict(), "manifest": str(resolve_path(cfg.manifest)), "data_root": str(root),
                     "spec_json": spec.to_json()},
                    settings, run.path, config_hash=spec.fingerprint())
    best = Path(result.best_checkpoint or result.last_checkpoint)
    load_weights(model, best, expected_config_hash=spec.fingerprint())
    test_split = "test" if (manifest.split == "test").any() else "val"
    post = PostProcess.fixed(cfg.threshold, cfg.min_area)
    if cfg.postprocess == "val_tuned" and test_split == "test" and (manifest.split == "val").any():
        post = tune_postprocess(model, manifest[manifest.split == "val"], root, cfg.image_size,
                                resolve_device(cfg.device))
    atomic_write_text(run.file(POSTPROCESS_FILE), post.to_json())
    evaluation = evaluate_split(model, manifest[manifest.split == test_split], root, cfg.image_size,
                                post.thresholds, resolve_device(cfg.device), min_area=post.min_areas)
    metrics = {f"{test_split}_{k}": v for k, v in evaluation.scores.items()}
    metrics["postprocess"] = post.to_dict()
    metrics.update({"n_params": n_params, "steps": result.steps, "best_val_dice": result.best_metric,
                    "arch": cfg.arch})
    run.write_metrics(cfg.STAGE, metrics)
    curves = plot_training_curves(result.history)
    run.save_figure(curves, "02_training_curves")
    examples = evaluation.figure(root, n=4)
    run.save_figure(examples, "02_test_predictions")
    keys = ("dice", "hausdorff", "score")
    baselines = baseline_scores(evaluation.manifest, evaluation.truth)
    table = {name: {k: s[k] for k in keys} for name, s in baselines.items()}
    table[f"{cfg.arch} (this run)"] = {k: evaluation.scores[k] for k in keys}
    return TrainOutcome(result.history, best, test_split, metrics, evaluation.per_class, curves, examples,
                        pd.DataFrame(table).T)


def _warmup_steps(cfg: TrainConfig, manifest: pd.DataFrame) -> int:
    steps_per_epoch = max(1, int((manifest.split == "train").sum()) // cfg.batch_size)
    return min(steps_per_epoch, 100) if cfg.scheduler == "warmup_cosine" else 0


# ============================================================================================ evaluation
@dataclasses.dataclass
class SplitEvaluation:
    """Predicted masks at each slice's original size, with scores when ground truth exists."""

    manifest: pd.DataFrame
    pred: list[np.ndarray]  # per slice (3, H, W) bool
    truth: list[np.ndarray] | None
    scores: dict[str, float]
    per_class: pd.DataFrame

    def figure(self, root: Path, n: int = 4) -> Any:
        from nbsupport.viz import compare_masks_grid

        order = _most_organ_slices(self.truth if self.truth is not None else self.pred, n)
        rows = self.manifest.iloc[order]
        images = [seg_data.read_slice(root / r.image) for r in rows.itertuples()]
        truths = [dict(zip(CLASSES, self.truth[i])) for i in order] if self.truth is not None else None
        preds = [dict(zip(CLASSES, self.pred[i])) for i in order]
        return compare_masks_grid(images, preds, truths, titles=list(rows["id"]))


def _most_organ_slices(masks: list[np.ndarray], n: int) -> list[int]:
    area = np.array([m.reshape(m.shape[0], -1).any(-1).sum() * 1e9 + m.sum() for m in masks])
    return [int(i) for i in np.argsort(-area)[:n]]


@torch.no_grad()
def predict_probabilities(model: Seg2DNet, manifest: pd.DataFrame, root: Path, image_size: int,
                          device: torch.device, batch_size: int = 16) -> Any:
    """Yields, per manifest row in order, the (3, H, W) float32 class probabilities at the slice's own size."""
    dataset = seg_data.SliceDataset(manifest, root, image_size=image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    model.eval().to(device)
    sizes = dataset.manifest[["height", "width"]].to_numpy()
    for batch in progress(loader, desc="predict"):
        probs = model(batch["image"].to(device)).sigmoid().float().cpu().numpy()
        for p, index in zip(probs, batch["index"].tolist()):
            height, width = sizes[index]
            yield seg_data.restore_slice_size(p, int(height), int(width))


def predict_slices(model: Seg2DNet, manifest: pd.DataFrame, root: Path, image_size: int,
                   threshold: float | Sequence[float], device: torch.device, batch_size: int = 16,
                   min_area: int | Sequence[int] = 0) -> list[np.ndarray]:
    """Masks (3, H, W) bool per manifest row, at the slice's own size (probabilities resized, then thresholded,
    then regions under ``min_area`` pixels removed). ``threshold`` and ``min_area``: one value for every class,
    or one per class in ``CLASSES`` order."""
    thresholds, min_areas = _per_class(threshold, "threshold"), _per_class(min_area, "min_area")
    return [np.stack([remove_small_regions(p[c] > thresholds[c], min_areas[c]) for c in range(len(CLASSES))])
            for p in predict_probabilities(model, manifest, root, image_size, device, batch_size)]


def _per_class(value: Any, name: str) -> tuple[Any, ...]:
    if isinstance(value, (int, float)):
        return (value,) * len(CLASSES)
    values = tuple(value)
    if len(values) != len(CLASSES):
        raise ValueError(f"{name} must be one value or one per class {CLASSES}, got {values}")
    return values


@dataclasses.dataclass(frozen=True)
class PostProcess:
    """How probabilities become masks: per class (``CLASSES`` order) a threshold and a minimum region area."""

    thresholds: tuple[float, ...]
    min_areas: tuple[int, ...]
    source: str  # "fixed", or "val_tuned" with the val split's Dice under these settings in ``val_dice``
    val_dice: float | None = None

    @classmethod
    def fixed(cls, threshold: float, min_area: int) -> "PostProcess":
        return cls(_per_class(threshold, "threshold"), _per_class(min_area, "min_area"), "fixed")

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "val_dice": self.val_dice,
                **{c: {"threshold": t, "min_area": a} for c, t, a in zip(CLASSES, self.thresholds, self.min_areas)}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> "PostProcess":
        d = json.loads(path.read_text())
        missing = [c for c in CLASSES if c not in d]
        if missing:
            raise ValueError(f"{path}: no entry for class(es) {missing}; expected one per class {CLASSES}")
        return cls(tuple(float(d[c]["threshold"]) for c in CLASSES), tuple(int(d[c]["min_area"]) for c in CLASSES),
                   str(d.get("source", "")), d.get("val_dice"))


def tune_postprocess(model: Seg2DNet, val: pd.DataFrame, root: Path, image_size: int, device: torch.device,
                     thresholds: Sequence[float] = TUNED_THRESHOLDS,
                     min_areas: Sequence[int] = TUNED_MIN_AREAS) -> PostProcess:
    """Predict the val split and choose each class's threshold and min_area on it (see ``choose_postprocess``)."""
    val = val.reset_index(drop=True)
    truth = [seg_data.masks_for_row(r) for r in val.itertuples()]
    probs = predict_probabilities(model, val, root, image_size, device)
    return choose_postprocess(probs, truth, thresholds, min_areas)


def choose_postprocess(probs: Any, truth: Sequence[np.ndarray], thresholds: Sequence[float] = TUNED_THRESHOLDS,
                       min_areas: Sequence[int] = TUNED_MIN_AREAS) -> PostProcess:
    """Each class's threshold and min_area, chosen jointly to maximise the mean Dice of these slices.

    The mean is the competition's: over all (slice, class) pairs, both-empty pairs skipped; so a setting that
    empties a class's false-positive slices also removes them from the mean. Call it on the val split only.

    Args:
        probs: per slice, (C, H, W) probabilities at the slice's size (an iterable: consumed once).
        truth: per slice, (C, H, W) bool ground truth, same order and shapes.
    """
    import cv2

    options = [(t, a) for t in thresholds for a in min_areas]
    totals = np.zeros((len(CLASSES), len(options), 2))  # per class and option: (sum of Dice, scored pairs)
    n_slices = 0
    for prob, true in zip(probs, truth, strict=True):
        n_slices += 1
        for c in range(len(CLASSES)):
            true_area = int(true[c].sum())
            for ti, t in enumerate(thresholds):
                _, labels, stats, _ = cv2.connectedComponentsWithStats((prob[c] > t).astype(np.uint8), connectivity=8)
                area = stats[1:, cv2.CC_STAT_AREA]  # regions 1..n; label 0 is the background
                overlap = np.bincount(labels[true[c]], minlength=len(area) + 1)[1:]
                for ai, min_area in enumerate(min_areas):
                    kept = area >= min_area
                    size = int(area[kept].sum()) + true_area
                    if size:
                        totals[c, ti * len(min_areas) + ai] += (2 * overlap[kept].sum() / size, 1)
    if not n_slices:
        raise ValueError("choose_postprocess got no slices: the val split is empty")

    def mean_dice(pick: tuple[int, ...]) -> float:
        scored = sum(totals[c, o] for c, o in enumerate(pick))
        return float(scored[0] / max(1.0, scored[1]))

    best = max(itertools.product(range(len(options)), repeat=len(CLASSES)), key=mean_dice)
    return PostProcess(tuple(float(options[o][0]) for o in best), tuple(int(options[o][1]) for o in best),
                       "val_tuned", mean_dice(best))


def remove_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Drop 8-connected regions of a bool (H, W) mask smaller than ``min_area`` pixels.

    Specks at the edge of an organ's extent are the usual false positives on slices where the organ is absent;
    each costs a whole Dice of 0 in the competition metric, while a missed speck of a present organ costs little.
    """
    if min_area <= 0 or not mask.any():
        return mask
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= min_area)
    keep = keep[keep > 0]  # label 0 is the background
    return np.isin(labels, keep)


def evaluate_split(model: Seg2DNet, manifest: pd.DataFrame, root: Path, image_size: int,
                   threshold: float | Sequence[float], device: torch.device, batch_size: int = 16,
                   min_area: int | Sequence[int] = 0) -> SplitEvaluation:
    """Predict a split and score it: per-class Dice at full resolution and the competition score."""
    manifest = manifest.reset_index(drop=True)
    pred = predict_slices(model, manifest, root, image_size, threshold, device, batch_size, min_area)
    has_labels = "has_labels" not in manifest or bool(manifest["has_labels"].all())
    if not has_labels or not len(manifest):
        return SplitEvaluation(manifest, pred, None, {}, pd.DataFrame())
    truth = [seg_data.masks_for_row(r) for r in manifest.itertuples()]
    score = competition_score(list(manifest["id"]), pred, truth)
    per_class = pd.DataFrame({"dice": score["dice_per_class"]}).rename_axis("class")
    scores = {"dice": score["dice"], "hausdorff": score["hausdorff"], "score": score["score"]}
    scores.update({f"dice_{c}": float(v) for c, v in score["dice_per_class"].items()})
    return SplitEvaluation(manifest, pred, truth, scores, per_class)


def baseline_scores(manifest: pd.DataFrame, truth: list[np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """Competition scores of two no-skill predictors on a split: all background, and the mean mask.

    The mean mask predicts, on every slice, the pixels that are foreground in at least half of the split's own
    slices (all resized to that slice's size). It sees the evaluated masks, so it is an optimistic baseline.

    Args:
        manifest: the split's rows.
        truth: their (3, H, W) masks when already decoded (e.g. ``SplitEvaluation.truth``); decoded otherwise.
    """
    import cv2

    ids = list(manifest["id"])
    if truth is None:
        truth = [seg_data.masks_for_row(r) for r in manifest.itertuples()]
    mean_by_shape: dict[tuple[int, ...], np.ndarray] = {}
    for shape in {t.shape for t in truth}:
        acc = np.zeros(shape, dtype=np.float64)
        for t in truth:
            acc += t if t.shape == shape else np.stack(
                [cv2.resize(c.astype(np.uint8), (shape[2], shape[1]), interpolation=cv2.INTER_NEAREST) for c in t])
        mean_by_shape[shape] = acc / len(truth) >= 0.5
    return {"all_background": competition_score(ids, [np.zeros_like(t) for t in truth], truth),
            "mean_mask": competition_score(ids, [mean_by_shape[t.shape] for t in truth], truth)}


# ============================================================================================ 03 infer
def load_trained_model(checkpoint_dir: Path) -> Seg2DNet:
    """Rebuild the network from the run's ``model_spec.json`` and load the checkpoint's weights.

    Args:
        checkpoint_dir: ``<run>/checkpoints/best`` (or ``last``); the spec lives in ``<run>/model_spec.json``.
    """
    spec_path = checkpoint_dir.parent.parent / "model_spec.json"
    if not spec_path.exists():
        raise FileNotFoundError(f"{spec_path} is missing: {checkpoint_dir} is not a seg2d checkpoint")
    spec = Seg2DModelSpec.from_json(spec_path.read_text())
    model = model_from_spec(spec)
    load_weights(model, checkpoint_dir, expected_config_hash=spec.fingerprint())
    return model.eval()


@dataclasses.dataclass
class InferResult:
    submission: pd.DataFrame
    submission_path: Path
    scores: dict[str, float]
    figure: Any
    evaluation: SplitEvaluation
    root: Path


def predict(cfg: InferConfig, run: RunFolder) -> InferResult:
    """Predict a split (or ``input_dir``) and write ``submission.csv`` (``id,class,predicted`` with RLE)."""
    checkpoint = find_checkpoint(cfg.checkpoint, run, SYSTEM)
    model = load_trained_model(checkpoint)
    if cfg.input_dir:
        root = resolve_path(cfg.input_dir)
        manifest = seg_data.build_manifest(root, val_fraction=0.0, test_fraction=0.0, seed=cfg.seed)
    else:
        manifest, root = load_manifest(cfg)
        manifest = manifest[manifest.split == cfg.split]
    post = PostProcess.fixed(cfg.threshold, cfg.min_area)
    tuned = checkpoint.parent.parent / POSTPROCESS_FILE
    if cfg.postprocess == "from_training" and tuned.exists():
        post = PostProcess.from_file(tuned)
    print(f"post-processing ({post.source}): thresholds {post.thresholds}, min areas {post.min_areas}")
    evaluation = evaluate_split(model, manifest, root, model.spec.image_size, post.thresholds,
                                resolve_device(cfg.device), cfg.batch_size, post.min_areas)
    submission = submission_table(evaluation.manifest["id"], evaluation.pred)
    path = run.file("submission.csv")
    atomic_write_text(path, submission.to_csv(index=False))
    if evaluation.scores:
        run.write_metrics(cfg.STAGE, {f"{cfg.split}_{k}": v for k, v in evaluation.scores.items()})
    fig = evaluation.figure(root, n=cfg.n_examples)
    run.save_figure(fig, "03_predictions")
    return InferResult(submission, path, evaluation.scores, fig, evaluation, root)


def viewer_cases(result: InferResult, limit: int = 24) -> list[dict[str, Any]]:
    """Cases for ``viz.slice_viewer``: each slice with its predicted (and true) masks, most organ first."""
    ev = result.evaluation
    order = _most_organ_slices(ev.truth if ev.truth is not None else ev.pred, limit)
    cases = []
    for i in order:
        row = ev.manifest.iloc[i]
        masks = {f"pred {c}": ev.pred[i][k] for k, c in enumerate(CLASSES)}
        if ev.truth is not None:
            masks.update({f"true {c}": ev.truth[i][k] for k, c in enumerate(CLASSES)})
        cases.append({"image": seg_data.read_slice(result.root / row["image"]), "masks": masks, "title": row["id"],
                      "text": f"{row['width']}x{row['height']} px, spacing {row['pixel_spacing_w']:.2f} mm",
                      "spacing": (float(row["pixel_spacing_h"]), float(row["pixel_spacing_w"])), "modality": "MR"})
    return cases


def submission_table(ids: Any, pred: list[np.ndarray]) -> pd.DataFrame:
    """Kaggle submission rows: one per slice and class, ``predicted`` = RLE ('' for an empty mask)."""
    rows = [(i, c, seg_data.rle_encode(m[k])) for i, m in zip(ids, pred) for k, c in enumerate(CLASSES)]
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


def attention_maps(cfg: AttentionConfig, run: RunFolder) -> AttentionResult:
    """Self-attention of every transformer layer for one query pixel, over the chosen slice."""
    from nbsupport.viz import attention_grid

    checkpoint = find_checkpoint(cfg.checkpoint, run, SYSTEM)
    model = load_trained_model(checkpoint)
    if model.spec.arch == "upernet":
        raise ValueError("upernet uses a ConvNeXt backbone, which has no self-attention to show; "
                         "train segformer, beit or dpt for 04_attention")
    manifest, root = load_manifest(cfg)
    part = manifest[manifest.split == cfg.split].reset_index(drop=True)
    if cfg.slice_id:
        if cfg.slice_id not in set(part["id"]):
            raise ValueError(f"slice_id {cfg.slice_id!r} is not in the {cfg.split} split of {cfg.manifest}")
        row_index = int(np.flatnonzero(part["id"] == cfg.slice_id)[0])
    else:
        row_index = _most_organ_slices([seg_data.masks_for_row(r) for r in part.itertuples()], 1)[0]
    dataset = seg_data.SliceDataset(part.iloc[[row_index]], root, image_size=model.spec.image_size)
    item = dataset[0]
    size = model.spec.image_size
    if cfg.query_point is not None:
        query = (int(cfg.query_point[0] * (size - 1)), int(cfg.query_point[1] * (size - 1)))
    else:
        organ = item["masks"][CLASSES.index(cfg.query_organ)].numpy() > 0.5
        rows_, cols_ = np.nonzero(organ) if organ.any() else (np.array([size // 2]), np.array([size // 2]))
        query = (int(np.median(rows_)), int(np.median(cols_)))
    with torch.no_grad():
        logits, attentions = model(item["image"][None], output_attentions=True)
    layer_maps, head_maps = query_attention(attentions, model.spec, query, size, cfg.layer)
    image = item["image"][0].numpy()
    layers_fig = attention_grid(image, layer_maps, ncols=4, query_point=query)
    heads_fig = attention_grid(image, head_maps, ncols=4, query_point=query)
    run.save_figure(layers_fig, "04_attention_layers")
    run.save_figure(heads_fig, "04_attention_heads")
    pred = (logits.sigmoid()[0] > 0.5).numpy()
    truth = item["masks"].numpy() > 0.5
    from nbsupport.viz import compare_masks_grid

    overlay_fig = compare_masks_grid([image], [dict(zip(CLASSES, pred))], [dict(zip(CLASSES, truth))],
                                     titles=[str(part.iloc[row_index]["id"])])
    run.save_figure(overlay_fig, "04_prediction_vs_truth")
    row = part.iloc[row_index]
    spacing = (float(row["height"]) * float(row["pixel_spacing_h"]) / size,
               float(row["width"]) * float(row["pixel_spacing_w"]) / size)
    return AttentionResult(str(row["id"]), query, layer_maps, head_maps, image, layers_fig, heads_fig, overlay_fig,
                           pred, truth, spacing)


def attention_viewer_cases(att: AttentionResult, heads: bool = False) -> list[dict[str, Any]]:
    """Cases for ``viz.slice_viewer`` / ``viz.save_case_viewer_html``: the slice once per layer (or per head of the
    chosen layer), with that map as the heatmap and the predicted and true masks."""
    masks: dict[str, np.ndarray] = {}
    if att.pred is not None:
        masks.update({f"pred {c}": att.pred[k] for k, c in enumerate(CLASSES)})
    if att.truth is not None:
        masks.update({f"true {c}": att.truth[k] for k, c in enumerate(CLASSES)})
    row, col = att.query_point
    return [{"image": att.image, "masks": masks, "attention": amap, "spacing": att.spacing, "modality": "MR",
             "title": title, "text": f"{att.slice_id}\nattention of the query pixel (row {row}, col {col}) over the "
                                     f"slice: {title}, {'one head' if heads else 'mean of the heads'}; "
                                     f"key grid {amap.shape[0]}x{amap.shape[1]}"}
            for title, amap in (att.head_maps if heads else att.layer_maps)]


def query_attention(attentions: tuple[torch.Tensor, ...], spec: Seg2DModelSpec, query: tuple[int, int],
                    image_size: int, layer: int = -1) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray]]]:
    """Attention of the query pixel over the image, per layer (mean of heads) and per head of ``layer``.

    SegFormer's efficient attention has queries on each stage's grid (stride 4, 8, 16, 32) and keys/values on
    a grid reduced by the stage's spatial-reduction ratio; BEiT and DPT attend over 16-pixel patches plus a
    [CLS] token, which is dropped here.

    Returns:
        Two lists of (title, (h, w) map) pairs; maps are over the key grid of their layer.
    """
    cfg = spec.hf_config
    maps: list[tuple[str, torch.Tensor]] = []  # (title, (heads, h_kv, w_kv))
    if spec.arch == "segformer":
        depths, strides = cfg["depths"], cfg["strides"]
        k, stride = 0, 1
        for stage, depth in enumerate(depths):
            stride *= strides[stage]
            grid = -(-image_size // stride)
            q_index = min(query[0] // stride, grid - 1) * grid + min(query[1] // stride, grid - 1)
            for block in range(depth):
                att = attentions[k][0]  # (heads, grid*grid, kv*kv): keys on the grid reduced by sr_ratio
                side = int(round(att.shape[-1] ** 0.5))
                maps.append((f"stage {stage + 1} block {block + 1}", att[:, q_index].reshape(-1, side, side)))
                k += 1
    else:
        patch = cfg["patch_size"]
        grid = image_size // patch
        q_index = 1 + min(query[0] // patch, grid - 1) * grid + min(query[1] // patch, grid - 1)
        for i, att in enumerate(attentions):
            att = att[0]  # (heads, 1 + grid*grid, 1 + grid*grid)
            maps.append((f"layer {i + 1}", att[:, q_index, 1:].reshape(-1, grid, grid)))
    layer_maps = [(title, m.mean(0).numpy()) for title, m in maps]
    title, chosen = maps[layer]
    head_maps = [(f"{title} head {h + 1}", chosen[h].numpy()) for h in range(chosen.shape[0])]
    return layer_maps, head_maps
