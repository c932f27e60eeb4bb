"""seg2d compute helpers behind the verbs: predicting a split, post-processing, scoring, attention of a pixel.

Probabilities are predicted at model resolution and resized back to each slice's own size
(:func:`predict_probabilities`); :class:`PostProcess` turns them into masks (a threshold and a minimum region area
per class, fixed or chosen on the val split by :func:`choose_postprocess`); :func:`evaluate_split` scores the masks
with the competition metric and a 95 % bootstrap interval over cases, :func:`compare_with_baselines` the model
with no-skill predictors on the same slices (paired bootstrap of the difference).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nbsupport.metrics import format_ci, paired_bootstrap_diff, with_ci95
from nbsupport.progress import progress
from nbsupport.seg2d import data as seg_data
from nbsupport.seg2d.data import CLASSES
from nbsupport.seg2d.model import Seg2DModelSpec, Seg2DNet
from nbsupport.seg2d.scoring import CaseParts, case_parts, competition_score, pooled_score

POSTPROCESS_FILE = "postprocess.json"  # in the run folder, next to model_spec.json
# The grid `postprocess="val_tuned"` searches, per class, on the val split.
TUNED_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
TUNED_MIN_AREAS = (0, 32, 64, 128, 256, 512)
# The no-skill predictors every evaluation is compared with, and how the run index names them.
BASELINE_LABELS = {"all_background": "all-background prediction", "mean_mask": "mean-mask prediction"}


# ============================================================================================ prediction
@torch.no_grad()
def predict_probabilities(model: Seg2DNet, manifest: pd.DataFrame, root: Path, image_size: int,
                          device: torch.device, batch_size: int = 16) -> Iterator[np.ndarray]:
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


@torch.no_grad()
def slice_probabilities(model: Seg2DNet, image: np.ndarray, device: torch.device) -> np.ndarray:
    """(3, H, W) float32 class probabilities of one raw slice (H, W), at its own size, preprocessed exactly as
    :class:`~nbsupport.seg2d.data.SliceDataset` does (per-slice percentile scaling, area resize to the model's
    input size, held at ``MODEL_INPUT_DTYPE``)."""
    size = model.spec.image_size
    x = seg_data.slice_to_model_input(image, size).astype(seg_data.MODEL_INPUT_DTYPE).astype(np.float32)
    probs = model(torch.from_numpy(x)[None, None].to(device)).sigmoid().float().cpu().numpy()[0]
    return seg_data.restore_slice_size(probs, *image.shape)


def predict_slices(model: Seg2DNet, manifest: pd.DataFrame, root: Path, image_size: int,
                   threshold: float | Sequence[float], device: torch.device, batch_size: int = 16,
                   min_area: int | Sequence[int] = 0) -> list[np.ndarray]:
    """Masks (3, H, W) bool per manifest row, at the slice's own size (probabilities resized, then thresholded,
    then regions under ``min_area`` pixels removed). ``threshold`` and ``min_area``: one value for every class,
    or one per class in ``CLASSES`` order."""
    post = PostProcess(_per_class(threshold, "threshold"), _per_class(min_area, "min_area"), "given")
    return [post.masks(p) for p in predict_probabilities(model, manifest, root, image_size, device, batch_size)]


def _per_class(value: Any, name: str) -> tuple[Any, ...]:
    if isinstance(value, (int, float)):
        return (value,) * len(CLASSES)
    values = tuple(value)
    if len(values) != len(CLASSES):
        raise ValueError(f"{name} must be one value or one per class {CLASSES}, got {values}")
    return values


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


# ============================================================================================ post-processing
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

    def masks(self, probabilities: np.ndarray) -> np.ndarray:
        """(C, H, W) probabilities -> bool (C, H, W) masks: each class thresholded, then its small regions dropped."""
        return np.stack([remove_small_regions(probabilities[c] > self.thresholds[c], self.min_areas[c])
                         for c in range(len(CLASSES))])

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


# ============================================================================================ scoring
@dataclasses.dataclass
class SplitEvaluation:
    """Predicted masks at each slice's original size, with scores when ground truth exists."""

    manifest: pd.DataFrame
    pred: list[np.ndarray]  # per slice (3, H, W) bool
    truth: list[np.ndarray] | None
    scores: dict[str, Any]  # dice, hausdorff, score, dice_<class>, each with its <metric>_ci95 [low, high]; n_cases
    per_class: pd.DataFrame  # Dice per class, "0.80 (0.74–0.85)"
    parts: list[CaseParts] | None = None  # per case: what the intervals resample


def evaluate_split(model: Seg2DNet, manifest: pd.DataFrame, root: Path, image_size: int,
                   threshold: float | Sequence[float], device: torch.device, batch_size: int = 16,
                   min_area: int | Sequence[int] = 0) -> SplitEvaluation:
    """Predict a split and score it: per-class Dice at full resolution and the competition score, each with its
    95 % bootstrap interval over cases (see :func:`scores_with_ci95`)."""
    manifest = manifest.reset_index(drop=True)
    pred = predict_slices(model, manifest, root, image_size, threshold, device, batch_size, min_area)
    has_labels = "has_labels" not in manifest or bool(manifest["has_labels"].all())
    if not has_labels or not len(manifest):
        return SplitEvaluation(manifest, pred, None, {}, pd.DataFrame())
    truth = [seg_data.masks_for_row(r) for r in manifest.itertuples()]
    score = competition_score(list(manifest["id"]), pred, truth)
    parts = case_parts(list(manifest["id"]), pred, truth)
    scores = {"dice": score["dice"], "hausdorff": score["hausdorff"], "score": score["score"]}
    scores.update({f"dice_{c}": float(v) for c, v in score["dice_per_class"].items()})
    scores = {**scores_with_ci95(scores, parts), "n_cases": len(parts)}  # the cases the intervals resample
    per_class = pd.DataFrame({"Dice (95% CI)": {c: format_ci(scores[f"dice_{c}"], scores[f"dice_{c}_ci95"], 3)
                                                for c in CLASSES}}).rename_axis("class")
    return SplitEvaluation(manifest, pred, truth, scores, per_class, parts)


