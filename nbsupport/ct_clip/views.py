"""What the ct_clip notebooks show: figures, the slice-viewer cases of 03 and 04, and the offline viewer pages.

Volumes are preprocessed RAS arrays (``(1, X, Y, Z)``, 0..1 over ``preprocessing.HU_WINDOW``); every view shows
them in the radiological convention (anterior at the top, the patient's right on the image's left).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from nbsupport.ct_clip import preprocessing as ct_pre
from nbsupport.ct_clip.data import LABELS, read_preprocessed, read_volume
from nbsupport.runs import RunFolder

if TYPE_CHECKING:
    from nbsupport.ct_clip.inference import Evaluation
    from nbsupport.ct_clip.pipeline import AttentionResult

VIEWER_SIZE = {"max_side": 128, "max_slices": 64}  # the offline pages' resolution (kept small: 4 CT volumes)


# ============================================================================================ 01 preprocess
def _axial(volume: np.ndarray, k: int | None = None) -> np.ndarray:
    """Axial slice of a (R, A, S) volume as radiologists view it: anterior at the top, the patient's right on the
    image's left (RAS indices grow towards the patient's right and front, hence both flips)."""
    k = volume.shape[2] // 2 if k is None else k
    return volume[::-1, ::-1, k].T


def before_after_figure(rows: pd.DataFrame, root: Path) -> Any:
    """Mid axial slice of each source volume (HU, -1000..1500) next to its preprocessed slice (0..1)."""
    from nbsupport.viz import image_grid

    images, titles, spacings = [], [], []
    for r in rows.itertuples():
        ct = read_volume(root, r.volume)  # HU as its CT-RATE release stores them
        hu = ct.stored.astype(np.float32) * ct.slope + ct.intercept
        import nibabel as nib

        ornt = np.array([[a, -1 if f else 1] for a, f in zip(ct.ras_axis, ct.flipped)], dtype=float)
        hu = nib.orientations.apply_orientation(hu, ornt)
        images.append(np.clip((_axial(hu) + 1000) / 2500, 0, 1))
        shape = "x".join(map(str, ct.stored.shape))
        titles.append(f"{r.volume}: {shape}\n{ct.spacing[0]:.2f} x {ct.spacing[2]:.2f} mm")
        spacings.append((ct.spacing[1], ct.spacing[0]))
        after = read_preprocessed(root / r.image)[0].astype(np.float32)
        images.append(_axial(after))
        titles.append(f"preprocessed {'x'.join(map(str, after.shape))}\n{r.spacing_x:.2f} x {r.spacing_z:.2f} mm")
        spacings.append((r.spacing_y, r.spacing_x))
    return image_grid(images, titles=titles, ncols=4, spacing=spacings,
                      suptitle="before (HU) / after (0..1 = -1000..1500 HU, RAS, resampled, padded/cropped)")

def real_ct_figure(name: str, hu: np.ndarray, ct_spacing: Sequence[float], out: np.ndarray,
                   spacing: Sequence[float]) -> Any:
    """A real CT's middle stored slice (HU; DICOM LPS order is already radiological) next to the preprocessed
    axial slice with the most tissue."""
    from nbsupport.viz import image_grid

    k = int(np.argmax(out[0].reshape(-1, out.shape[-1]).astype(np.float32).sum(0)))  # the slice with most tissue
    before = np.clip((hu[:, :, hu.shape[2] // 2].T + 1000) / 2500, 0, 1)
    return image_grid([before, _axial(out[0].astype(np.float32), k)],
                      titles=[f"{name}: {'x'.join(map(str, hu.shape))}, HU {hu.min():.0f}..{hu.max():.0f}",
                              f"preprocessed slice {k}: {spacing[0]:.2f} mm"],
                      spacing=[(ct_spacing[1], ct_spacing[0]), (spacing[1], spacing[0])], ncols=2,
                      suptitle="a real CT through the same preprocessing")


# ============================================================================================ 03 infer
def auroc_figure(zero_shot: pd.DataFrame) -> Any:
    """Zero-shot (and linear-probe) AUROC per label, against chance."""
    from matplotlib.figure import Figure

    table = zero_shot.drop(index="mean", errors="ignore")
    fig = Figure(figsize=(7, 0.45 * len(table) + 1.2))
    ax = fig.subplots()
    y = np.arange(len(table))
    ax.barh(y - 0.2, table["auroc"], height=0.4, label="zero-shot")
    if "linear_probe_auroc" in table:
        ax.barh(y + 0.2, table["linear_probe_auroc"], height=0.4, label="linear probe (text-free)")
    ax.axvline(0.5, color="gray", linestyle="--", label="chance")
    ax.set_yticks(y, table.index)
    ax.set_xlim(0, 1)
    ax.set_xlabel("AUROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def viewer_volume(preprocessed: np.ndarray, spacing_xyz: Sequence[float]) -> tuple[np.ndarray, tuple[float, ...]]:
    """A preprocessed ``(1, X, Y, Z)`` RAS volume (0..1 over ``ct_pre.HU_WINDOW``) as the viewer's (D, H, W) in
    Hounsfield units: axial slices from inferior to superior, anterior at the top and the patient's right on the
    left (radiological convention); and its (D, H, W) voxel size in mm. Values at the window's ends are clipped."""
    lo, hi = ct_pre.HU_WINDOW
    volume = np.asarray(preprocessed, dtype=np.float32)[0]
    return (np.ascontiguousarray(volume.transpose(2, 1, 0)[:, ::-1, ::-1] * (hi - lo) + lo),
            (float(spacing_xyz[2]), float(spacing_xyz[1]), float(spacing_xyz[0])))


