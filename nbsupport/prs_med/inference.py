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

from nbsupport.metrics import most_frequent_position_baseline, parse_position, position_accuracy, segmentation_metrics
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
    overall: dict[str, float]


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
    per_task = per_task_table(predictions, manifest)
    overall = {k: float(v) for k, v in per_task.loc["all"].items() if isinstance(v, (int, float, np.number))}
    overall["most_frequent_position"] = most_frequent_position_baseline(train_positions, part["position"])["position"]
    return SplitEvaluation(part, predictions, masks, per_task, overall)


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
