"""seg2d figures and clinician views: sample slices, predictions next to truth, attention maps, and the offline
viewer pages the 03/04 verbs write into the run folder (``03_case_viewer.html``, ``04_attention_viewer.html``).

Viewer cases are the dicts :func:`nbsupport.viz.slice_viewer` and :func:`nbsupport.viz.save_case_viewer_html` take:
the slice, its masks by name, a title and text, the physical pixel spacing and (04) an attention heatmap.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from nbsupport.runs import RunFolder
from nbsupport.seg2d import data as seg_data
from nbsupport.seg2d.data import CLASSES
from nbsupport.seg2d.inference import SplitEvaluation, most_organ_slices

if TYPE_CHECKING:
    from nbsupport.seg2d.pipeline import AttentionResult, InferResult

CASE_VIEWER = "03_case_viewer.html"
ATTENTION_VIEWER = "04_attention_viewer.html"


# ---------------------------------------------------------------------------------------------- figures
def sample_slices_figure(manifest: pd.DataFrame, root: Path, n: int, seed: int) -> Any:
    """01: ``n`` slices with their organ masks, taken in turn from each image size (see :func:`_example_rows`)."""
    from nbsupport.viz import image_grid

    sample = _example_rows(manifest, n, seed)
    images = [seg_data.read_slice(root / r.image) for r in sample.itertuples()]
    masks = [dict(zip(CLASSES, seg_data.masks_for_row(r))) for r in sample.itertuples()]
    titles = [f"{r.id}\n{r.width}x{r.height} px, {r.pixel_spacing_w:.2f} mm" for r in sample.itertuples()]
    return image_grid(images, titles=titles, masks=masks, ncols=3, suptitle="UW-Madison GI tract: sample slices")


def _example_rows(manifest: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Slices with at least two organs, taken in turn from each image size, so the figure shows the data's variety."""
    with_organs = manifest[(manifest[[f"rle_{c}" for c in CLASSES]] != "").sum(axis=1) >= 2]
    pool = (with_organs if len(with_organs) >= n else manifest).sample(frac=1.0, random_state=seed)
    turn = pool.groupby(["width", "height"]).cumcount()
    return pool.iloc[np.argsort(turn.to_numpy(), kind="stable")].head(n)


def prediction_figure(evaluation: SplitEvaluation, root: Path, n: int = 4) -> Any:
    """02/03: the ``n`` slices with most organ, predicted masks next to the true ones (when there are any)."""
    from nbsupport.viz import compare_masks_grid

    order = most_organ_slices(evaluation.truth if evaluation.truth is not None else evaluation.pred, n)
    rows = evaluation.manifest.iloc[order]
    images = [seg_data.read_slice(root / r.image) for r in rows.itertuples()]
    truths = [dict(zip(CLASSES, evaluation.truth[i])) for i in order] if evaluation.truth is not None else None
    preds = [dict(zip(CLASSES, evaluation.pred[i])) for i in order]
    return compare_masks_grid(images, preds, truths, titles=list(rows["id"]))


def attention_figures(image: np.ndarray, layer_maps: list[tuple[str, np.ndarray]],
                      head_maps: list[tuple[str, np.ndarray]], query: tuple[int, int], pred: np.ndarray,
                      truth: np.ndarray, slice_id: str) -> tuple[Any, Any, Any]:
    """04: the attention of the query pixel per layer and per head over the model input, and the prediction
    next to the truth."""
    from nbsupport.viz import attention_grid, compare_masks_grid

    layers = attention_grid(image, layer_maps, ncols=4, query_point=query)
    heads = attention_grid(image, head_maps, ncols=4, query_point=query)
    overlay = compare_masks_grid([image], [dict(zip(CLASSES, pred))], [dict(zip(CLASSES, truth))], titles=[slice_id])
    return layers, heads, overlay


# ---------------------------------------------------------------------------------------------- viewer cases
def viewer_cases(result: "InferResult", limit: int = 24) -> list[dict[str, Any]]:
    """Cases for ``viz.slice_viewer``: each slice with its predicted (and true) masks, most organ first."""
    ev = result.evaluation
    order = most_organ_slices(ev.truth if ev.truth is not None else ev.pred, limit)
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


def attention_viewer_cases(att: "AttentionResult", heads: bool = False) -> list[dict[str, Any]]:
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


# ---------------------------------------------------------------------------------------------- HTML views
def write_case_viewer(cases: list[dict[str, Any]], run: RunFolder, split: str) -> Path:
    """``03_case_viewer.html`` in the run folder: the predicted (and true) masks of ``cases``, offline."""
    from nbsupport.viz import save_case_viewer_html

    return save_case_viewer_html(cases, run.file(CASE_VIEWER), title=f"seg2d {split} predictions")


def write_attention_viewer(cases: list[dict[str, Any]], run: RunFolder, slice_id: str) -> Path:
    """``04_attention_viewer.html`` in the run folder: the attention maps of ``cases`` over the slice, offline."""
    from nbsupport.viz import save_case_viewer_html

    return save_case_viewer_html(cases, run.file(ATTENTION_VIEWER), title=f"seg2d attention: {slice_id}")