def viewer_attention(volume_map: np.ndarray) -> np.ndarray:
    """An (X, Y, Z) map over the model input (RAS) in the viewer's (D, H, W) orientation (see ``viewer_volume``)."""
    return np.ascontiguousarray(np.asarray(volume_map, dtype=np.float32).transpose(2, 1, 0)[:, ::-1, ::-1])


def viewer_cases(evaluation: Evaluation, root: Path, limit: int = 4, top_k: int = 3) -> list[dict[str, Any]]:
    """Cases for ``viz.slice_viewer`` / ``viz.save_case_viewer_html``: the first ``limit`` volumes of the split as
    preprocessed (Hounsfield units, CT window presets, axial/coronal/sagittal), with their report, the ``top_k``
    reports the model retrieves for them (similarity, and whether it is the volume's own) and the zero-shot
    probabilities of the labels the volume has, as text; ``root`` is the manifest's data root. No heatmap: 04's
    ``attention_viewer_cases`` has the relevance of a label prompt."""
    ev = evaluation
    part = ev.manifest
    similarity = ev.similarity.detach().numpy()  # [reports, volumes]
    cases = []
    for i in range(min(limit, len(part))):
        row = part.iloc[i]
        image, spacing = viewer_volume(read_preprocessed(root / row["image"]),
                                       (row.spacing_x, row.spacing_y, row.spacing_z))
        ranked = np.argsort(-similarity[:, i])[:top_k]
        retrieved = "\n".join(f"{r + 1}. {similarity[j, i]:.3f} report of {part.volume.iloc[j]}"
                              f"{' (its own)' if j == i else ''}: {part.report.iloc[j]}"
                              for r, j in enumerate(ranked))
        present = [(name, float(ev.scores[i, k])) for k, name in enumerate(LABELS) if int(row[name]) == 1]
        zero_shot = ", ".join(f"{name} {p:.2f}" for name, p in present) or "none of the 18 labels"
        cases.append({"image": image, "spacing": spacing, "modality": "CT", "masks": {},
                      "title": str(row["volume"]),
                      "text": f"report:\n{row['report']}\n\nzero-shot p of its labels: {zero_shot}"
                              f"\n\ntop {len(ranked)} retrieved reports (cosine similarity):\n{retrieved}"})
    return cases

def write_case_viewer(cases: list[dict[str, Any]], run: RunFolder, split: str) -> Path:
    """``03_case_viewer.html``: the cases of :func:`viewer_cases` as one offline page in the run folder."""
    from nbsupport.viz import save_case_viewer_html

    return save_case_viewer_html(cases, run.file("03_case_viewer.html"),
                                 title=f"ct_clip {split}: volumes and retrieved reports", **VIEWER_SIZE)


# ============================================================================================ 04 attention
def similarity_figure(similarity: np.ndarray, volumes: Sequence[str]) -> Any:
    """The [reports, volumes] cosine similarities of a batch, matched pairs on the diagonal."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    shown = ax.imshow(similarity, cmap="viridis")
    ax.set_xticks(range(len(volumes)), volumes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(volumes)), [f"report of {v}" for v in volumes], fontsize=7)
    ax.set_xlabel("volume")
    ax.set_title("cosine similarity (matched pairs on the diagonal)")
    fig.colorbar(shown, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def relevance_figure(volume: np.ndarray, relevance: np.ndarray, n_slices: int, title: str) -> Any:
    """``n_slices`` axial slices (15 %..85 % of the depth) of an (X, Y, Z) model input with the relevance on top."""
    from nbsupport.viz import attention_grid

    depth = volume.shape[2]
    slices = np.linspace(depth * 0.15, depth * 0.85, n_slices).round().astype(int)
    maps = [(f"slice {k}", relevance[:, :, k].T) for k in slices]
    # attention_grid draws one background image; the per-slice panels need their own, so draw each slice's CT.
    fig = attention_grid(volume[:, :, depth // 2].T, maps, ncols=4, suptitle=title)
    for ax, k in zip(fig.axes, slices):
        if ax.images:
            ax.images[0].set_data(volume[:, :, k].T)
    return fig


def attention_viewer_cases(att: AttentionResult) -> list[dict[str, Any]]:
    """One case for ``viz.slice_viewer`` / ``viz.save_case_viewer_html``: the explained volume as preprocessed (HU,
    CT window presets, three planes) with the Grad-CAM relevance of the label prompt as a 3-D heatmap, and the
    prompt, the volume's report and the reports the model retrieves for it as text."""
    if att.preprocessed is None or att.spacing is None:
        raise ValueError("the attention result names no preprocessed volume (made by an older attention_maps)")
    image, spacing = viewer_volume(read_preprocessed(att.preprocessed), att.spacing)
    top = "\n".join(f"{r['rank']}. {r['similarity']:.3f} report of {r['report of']}"
                    f"{' (its own)' if r['is its own report'] else ''}: {r['report']}"
                    for _, r in att.top_reports.iterrows())
    return [{"image": image, "spacing": spacing, "modality": "CT", "masks": {},
             "attention": viewer_attention(att.relevance), "title": f"{att.volume}: {att.prompt}",
             "text": f"heatmap: Grad-CAM relevance of the prompt \u201c{att.prompt}\u201d (grid "
                     f"{'x'.join(map(str, att.relevance.shape))})\n\nreport:\n{att.report}"
                     f"\n\nretrieved reports (cosine similarity):\n{top}"}]


def write_attention_viewer(cases: list[dict[str, Any]], run: RunFolder, volume: str) -> Path:
    """``04_attention_viewer.html``: the cases of :func:`attention_viewer_cases` as one offline page."""
    from nbsupport.viz import save_case_viewer_html

    return save_case_viewer_html(cases, run.file("04_attention_viewer.html"), title=f"ct_clip relevance: {volume}",
                                 **VIEWER_SIZE)