def scores_with_ci95(scores: dict[str, Any], parts: Sequence[CaseParts]) -> dict[str, Any]:
    """``scores`` (keys of :func:`nbsupport.seg2d.scoring.pooled_score`) with ``<metric>_ci95`` after each: the
    seeded 95 % percentile bootstrap over cases (:func:`nbsupport.metrics.with_ci95`), the score recomputed on each
    resample of whole cases."""
    return with_ci95(scores, pooled_score, list(parts))


def baseline_predictions(manifest: pd.DataFrame, truth: list[np.ndarray] | None = None
                         ) -> dict[str, list[np.ndarray]]:
    """Masks of two no-skill predictors for a split's slices: all background, and the mean mask.

    The mean mask predicts, on every slice, the pixels that are foreground in at least half of the split's own
    slices (all resized to that slice's size). It sees the evaluated masks, so it is an optimistic baseline.

    Args:
        manifest: the split's rows.
        truth: their (3, H, W) masks when already decoded (e.g. ``SplitEvaluation.truth``); decoded otherwise.
    """
    import cv2

    if truth is None:
        truth = [seg_data.masks_for_row(r) for r in manifest.itertuples()]
    mean_by_shape: dict[tuple[int, ...], np.ndarray] = {}
    for shape in {t.shape for t in truth}:
        acc = np.zeros(shape, dtype=np.float64)
        for t in truth:
            acc += t if t.shape == shape else np.stack(
                [cv2.resize(c.astype(np.uint8), (shape[2], shape[1]), interpolation=cv2.INTER_NEAREST) for c in t])
        mean_by_shape[shape] = acc / len(truth) >= 0.5
    return {"all_background": [np.zeros_like(t) for t in truth],
            "mean_mask": [mean_by_shape[t.shape] for t in truth]}


def baseline_scores(manifest: pd.DataFrame, truth: list[np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """Competition scores (:func:`competition_score`) of the :func:`baseline_predictions` on a split."""
    if truth is None:
        truth = [seg_data.masks_for_row(r) for r in manifest.itertuples()]
    ids = list(manifest["id"])
    return {name: competition_score(ids, pred, truth) for name, pred in baseline_predictions(manifest, truth).items()}


@dataclasses.dataclass
class BaselineComparison:
    """The model next to the no-skill predictors on the same slices."""

    scores: dict[str, dict[str, Any]]  # per baseline: dice, hausdorff, score, dice_<class>, each with its _ci95
    best: str  # the baseline with the highest Dice
    differences: dict[str, dict[str, Any]]  # "dice_minus_<best>" / "score_minus_<best>": {"diff", "ci95"}
    table: pd.DataFrame  # Dice, Hausdorff and score of each baseline and the model, "0.80 (0.74–0.85)"

    def metrics(self, prefix: str) -> dict[str, Any]:
        """What metrics.json records: ``<prefix>_baselines``, ``<prefix>_best_baseline`` and the differences."""
        return {f"{prefix}_baselines": self.scores, f"{prefix}_best_baseline": self.best,
                **{f"{prefix}_{k}": v for k, v in self.differences.items()}}


def compare_with_baselines(evaluation: SplitEvaluation, model_name: str = "model") -> BaselineComparison:
    """Score the no-skill predictors on the evaluated slices (with intervals over cases) and the model's Dice and
    score minus the best one's (highest Dice), with the paired bootstrap interval of each difference: both sides
    resampled with the same cases (:func:`nbsupport.metrics.paired_bootstrap_diff`)."""
    if evaluation.truth is None or evaluation.parts is None:
        raise ValueError("compare_with_baselines needs an evaluation with ground truth")
    ids = list(evaluation.manifest["id"])
    parts, scores = {}, {}
    for name, pred in baseline_predictions(evaluation.manifest, evaluation.truth).items():
        parts[name] = case_parts(ids, pred, evaluation.truth)
        scores[name] = scores_with_ci95(pooled_score(parts[name]), parts[name])
    best = max(scores, key=lambda name: scores[name]["dice"] or 0.0)
    differences = {}
    for key in ("dice", "score"):
        diff, low, high = paired_bootstrap_diff((evaluation.parts,), (parts[best],),
                                                metric=lambda p, key=key: pooled_score(p)[key])
        differences[f"{key}_minus_{best}"] = {"diff": diff, "ci95": [low, high]}
    rows = {**scores, model_name: evaluation.scores}
    table = pd.DataFrame({name: {k: format_ci(s[k], s.get(f"{k}_ci95"), 3) for k in ("dice", "hausdorff", "score")}
                          for name, s in rows.items()}).T
    return BaselineComparison(scores, best, differences, table)


def most_organ_slices(masks: list[np.ndarray], n: int) -> list[int]:
    """Indices of the ``n`` slices with the most organs present, then the most organ pixels."""
    area = np.array([m.reshape(m.shape[0], -1).any(-1).sum() * 1e9 + m.sum() for m in masks])
    return [int(i) for i in np.argsort(-area)[:n]]


# ============================================================================================ attention
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
