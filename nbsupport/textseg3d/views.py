"""What the textseg3d verbs show: figures of cases and attention, the cases of the slice viewer, and the offline
HTML views the 03/04 verbs write into the run folder (``03_case_viewer.html``, ``04_attention_viewer.html``,
``04_bertviz_head_view.html``)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from nbsupport.paths import resolve_path
from nbsupport.runs import RunFolder
from nbsupport.textseg3d import data as ts_data
from nbsupport.textseg3d.config import AttentionConfig, InferConfig

if TYPE_CHECKING:
    from nbsupport.textseg3d.inference import CaseEvaluation
    from nbsupport.textseg3d.pipeline import AttentionResult, InferResult

CASE_VIEWER = "03_case_viewer.html"
ATTENTION_VIEWER = "04_attention_viewer.html"
BERTVIZ_VIEW = "04_bertviz_head_view.html"


# ============================================================================================ figures
def _orthogonal_slices(volume: np.ndarray, mask: np.ndarray | None) -> tuple[int, int, int]:
    """(axial, coronal, sagittal) indices through the mask's centre (or the volume's)."""
    if mask is not None and mask.any():
        return tuple(int(round(c)) for c in np.argwhere(mask).mean(0))  # type: ignore[return-value]
    return tuple(s // 2 for s in volume.shape)  # type: ignore[return-value]


def case_figure(cases: Sequence[dict[str, Any]], titles: Sequence[str], prompts: Sequence[str],
                predictions: Sequence[dict[str, np.ndarray]] | None = None) -> Any:
    """Per case one row: axial, coronal and sagittal slices through the target with the label (and predictions)
    drawn, and the prompt text beside them."""
    import matplotlib.pyplot as plt

    from nbsupport.textseg3d.transforms import window_hu
    from nbsupport.viz import overlay_masks

    n = max(1, len(cases))
    fig = plt.figure(figsize=(13, 3.4 * n), layout="constrained")
    axes = np.atleast_2d(fig.subplots(n, 4, gridspec_kw={"width_ratios": [1, 1, 1, 0.9]}))
    for row, (case, title, prompt) in enumerate(zip(cases, titles, prompts)):
        image, label, (sd, sh, sw) = case["image"], case["label"], case["spacing"]
        k, j, i = _orthogonal_slices(image, label)
        views = [("axial", (slice(k, k + 1), slice(None), slice(None)), (sh, sw)),
                 ("coronal", (slice(None), slice(j, j + 1), slice(None)), (sd, sw)),
                 ("sagittal", (slice(None), slice(None), slice(i, i + 1)), (sd, sh))]
        for ax, (name, index, spacing) in zip(axes[row, :3], views):
            masks = {}
            if label is not None:
                masks["target"] = np.squeeze(label[index]).astype(bool)
            for pname, pred in (predictions[row] if predictions else {}).items():
                masks[pname] = np.squeeze(pred[index]).astype(bool)
            overlay_masks(np.squeeze(window_hu(image[index])), masks or None, ax=ax, spacing=spacing,
                          vmin=0.35, vmax=0.65, legend=(name == "axial"), title=f"{title} {name}")
            ax.set_xticks([])
            ax.set_yticks([])
        text_ax = axes[row, 3]
        text_ax.set_axis_off()
        text_ax.text(0.0, 0.5, "report prompt:\n\n" + "\n".join(prompt.split(", ")), fontsize=11, va="center",
                     family="monospace")
    return fig


def ablation_figure(part: pd.DataFrame, root: Path, evaluations: dict[str, CaseEvaluation], n: int) -> Any:
    """Per case: the target and the predictions with the true, flipped and empty report on orthogonal slices."""
    rows = list(range(min(n, len(part))))
    cases = [ts_data.load_case(root / part.loc[i, "image"], root / part.loc[i, "label"] if part.loc[i, "label"]
                               else None) for i in rows]
    preds = [{f"pred ({v})": evaluations[v].predictions[i] for v in ts_data.REPORT_VARIANTS} for i in rows]
    titles = [f"{part.loc[i, 'case']} Dice " + "/".join(f"{evaluations[v].metrics.loc[i, 'dice']:.2f}"
                                                          for v in ts_data.REPORT_VARIANTS) for i in rows]
    return case_figure(cases, titles, [part.loc[i, "prompt"] for i in rows], preds)


def token_attention_figure(tokens: list[str], attentions: tuple[torch.Tensor, ...]) -> Any:
    """Token x token self-attention of the report in every encoder layer (mean over heads)."""
    import matplotlib.pyplot as plt

    n = len(attentions)
    cols = min(n, 3)
    rows = -(-n // cols)
    size = max(3.0, 0.22 * len(tokens))
    fig = plt.figure(figsize=(size * cols, size * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for layer, (ax, att) in enumerate(zip(axes, attentions)):
        ax.imshow(att[0].mean(0).float().numpy(), cmap="viridis")
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=7)
        ax.set_title(f"layer {layer + 1} (mean of heads)")
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig


def fusion_attention_figure(image: np.ndarray, label: np.ndarray, pred: np.ndarray, maps: list[np.ndarray],
                            scales: list[int], prompt: str, token_names: list[str] | None = None) -> Any:
    """Rows: (scale, text token); columns: axial and coronal attention heatmaps through the target's centre,
    then the same slices with the target and the prediction. ``token_names``: the report word of each text token
    (token readout), else the tokens are numbered prompt tokens."""
    import matplotlib.pyplot as plt

    from nbsupport.viz import attention_overlay, overlay_masks

    k, j, _ = _orthogonal_slices(image, label)
    rows = [(s, t) for s in scales for t in range(maps[s].shape[0])]
    fig = plt.figure(figsize=(13, 3.0 * len(rows)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), 4))
    for r, (s, t) in enumerate(rows):
        amap = maps[s][t]
        ks, js = min(k * amap.shape[0] // image.shape[0], amap.shape[0] - 1), \
            min(j * amap.shape[1] // image.shape[1], amap.shape[1] - 1)
        attention_overlay(image[k], amap[ks], ax=axes[r, 0], colorbar=False,
                          title=f"scale 1/{2 ** (s + 1)}, " + (f"report token {token_names[t]!r}" if token_names
                                                                   else f"prompt token {t + 1}") + ": axial")
        attention_overlay(image[:, j], amap[:, js], ax=axes[r, 1], colorbar=False, title="coronal")
        masks = {"target": label[k], "prediction": pred[k]}
        overlay_masks(image[k], masks, ax=axes[r, 2], legend=r == 0, title="axial: target vs prediction")
        overlay_masks(image[:, j], {"target": label[:, j], "prediction": pred[:, j]}, ax=axes[r, 3], legend=False,
                      title="coronal")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"fusion attention of the text tokens over voxels — report: {prompt}")
    return fig


# ============================================================================================ viewer cases
def _superior_first(volume: np.ndarray) -> np.ndarray:
    """Canonical IPL volumes run from superior to inferior along D; the viewer's coronal and sagittal planes put the
    last slice at the top, so its volumes run inferior -> superior."""
    return np.ascontiguousarray(np.asarray(volume)[::-1])


def viewer_cases(result: InferResult, cfg: InferConfig, limit: int = 8) -> list[dict[str, Any]]:
    """Cases for ``viz.slice_viewer`` / ``viz.save_case_viewer_html``: per case of the split (at most ``limit``)
    the CT in Hounsfield units with the ground truth and the predictions with the true, the side-flipped and the
    empty report (and the image-only UNet's when it ran), the report prompt and the Dice of each as text."""
    true = result.evaluations["true"]
    if cfg.input_image:
        sources = {true.cases[0]: (resolve_path(cfg.input_image), None)}
    else:
        manifest, root = cfg.load_manifest()
        rows = manifest[manifest.split == cfg.split].set_index("case")
        sources = {c: (root / rows.at[c, "image"], root / rows.at[c, "label"] if rows.at[c, "label"] else None)
                   for c in true.cases[:limit]}
    names = {"true": "pred (true report)", "flipped": "pred (flipped report)", "empty": "pred (empty report)",
             "image_only": "pred (image-only UNet)"}
    cases = []
    for i, case in enumerate(true.cases[:limit]):
        image_path, label_path = sources[case]
        loaded = ts_data.load_case(image_path, label_path)
        masks = {}
        if loaded["label"] is not None:
            masks["ground truth"] = _superior_first(loaded["label"] > 0)
        for variant, ev in result.evaluations.items():
            if i < len(ev.predictions):
                if ev.predictions[i].shape != loaded["image"].shape:
                    raise ValueError(f"{image_path}: prediction ({variant} report) has shape "
                                     f"{ev.predictions[i].shape}, expected the image's {loaded['image'].shape}")
                masks[names.get(variant, f"pred ({variant})")] = _superior_first(ev.predictions[i] > 0)
        dice = [f"{v.replace('_', '-')} {ev.metrics.loc[i, 'dice']:.3f}" for v, ev in result.evaluations.items()
                if len(ev.metrics) > i and "dice" in ev.metrics]
        text = "report prompt: " + (true.prompts[i] or "(empty report)")
        if "flipped" in result.evaluations:
            text += "\nside-flipped prompt: " + result.evaluations["flipped"].prompts[i]
        if dice:
            text += "\n\nDice: " + " · ".join(dice)
        cases.append({"image": _superior_first(loaded["image"]), "masks": masks, "title": str(case), "text": text,
                      "spacing": tuple(float(s) for s in loaded["spacing"]), "modality": "CT"})
    return cases


def attention_viewer_cases(att: AttentionResult, scales: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Cases for ``viz.slice_viewer`` / ``viz.save_case_viewer_html``: the CT (HU) once per fusion scale and text
    prompt token, that token's attention over the voxels as the heatmap (a 3-D map: axial, coronal and sagittal),
    with the ground truth and the prediction, and the report as text."""
    if att.image_hu is None or att.fusion_maps is None:
        raise ValueError("the attention result carries no volume or fusion maps (made by an older attention_maps)")
    shape = att.image_hu.shape
    padded = [s + (-s) % 32 for s in shape]  # fusion_attention pads the volume to a multiple of 32
    masks = {}
    if att.label is not None:
        masks["ground truth"] = _superior_first(att.label)
    if att.pred is not None:
        masks["prediction"] = _superior_first(att.pred)
    image = _superior_first(att.image_hu)
    cases = []
    for s in (range(len(att.fusion_maps)) if scales is None else scales):
        maps = att.fusion_maps[s]
        # the part of the map over the unpadded volume
        keep = tuple(max(1, round(n * m / p)) for n, m, p in zip(shape, maps.shape[1:], padded))
        for t in range(maps.shape[0]):
            amap = _superior_first(maps[t, :keep[0], :keep[1], :keep[2]])
            cases.append({"image": image, "masks": masks, "attention": amap, "spacing": att.spacing,
                          "modality": "CT", "title": f"scale 1/{2 ** (s + 1)}, prompt token {t + 1}",
                          "text": f"{att.case}\nreport prompt: {att.prompt}\n\nfusion attention of text prompt token "
                                  f"{t + 1} over the voxels at scale 1/{2 ** (s + 1)} (grid "
                                  f"{'x'.join(map(str, amap.shape))}, mean of heads)"})
    return cases


# ============================================================================================ HTML views
def write_case_viewer(result: InferResult, cfg: InferConfig, run: RunFolder,
                      limit: int = 8) -> tuple[list[dict[str, Any]], Path]:
    """``03_case_viewer.html``: the cases of :func:`viewer_cases` as one offline page; returns (cases, path)."""
    from nbsupport.viz import save_case_viewer_html

    cases = viewer_cases(result, cfg, limit=limit)
    path = save_case_viewer_html(cases, run.file(CASE_VIEWER),
                                 title=f"textseg3d {cfg.split}: true / flipped / empty report")
    return cases, path


def write_attention_viewer(att: AttentionResult, cfg: AttentionConfig,
                           run: RunFolder) -> tuple[list[dict[str, Any]], Path]:
    """``04_attention_viewer.html``: the fusion maps of ``cfg.scale`` (all scales for -1) as one offline page;
    returns (cases, path)."""
    from nbsupport.viz import save_case_viewer_html

    cases = attention_viewer_cases(att, scales=None if cfg.scale < 0 else [cfg.scale])
    path = save_case_viewer_html(cases, run.file(ATTENTION_VIEWER), title=f"textseg3d fusion attention: {att.case}")
    return cases, path


def write_bertviz_view(attentions: tuple[torch.Tensor, ...], tokens: list[str], run: RunFolder) -> Path | None:
    """``04_bertviz_head_view.html``: bertviz head view as a standalone page that renders offline (d3/jQuery inlined,
    no CDN); None where bertviz is not installed."""
    try:
        import bertviz  # noqa: F401
    except ImportError:
        return None
    from nbsupport.viz import save_attention_html

    return save_attention_html(list(attentions), tokens, run.file(BERTVIZ_VIEW),
                               title="report self-attention in the text encoder (bertviz head view)")
