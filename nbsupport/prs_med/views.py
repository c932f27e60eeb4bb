"""What prs_med shows: the figures of the four notebooks, the cases of the slice viewer, and the offline HTML views
the 03/04 verbs write into the run folder (``03_case_viewer.html``, ``04_attention_viewer.html``).

Images are drawn in colour (endoscopy and dermoscopy are photographs; grey scans are repeated over the channels).
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from nbsupport.metrics import format_ci, format_with_ci
from nbsupport.prs_med.data import read_image, read_mask
from nbsupport.runs import RunFolder

if TYPE_CHECKING:
    from nbsupport.prs_med.inference import SplitEvaluation
    from nbsupport.prs_med.pipeline import AttentionResult, InferResult

CASE_VIEWER = "03_case_viewer.html"
ATTENTION_VIEWER = "04_attention_viewer.html"


def wrap(text: str, width: int) -> str:
    """The first two lines of ``text`` wrapped at ``width`` characters (figure titles)."""
    return "\n".join(textwrap.wrap(str(text), width)[:2])


def _rows_per_task(manifest: pd.DataFrame, n: int) -> list[Any]:
    """Index labels of up to ``n`` rows of ``manifest``, the same number from each task (tasks sorted)."""
    per_task = max(1, n // max(1, manifest.task.nunique()))
    return list(manifest.groupby("task", sort=True).head(per_task).index[:n])


# ---------------------------------------------------------------------------------------------- tables
def scores_table(evaluation: "SplitEvaluation", digits: int = 3) -> pd.DataFrame:
    """02/03: per task and overall, n and each metric as ``0.800 (0.740–0.850)`` (its 95 % bootstrap interval)."""
    rows = {task: {"n": int(scores["n"])} | format_with_ci(scores, digits)
            for task, scores in evaluation.scores.items()}
    return pd.DataFrame.from_dict(rows, orient="index")


def comparisons_table(evaluation: "SplitEvaluation", digits: int = 3) -> pd.DataFrame:
    """02/03: the model minus each baseline on the same rows, with the paired 95 % bootstrap interval."""
    rows = {name: {"difference": format_ci(c["diff"], c["ci95"], digits)}
            for name, c in evaluation.comparisons.items()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("model minus baseline")


# ---------------------------------------------------------------------------------------------- figures
def examples_figure(manifest: pd.DataFrame, root: Path, n_examples: int) -> Any:
    """01: ``n_examples`` images of each task with their mask, position and question."""
    from nbsupport.viz import image_grid

    sample = manifest.groupby("task", sort=True).head(n_examples)
    images = [read_image(root / r.image) for r in sample.itertuples()]
    masks = [{"finding": read_mask(root / r.mask)} for r in sample.itertuples()]
    titles = [f"{r.task}\n{r.position}: {wrap(r.question, 34)}" for r in sample.itertuples()]
    return image_grid(images, titles=titles, masks=masks, ncols=max(2, n_examples * 2),
                      suptitle="PRS-Med: examples per task (mask and the position it implies)")


def predictions_figure(evaluation: "SplitEvaluation", root: Path, n: int = 6) -> Any:
    """02/03: predicted vs true mask with the true position and the one the answer gave, for ``n`` rows."""
    from nbsupport.viz import compare_masks_grid

    rows = evaluation.manifest
    order = _rows_per_task(rows, n)
    images = [read_image(root / rows.loc[i, "image"]) for i in order]
    truths = [{"finding": read_mask(root / rows.loc[i, "mask"])} for i in order]
    preds = [{"finding": evaluation.pred_masks[i]} for i in order]
    titles = [f"{rows.loc[i, 'task']}\ntrue: {rows.loc[i, 'position']} | "
              f"said: {evaluation.predictions.loc[i, 'pred_position'] or '?'}" for i in order]
    return compare_masks_grid(images, preds, truths, titles=titles)


def single_image_figure(image: np.ndarray, mask: np.ndarray, question: str, answer: str) -> Any:
    """03: one image with its predicted mask, the question and the answer."""
    from nbsupport.viz import overlay_masks

    fig = overlay_masks(image, {"predicted": mask}, title=f"Q: {question}\nA: {answer}")
    return getattr(fig, "figure", fig)


def attention_figures(image: np.ndarray, image_size: int, decoder_maps: list[tuple[str, np.ndarray]],
                      vlm_maps: list[tuple[str, np.ndarray]]) -> tuple[Any, Any]:
    """04: the decoder's and the VLM's maps over the image as the network saw it (``image_size`` square)."""
    import cv2

    from nbsupport.viz import attention_grid

    shown = cv2.resize(image, (image_size, image_size))
    return attention_grid(shown, decoder_maps, ncols=4), attention_grid(shown, vlm_maps, ncols=4)


def prediction_vs_truth_figure(image: np.ndarray, pred: np.ndarray, truth: np.ndarray, question: str, answer: str,
                               said: str) -> Any:
    """04: predicted vs true mask with the question, the reference and the generated answer."""
    from nbsupport.viz import compare_masks_grid

    return compare_masks_grid([image], [{"finding": pred}], [{"finding": truth}],
                              titles=[f"Q: {wrap(question, 50)}\ntrue: {answer}\nsaid: {said}"])


# ---------------------------------------------------------------------------------------------- viewer cases
def _viewer_image(image: np.ndarray) -> dict[str, Any]:
    """``image`` and ``modality`` of a viewer case: uint8 RGB (H, W, 3) in colour (endoscopy, dermoscopy; grey
    scans are repeated over the channels)."""
    return {"image": image, "modality": "RGB"} if image.ndim == 3 else {"image": image}


def _qa_text(task: str, question: str, answer: str, said: str, extra: str = "") -> str:
    text = (f"task: {task}\nQ: {question}\nreference answer: {answer}\nmodel answer: {said}" if task else
            f"Q: {question}\nreference answer: {answer}\nmodel answer: {said}")
    return text + (f"\n\n{extra}" if extra else "")


def viewer_cases(result: "InferResult", limit: int = 12) -> list[dict[str, Any]]:
    """Cases for ``viz.slice_viewer`` / ``viz.save_case_viewer_html``: up to ``limit`` rows of the split, the same
    number from each task, each image (in colour) with its true and predicted mask, and the question, the
    reference answer and the model's answer (with Dice and the positions) as text."""
    ev = result.evaluation
    cases = []
    for i in _rows_per_task(ev.manifest, limit):
        row, pred = ev.manifest.loc[i], ev.predictions.loc[i]
        truth = read_mask(result.root / row["mask"]) > 0
        if ev.pred_masks[i].shape != truth.shape:
            raise ValueError(f"{result.root / row['mask']}: predicted mask has shape {ev.pred_masks[i].shape}, "
                             f"expected the true mask's {truth.shape}")
        extra = (f"Dice {pred['dice']:.3f} · position: true {row['position'] or '?'}, answered "
                 f"{pred['pred_position'] or '?'}, of the predicted mask {pred['mask_position'] or '?'}")
        cases.append({**_viewer_image(read_image(result.root / row["image"])),
                      "masks": {"true finding": truth, "predicted finding": ev.pred_masks[i]},
                      "title": str(row["id"]),
                      "text": _qa_text(str(row["task"]), str(row["question"]), str(row["answer"]),
                                       str(pred["pred_answer"]), extra)})
    return cases


def attention_viewer_cases(att: "AttentionResult", vlm: bool = False) -> list[dict[str, Any]]:
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


# ---------------------------------------------------------------------------------------------- HTML views
def write_case_viewer(cases: list[dict[str, Any]], run: RunFolder, split: str) -> Path:
    """``03_case_viewer.html`` in the run folder: the answers and masks of ``cases``, offline."""
    from nbsupport.viz import save_case_viewer_html

    return save_case_viewer_html(cases, run.file(CASE_VIEWER), title=f"prs_med {split}: answers and masks")


def write_attention_viewer(cases: list[dict[str, Any]], run: RunFolder, sample_id: str) -> Path:
    """``04_attention_viewer.html`` in the run folder: the decoder's cross-attention of ``cases``, offline."""
    from nbsupport.viz import save_case_viewer_html

    return save_case_viewer_html(cases, run.file(ATTENTION_VIEWER), title=f"prs_med attention: {sample_id}")
