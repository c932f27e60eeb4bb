"""Answering, segmenting and scoring with a trained PRS-Med network; and where it looks while doing so.

:func:`evaluate_split` is what 02_train (on the test split) and 03_infer (on any split) run; :func:`answer_image`
answers one image; :func:`explain_answer` gives 04_attention's maps over the image for one question.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch

from nbsupport.metrics import (
    most_frequent_position_baseline, paired_bootstrap_diff, parse_position, segmentation_metrics, with_ci95,
)
from nbsupport.progress import progress
from nbsupport.prs_med.data import PositionQADataset, collate_qa, image_to_tensor, position_of, read_mask
from nbsupport.prs_med.model import ImageOnlySegmenter, PRSMedNet, PRSMedOutput

PREDICTION_COLUMNS = ("image_path", "question", "answer", "pred_answer", "pred_position", "dice", "iou", "hd95")
POSITION_WORDS = ("top", "bottom", "left", "right", "center")


def restore_probability(prob: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """A model-resolution probability map resized (bilinear) to the image's (H, W), as the official evaluation."""
    return cv2.resize(prob.float().cpu().numpy(), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


# ---------------------------------------------------------------------------------------------- a split
@dataclasses.dataclass
class SplitEvaluation:
    """Answers, masks (at each image's own size) and scores of a split."""

    manifest: pd.DataFrame  # the split's rows, indexed 0..n-1 like predictions and pred_masks
    predictions: pd.DataFrame  # PREDICTION_COLUMNS + task, position, mask_position, ... per row
    pred_masks: list[np.ndarray]
    per_task: pd.DataFrame
    overall: dict[str, Any]  # the "all" row of the per-task scores, each metric with its "<metric>_ci95"
    scores: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # per task + "all", with _ci95
    comparisons: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # paired_comparisons


def _prediction_record(row: pd.Series, said: str, pred: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """One row of ``predictions.csv``: the answer, its parsed position, the mask's scores and implied position."""
    seg = segmentation_metrics(pred[None, None], truth[None, None]).iloc[0]
    mask_position = position_of(pred).position if pred.any() else ""
    pred_position = parse_position(said) or ""
    return {"image_path": row["image"], "question": row["question"], "answer": row["answer"],
            "pred_answer": said, "pred_position": pred_position, "dice": float(seg["dice"]),
            "iou": float(seg["iou"]), "hd95": float(seg["hd95"]), "id": row["id"],
            "task": row["task"], "position": row["position"], "mask_position": mask_position,
            "position_correct": pred_position == row["position"],
            "mask_position_correct": mask_position == row["position"],
            "answer_mask_agree": bool(pred_position) and pred_position == mask_position}


@torch.no_grad()
def evaluate_split(model: PRSMedNet, manifest: pd.DataFrame, split: str, root: Path, device: torch.device,
                   batch_size: int = 16, threshold: float = 0.5, max_new_tokens: int = 24,
                   baseline: ImageOnlySegmenter | None = None) -> SplitEvaluation:
    """Answer and segment every row of ``split``; score masks (Dice, IoU, HD95 in px at the image's size) and the
    position parsed from each generated answer, per task, next to the baselines.

    Baselines: the image-only decoder's Dice (when given) and "always the most frequent training position".
    """
    part = manifest[manifest.split == split].reset_index(drop=True)
    loader = torch.utils.data.DataLoader(PositionQADataset(part, root, model.spec.image_size), batch_size=batch_size,
                                         shuffle=False, collate_fn=collate_qa)
    model.eval().to(device)
    if baseline is not None:
        baseline.eval().to(device)
    masks: list[np.ndarray] = []
    base_dice: list[float] = []
    records: list[dict[str, Any]] = []
    for batch in progress(loader, desc=f"answer + segment {split}"):
        images = batch["image"].to(device)
        said, probs = model.answer_and_segment(images, batch["question"], max_new_tokens)
        base_probs = baseline(images).sigmoid() if baseline is not None else None
        for k, index in enumerate(batch["index"].tolist()):
            row = part.iloc[index]
            truth = read_mask(root / row["mask"])
            pred = restore_probability(probs[k, 0], truth.shape) > threshold
            masks.append(pred)
            records.append(_prediction_record(row, said[k], pred, truth))
            if base_probs is not None:
                base = restore_probability(base_probs[k, 0], truth.shape) > threshold
                base_dice.append(float(segmentation_metrics(base[None, None], truth[None, None]).iloc[0]["dice"]))
    predictions = pd.DataFrame(records)
    if baseline is not None:
        predictions["image_only_dice"] = base_dice
    train_positions = list(manifest.loc[manifest.split == "train", "position"]) or list(part["position"])
    scores = task_scores(predictions, manifest)
    overall = dict(scores["all"])  # "n" stays a count (int): metrics.json gives intervals to metrics only
    overall["most_frequent_position"] = most_frequent_position_baseline(train_positions, part["position"])["position"]
    return SplitEvaluation(part, predictions, masks, score_table(scores), overall, scores,
                           paired_comparisons(predictions, overall["most_frequent_position"]))


def _nanmean(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


def per_case_scores(predictions: pd.DataFrame, most_frequent: str) -> dict[str, np.ndarray]:
    """Each metric of the per-task table as one value per row of ``predictions`` (NaN where undefined, e.g. HD95
    with an empty mask): the metric is their NaN-mean, and the bootstrap resamples them.

    Position accuracy compares the position parsed from the generated answer with the true one (an answer naming
    none is wrong); the most-frequent baseline answers ``most_frequent`` for every row.
    """
    said = [parse_position(p) for p in predictions["pred_answer"]]
    truth = [parse_position(t) for t in predictions["position"]]
    bad = [i for i, t in enumerate(truth) if t is None]
    if bad:
        raise ValueError(f"true position {predictions['position'].iloc[bad[0]]!r} (row {bad[0]}) names no position")
    values = {"dice": predictions["dice"], "iou": predictions["iou"], "hd95_px": predictions["hd95"],
              "position_accuracy": [s == t for s, t in zip(said, truth)],
              "mask_position_accuracy": predictions["mask_position_correct"],
              "answer_mask_agreement": predictions["answer_mask_agree"],
              "baseline_most_frequent_position_accuracy": [t == most_frequent for t in truth]}
    if "image_only_dice" in predictions:
        values["baseline_image_only_dice"] = predictions["image_only_dice"]
    return {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}


def task_scores(predictions: pd.DataFrame, manifest: pd.DataFrame, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per task and overall ("all"): n, Dice, IoU, HD95 (px), position accuracy of the answers, of the mask's
    implied position, how often the two agree, and the baselines' numbers on the same rows; each metric with its
    seeded 95 % bootstrap interval over the rows (``<metric>_ci95``). The most-frequent-position baseline takes
    the task's own training positions (all training positions for "all")."""
    train_positions = list(manifest.loc[manifest.split == "train", "position"]) or list(predictions["position"])
    scores = {}
    groups = [(task, g) for task, g in predictions.groupby("task", sort=True)] + [("all", predictions)]
    for task, g in groups:
        task_train = [p for p, t in zip(manifest.position, manifest.task) if t == task and p] if task != "all" else []
        most_frequent = most_frequent_position_baseline(task_train or train_positions, list(g["position"]))
        per_case = per_case_scores(g, most_frequent["position"])
        point = {"n": len(g)} | {k: _nanmean(v) for k, v in per_case.items()}
        scores[task] = with_ci95(point, per_case, seed=seed)
    return scores


def score_table(scores: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The numbers of :func:`task_scores` as a table, one row per task (intervals left out)."""
    return pd.DataFrame.from_dict({task: {k: v for k, v in row.items() if not k.endswith("_ci95")}
                                   for task, row in scores.items()}, orient="index")


def per_task_table(predictions: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """:func:`task_scores` as a table (see there)."""
    return score_table(task_scores(predictions, manifest))


def paired_comparisons(predictions: pd.DataFrame, most_frequent: str, seed: int = 0) -> dict[str, dict[str, Any]]:
    """The model against its baselines on the same rows, as paired bootstrap differences ``{"diff", "ci95"}``:
    Dice minus the image-only decoder's Dice (where it was trained) and position accuracy minus always answering
    ``most_frequent`` (the most frequent training position)."""
    per_case = per_case_scores(predictions, most_frequent)
    pairs = {"position_accuracy_minus_most_frequent_position":
             ("position_accuracy", "baseline_most_frequent_position_accuracy")}
    if "baseline_image_only_dice" in per_case:
        pairs = {"dice_minus_image_only_dice": ("dice", "baseline_image_only_dice")} | pairs
    out = {}
    for name, (a, b) in pairs.items():
        diff, low, high = paired_bootstrap_diff(per_case[a], per_case[b], seed=seed)
        out[name] = {"diff": diff, "ci95": [None if np.isnan(v) else v for v in (low, high)]}
    return out


# ---------------------------------------------------------------------------------------------- one image
def answer_image(model: PRSMedNet, image: np.ndarray, question: str, threshold: float = 0.5,
                 max_new_tokens: int = 24) -> dict[str, Any]:
    """Answer ``question`` about one uint8 RGB image (H, W, 3) and segment the finding.

    Returns:
        ``{"answer", "position" (parsed from the answer), "mask" (bool (H, W)), "mask_position"}``.
    """
    device = next(model.parameters()).device
    tensor = image_to_tensor(image, model.spec.image_size)[None].to(device)
    answers, probs = model.answer_and_segment(tensor, [question], max_new_tokens)
    mask = restore_probability(probs[0, 0], image.shape[:2]) > threshold
    return {"answer": answers[0], "position": parse_position(answers[0]), "mask": mask,
            "mask_position": position_of(mask).position if mask.any() else None}


@dataclasses.dataclass
class Explanation:
    """Where the network looked while answering one question about one image."""

    answer: str  # the generated answer (greedy)
    output: PRSMedOutput  # the teacher-forced pass over question + answer, with attentions
    decoder_maps: list[tuple[str, np.ndarray]]  # (token, (g, g) cross-attention of the image over it)
    vlm_maps: list[tuple[str, np.ndarray]]  # (LM layer, (side, side) attention of the answer over image patches)


@torch.no_grad()
def explain_answer(model: PRSMedNet, image: np.ndarray, question: str, max_new_tokens: int = 24) -> Explanation:
    """Generate the answer, then run question + answer once more with attentions (eager attention: sdpa returns no
    weights) and read the maps over the image (:func:`attention_over_image`). On the CPU."""
    tensor = image_to_tensor(image, model.spec.image_size)[None]
    said = model.generate_answers(tensor, [question], max_new_tokens)[0]
    enc = model.encode([question], [said])
    model.llava.model.language_model.set_attn_implementation("eager")
    out = model(tensor, enc["input_ids"], enc["attention_mask"], return_attention=True)
    decoder_maps, vlm_maps = attention_over_image(model, out, enc["input_ids"][0], enc["labels"][0])
    return Explanation(said, out, decoder_maps, vlm_maps)


def attention_over_image(model: PRSMedNet, out: Any, input_ids: torch.Tensor, labels: torch.Tensor
                         ) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray]]]:
    """Maps of attention over the image for one sample.

    Decoder: the image tokens are the queries of the cross-attention (g*g, T); the map of a prompt token is its
    column, reshaped to the encoder grid: first the mean over the question's tokens, then the answer's position
    words and the individual question words. VLM: per LM layer, the mean over heads and answer tokens of their
    attention to the image-token positions, reshaped to the vision tower's patch grid.
    """
    tok = model.tokenizer
    cross = out.cross_attention[0]  # (g*g, T)
    side = round(cross.shape[0] ** 0.5)  # the encoder's square grid
    is_image = input_ids == model.image_token_id
    is_answer = labels != -100
    words = [tok.decode([int(t)]).strip() for t in input_ids]
    question_positions = [i for i in range(len(words)) if not is_image[i] and not is_answer[i] and words[i]
                          and words[i] not in ("###", "User", "Assistant", ":", "\n")]
    decoder_maps = [("question (mean)", cross[:, question_positions].mean(-1).reshape(side, side).numpy())]
    answer_positions = [i for i in range(len(words)) if is_answer[i] and words[i].lower() in POSITION_WORDS]
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
