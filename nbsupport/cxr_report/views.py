"""What a reader sees of cxr_report: X-rays with their reports, the 14 disease evidence maps beside the generated
sentences, the LM's token attention, and the cases of the offline viewers (``03_case_viewer.html``,
``04_attention_viewer.html``, ``04_bertviz_head_view.html``) that the verbs write into the run folder.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nbsupport.cxr_report.data import REAL_CXR_TITLE, load_encoder_input, read_xray, real_cxr_path
from nbsupport.cxr_report.inference import (
    disease_evidence,
    finding_sentences,
    load_vision_model,
    most_probable_finding,
)
from nbsupport.cxr_report.labeler import LABELS
from nbsupport.cxr_report.model import VisionModel
from nbsupport.device import resolve_device
from nbsupport.runs import RunFolder

CASE_VIEWER = "03_case_viewer.html"
ATTENTION_VIEWER = "04_attention_viewer.html"
BERTVIZ_PAGE = "04_bertviz_head_view.html"


# ---------------------------------------------------------------------------------------------- figures
def report_figure(images: list[np.ndarray], texts: list[dict[str, str]], titles: list[str], suptitle: str = "",
                  ncols: int = 3) -> Any:
    """Images with report texts under them (each ``texts`` entry: {caption: text})."""
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


def disease_maps_figure(gray: np.ndarray, evidence: np.ndarray, probabilities: np.ndarray, report: str,
                        title: str) -> Any:
    """14 panels: each disease's image-specific evidence map (``VisionModel.patch_evidence``, clipped at 0: (14,
    side, side)) upsampled over the X-ray, titled with the classifier probability and the generated sentence
    naming that finding."""
    import matplotlib.pyplot as plt

    from nbsupport.viz import attention_overlay

    sentences = finding_sentences(report)
    fig, axes = plt.subplots(3, 5, figsize=(17, 11))
    axes = axes.flat
    axes[0].imshow(gray, cmap="gray")
    axes[0].set_title(textwrap.fill(title, 40), fontsize=8)
    axes[0].axis("off")
    for k, label in enumerate(LABELS):
        ax = axes[k + 1]
        attention_overlay(gray, evidence[k], ax=ax, alpha=0.45)
        caption = f"{label} p={probabilities[k]:.2f}"
        if label in sentences:
            caption += "\n" + textwrap.fill(f"\u201c{sentences[label]}\u201d", 40)
        ax.set_title(caption, fontsize=7)
    fig.suptitle(textwrap.fill("generated: " + report, 150), fontsize=9)
    fig.tight_layout()
    return fig


def token_attention_figure(attentions: tuple[torch.Tensor, ...], names: list[str], n_prompt: int, layer: int) -> Any:
    """Attention of the report tokens over [14 visual | prompt | report] in one LM layer (mean of heads), as a
    heatmap; ``attentions`` and ``names`` from ``inference.lm_token_attention``, ``n_prompt`` prompt tokens."""
    import matplotlib.pyplot as plt

    att = attentions[layer][0].float().mean(0).numpy()  # (T, T)
    start = len(LABELS) + n_prompt
    rows = att[start:]
    fig, ax = plt.subplots(figsize=(min(24, 2 + 0.22 * len(names)), min(14, 2 + 0.22 * len(rows))))
    ax.imshow(rows, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(rows)), names[start:], fontsize=6)
    ax.axvline(len(LABELS) - 0.5, color="w", lw=1)
    ax.axvline(start - 0.5, color="w", lw=1)
    ax.set_title(f"LM attention (layer {layer}, mean of heads): report tokens over visual | prompt | report")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- viewer cases
def xray_case(gray: np.ndarray, evidence: np.ndarray, probabilities: np.ndarray, k: int, title: str,
              report: str, reference: str) -> dict[str, Any]:
    """One ``viz.slice_viewer`` case: the X-ray, disease ``k``'s evidence map as the heatmap, the reports as text."""
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


def report_cases(vision: VisionModel, sources: list[tuple[Path, str, str, str]],
                 disease: str | None = None) -> list[dict[str, Any]]:
    """A case per ``(image path, title, generated report, reference report)``: the X-ray with one disease's
    evidence map as the heatmap, ``disease`` (one of the 14 labels) for every image or by default each image's
    most probable finding."""
    if disease is not None and disease not in LABELS:
        raise ValueError(f"disease must be one of the 14 labels {list(LABELS)}, got {disease!r}")
    cases = []
    for path, title, generated, reference in sources:
        x = load_encoder_input(path, vision.spec.image_size)[None]
        evidence, probs = disease_evidence(vision, x)
        k = LABELS.index(disease) if disease is not None else most_probable_finding(probs)
        cases.append(xray_case(read_xray(path), evidence, probs, k, f"{title}: {LABELS[k]}", generated, reference))
    return cases


def viewer_sources(result: Any, manifest: pd.DataFrame, root: Path, limit: int) -> list[tuple[Path, str, str, str]]:
    """The images of an ``InferResult`` the 03 viewer shows: the first ``limit`` of its predictions, and the real
    DICOM when 03 reported on it, each ``(path, title, generated report, reference report)``."""
    images = dict(zip(manifest["id"], manifest["image"]))
    sources = [(root / images[r.id], str(r.id), str(r.generated), str(r.reference))
               for r in result.predictions.head(limit).itertuples()]
    if result.real_dicom is not None:
        sources.append((real_cxr_path(), REAL_CXR_TITLE, str(result.real_dicom["report"]), ""))
    return sources


def viewer_cases(result: Any, cfg: Any, run: RunFolder, limit: int = 8, disease: str | None = None
                 ) -> list[dict[str, Any]]:
    """The cases of ``03_case_viewer.html`` again, with ``disease`` (one of the 14 labels) as every image's heatmap
    instead of its most probable finding (``predict`` already returns the default ones as
    ``result.viewer_cases``). The trained vision model is reloaded: the maps are not part of the result."""
    manifest, root = cfg.load_manifest()
    vision = load_vision_model(cfg.find_checkpoint(run), resolve_device(cfg.device))
    return report_cases(vision, viewer_sources(result, manifest, root, limit), disease)


def attention_viewer_cases(att: Any) -> list[dict[str, Any]]:
    """Cases for ``viz.slice_viewer`` from an ``AttentionResult``: the X-ray once per disease (14 cases, the most
    probable first), that disease's image-specific evidence map as the heatmap, the generated and the reference
    report as text."""
    if att.image is None or att.evidence is None or att.probabilities is None:
        raise ValueError("the attention result carries no image or evidence maps (made by an older attention_maps)")
    order = np.argsort(-att.probabilities)
    return [xray_case(att.image, att.evidence, att.probabilities, int(k), f"{LABELS[k]} p={att.probabilities[k]:.2f}",
                      att.report, att.reference) for k in order]


# ---------------------------------------------------------------------------------------------- HTML views
def write_viewer(cases: list[dict[str, Any]], run: RunFolder, name: str, title: str) -> Path:
    """The offline case viewer of ``cases`` as ``<run>/<name>`` (``CASE_VIEWER`` or ``ATTENTION_VIEWER``)."""
    from nbsupport.viz import save_case_viewer_html

    return save_case_viewer_html(cases, run.file(name), title=title)


def write_bertviz_page(attentions: tuple[torch.Tensor, ...], names: list[str], run: RunFolder) -> Path | None:
    """bertviz's head view of all LM layers as ``<run>/04_bertviz_head_view.html`` (offline: d3/jQuery inlined);
    None, with the reason printed, where bertviz cannot draw it (the heatmap carries the same numbers)."""
    try:
        from nbsupport.viz import save_attention_html

        return save_attention_html(list(attentions), names, run.file(BERTVIZ_PAGE),
                                   title="LM attention over visual, prompt and report tokens (bertviz head view)")
    except Exception as err:  # bertviz is a view; the heatmap carries the same numbers
        print(f"bertviz head view not written: {err}")
        return None
