"""Masks over images: translucent fills, contours and a legend, in colours that stay fixed per class.

A class keeps its colour in every figure of a session (``class_color``), so "stomach" in a training-set grid
and in a prediction overlay is the same red; known classes of the five systems have fixed colours across
sessions too. Colours come from a qualitative palette chosen to stay visible on grayscale CT/MRI/X-ray.
"""
from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

# Bright, mutually distinct hues that survive a translucent fill over a dark or bright grayscale background.
PALETTE: tuple[str, ...] = (
    "#f58231",  # orange
    "#42d4f4",  # cyan
    "#e6194b",  # red
    "#3cb44b",  # green
    "#ffe119",  # yellow
    "#f032e6",  # magenta
    "#4f8df7",  # blue (lighter than tab:blue, which vanishes on dark MRI)
    "#bfef45",  # lime
    "#a66cff",  # violet
    "#fabed4",  # pink
    "#469990",  # teal
    "#9a6324",  # brown
)

# Fixed across sessions for the classes the workbench's systems name.
KNOWN_CLASS_COLORS: dict[str, str] = {
    "large_bowel": "#ffe119",
    "small_bowel": "#42d4f4",
    "stomach": "#e6194b",
    "ctv": "#e6194b",
    "target": "#e6194b",
    "lesion": "#f58231",
    "tumor": "#f58231",
    "ground_truth": "#3cb44b",
    "prediction": "#f032e6",
}

# Error colouring (Okabe-Ito: distinguishable with the common colour-vision deficiencies).
ERROR_COLORS: dict[str, str] = {"TP": "#009E73", "FP": "#D55E00", "FN": "#56B4E9"}

_session_colors: dict[str, str] = {}


def class_color(name: str) -> str:
    """The colour of class ``name``: fixed for known classes, else the same for the rest of the session.

    A new name starts at a palette slot derived from its text (stable across sessions) and moves to the next
    slot not yet taken, so the first dozen classes of a session get distinct colours.
    """
    name = str(name)
    if name in KNOWN_CLASS_COLORS:
        return KNOWN_CLASS_COLORS[name]
    if name not in _session_colors:
        taken = set(_session_colors.values())
        start = zlib.crc32(name.encode("utf-8")) % len(PALETTE)
        for k in range(len(PALETTE)):
            candidate = PALETTE[(start + k) % len(PALETTE)]
            if candidate not in taken:
                break
        else:  # palette exhausted: reuse
            candidate = PALETTE[start]
        _session_colors[name] = candidate
    return _session_colors[name]


def resolve_colors(names: Sequence[str], colors: Mapping[str, str] | Sequence[str] | None = None) -> dict[str, str]:
    """Colours for ``names`` in one figure: explicit ``colors`` first, then :func:`class_color`, deduplicated."""
    out: dict[str, str] = {}
    if colors is not None and not isinstance(colors, Mapping):
        colors = dict(zip(names, colors))
    for name in names:
        if colors is not None and name in colors:
            out[name] = colors[name]
            continue
        c = class_color(name)
        if c in out.values():  # two classes of this figure share a fixed colour: take a free one for this figure
            c = next((p for p in PALETTE if p not in out.values()), c)
        out[name] = c
    return out


# ---------------------------------------------------------------------------------------------- array helpers
def to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array-like or a (CPU/GPU, grad or not) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_2d_image(image: Any) -> np.ndarray:
    """(H, W) grayscale or (H, W, 3|4) colour image; a leading or trailing singleton channel is dropped."""
    img = to_numpy(image)
    if img.ndim == 3 and img.shape[0] == 1:
        img = img[0]
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] not in (3, 4):
        img = np.moveaxis(img, 0, -1)  # (3, H, W) tensors as models see them
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[-1] in (3, 4))):
        raise ValueError(f"image must be (H, W) or (H, W, 3), got shape {img.shape}")
    return img


def display_window(image: np.ndarray, vmin: float | None = None, vmax: float | None = None,
                   percentiles: tuple[float, float] = (1.0, 99.0)) -> tuple[float, float]:
    """Grey-level window: given ``vmin``/``vmax``, else robust percentiles (outliers such as metal or air
    would otherwise wash out soft tissue)."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo = float(np.percentile(finite, percentiles[0])) if vmin is None else float(vmin)
    hi = float(np.percentile(finite, percentiles[1])) if vmax is None else float(vmax)
    if hi <= lo:  # constant image or a degenerate window
        hi = lo + 1.0
    return lo, hi


def named_masks(masks: Any, class_names: Sequence[str] | None = None, shape: tuple[int, ...] | None = None,
                ) -> dict[str, np.ndarray]:
    """``{name: bool mask}`` from a dict, a (C, ...) array with ``class_names``, or one (H, W) mask.

    With ``shape``, every mask must have it (error names the mask and both shapes).
    """
    if masks is None:
        return {}
    if isinstance(masks, Mapping):
        out = {str(k): to_numpy(v).astype(bool) for k, v in masks.items()}
    else:
        arr = to_numpy(masks).astype(bool)
        if shape is not None and arr.shape == tuple(shape):
            arr = arr[None]
        names = list(class_names) if class_names is not None else [f"class {i}" for i in range(arr.shape[0])]
        if len(names) != arr.shape[0]:
            raise ValueError(f"{arr.shape[0]} mask channels but {len(names)} class_names {names}")
        out = {str(n): arr[i] for i, n in enumerate(names)}
    if shape is not None:
        for name, m in out.items():
            if m.shape != tuple(shape):
                raise ValueError(f"mask {name!r} has shape {m.shape}, expected the image's {tuple(shape)}")
    return out


def _aspect(spacing: Sequence[float] | None) -> float:
    """imshow aspect (pixel height / width) from ``(row_mm, col_mm)``."""
    if spacing is None:
        return 1.0
    if len(spacing) != 2 or min(spacing) <= 0:
        raise ValueError(f"spacing must be (row_mm, col_mm) > 0, got {tuple(spacing)}")
    return float(spacing[0]) / float(spacing[1])


def legend_handles(colors: Mapping[str, str], alpha: float = 0.35, labels: Mapping[str, str] | None = None,
                   ) -> list[Patch]:
    """Legend patches: the class's translucent fill with its contour colour as the edge."""
    labels = labels or {}
    return [Patch(facecolor=(*to_rgb(c), max(alpha, 0.6)), edgecolor=c, linewidth=1.5, label=labels.get(n, n))
            for n, c in colors.items()]


def new_figure(nrows: int = 1, ncols: int = 1, panel_size: float = 3.5, aspect: float = 1.0,
               extra_width: float = 0.0, **kwargs: Any) -> Figure:
    """A figure outside pyplot's registry: nothing piles up in loops, and a notebook shows it once (when returned)."""
    return Figure(figsize=(ncols * panel_size + extra_width, nrows * panel_size * aspect), layout="constrained",
                  **kwargs)


# ---------------------------------------------------------------------------------------------- drawing
def draw_image(ax: Axes, image: Any, spacing: Sequence[float] | None = None, vmin: float | None = None,
               vmax: float | None = None, cmap: str = "gray") -> np.ndarray:
    """Grayscale (windowed) or colour image on ``ax`` with the physical aspect ratio; returns the array drawn."""
    img = as_2d_image(image)
    if img.ndim == 2:
        lo, hi = display_window(img.astype(float), vmin, vmax)
        ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest", aspect=_aspect(spacing))
    else:
        ax.imshow(img, interpolation="nearest", aspect=_aspect(spacing))
    ax.set_xticks([])
    ax.set_yticks([])
    return img


def draw_masks(ax: Axes, masks: Mapping[str, np.ndarray], colors: Mapping[str, str], alpha: float = 0.35,
               contours: bool = True, linewidth: float = 1.2, aspect: float = 1.0) -> None:
    """Each mask as a translucent fill plus a contour in its colour; empty masks draw nothing."""
    for name, m in masks.items():
        if not m.any():
            continue
        rgba = np.zeros((*m.shape, 4), dtype=np.float32)
        rgba[m] = (*to_rgb(colors[name]), alpha)
        ax.imshow(rgba, interpolation="nearest", aspect=aspect)
        if contours:
            ax.contour(m.astype(np.uint8), levels=[0.5], colors=[colors[name]], linewidths=linewidth)


def _fix_limits(ax: Axes, shape: tuple[int, ...]) -> None:
    # contours and markers must not widen the view beyond the image
    ax.set_xlim(-0.5, shape[1] - 0.5)
    ax.set_ylim(shape[0] - 0.5, -0.5)


def overlay_masks(image: Any, masks: Any = None, ax: Axes | None = None,
                  colors: Mapping[str, str] | Sequence[str] | None = None, alpha: float = 0.35, contours: bool = True,
                  title: str | None = None, spacing: Sequence[float] | None = None,
                  class_names: Sequence[str] | None = None, vmin: float | None = None, vmax: float | None = None,
                  legend: bool | str = True, linewidth: float = 1.2, cmap: str = "gray") -> Axes:
    """Draw an image with several (possibly overlapping) masks, each in its own colour, and a legend.

    Args:
        image: (H, W) grayscale (windowed by the 1st-99th percentile unless ``vmin``/``vmax``) or (H, W, 3).
        masks: ``{name: bool (H, W)}``, or a (C, H, W) array with ``class_names``.
        ax: axes to draw into; ``None`` makes a new pyplot figure (shown inline by Jupyter).
        colors: per-name colours; default :func:`class_color`.
        alpha: opacity of the fills.
        contours: also draw each mask's outline.
        title: axes title.
        spacing: ``(row_mm, col_mm)``; sets the displayed aspect ratio to the physical one.
        legend: ``True``/``"upper right"``/any matplotlib ``loc``, or ``False``. Empty masks are listed as
            ``"name (empty)"``.
        cmap: colour map of a single-channel image.

    Returns:
        The axes.
    """
    img = as_2d_image(image)
    shape = img.shape[:2]
    named = named_masks(masks, class_names, shape)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5 * _aspect(spacing) * shape[0] / shape[1]), layout="constrained")
    draw_image(ax, img, spacing, vmin, vmax, cmap)
    palette = resolve_colors(list(named), colors)
    draw_masks(ax, named, palette, alpha, contours, linewidth, _aspect(spacing))
    _fix_limits(ax, shape)
    if legend and named:
        labels = {n: (n if m.any() else f"{n} (empty)") for n, m in named.items()}
        ax.legend(handles=legend_handles(palette, alpha, labels), loc="upper right" if legend is True else legend,
                  fontsize="small", framealpha=0.75, handlelength=1.2, borderaxespad=0.4)
    if title:
        ax.set_title(title)
    return ax


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = int(pred.sum()) + int(truth.sum())
    return float("nan") if total == 0 else 2.0 * int((pred & truth).sum()) / total


def _dice_label(d: float) -> str:
    return "both empty" if np.isnan(d) else f"Dice {d:.2f}"


def compare_masks(image: Any, truth: Any, pred: Any, mode: str = "side_by_side",
                  class_names: Sequence[str] | None = None, spacing: Sequence[float] | None = None,
                  colors: Mapping[str, str] | Sequence[str] | None = None, alpha: float = 0.35,
                  title: str | None = None, panel_size: float = 4.0) -> Figure:
    """Ground truth against prediction on one image.

    Args:
        image: (H, W) image.
        truth, pred: ``{name: bool (H, W)}`` or (C, H, W) arrays with ``class_names``; a class missing on one side
            counts as empty there.
        mode: ``"side_by_side"`` (truth | prediction, Dice per class in the prediction's legend) or ``"errors"``
            (one panel per class: true positives, false positives, false negatives in fixed colours).
        spacing: ``(row_mm, col_mm)`` for the aspect ratio.

    Returns:
        A new figure (not registered with pyplot; display it by returning it from a cell).
    """
    img = as_2d_image(image)
    shape = img.shape[:2]
    t = named_masks(truth, class_names, shape)
    p = named_masks(pred, class_names, shape)
    names = list(dict.fromkeys([*t, *p]))
    empty = np.zeros(shape, dtype=bool)
    t = {n: t.get(n, empty) for n in names}
    p = {n: p.get(n, empty) for n in names}
    dice = {n: _dice(p[n], t[n]) for n in names}
    h_over_w = _aspect(spacing) * shape[0] / shape[1]

    if mode == "side_by_side":
        fig = new_figure(1, 2, panel_size, h_over_w)
        ax_t, ax_p = fig.subplots(1, 2)
        palette = resolve_colors(names, colors)  # once, so both panels agree even when one side lacks a class
        overlay_masks(img, t, ax=ax_t, colors=palette, alpha=alpha, spacing=spacing, title="ground truth")
        overlay_masks(img, p, ax=ax_p, colors=palette, alpha=alpha, spacing=spacing, title="prediction", legend=False)
        labels = {n: f"{n}: {_dice_label(dice[n])}" for n in names}
        if names:
            ax_p.legend(handles=legend_handles(palette, alpha, labels), loc="upper right", fontsize="small",
                        framealpha=0.75, handlelength=1.2, borderaxespad=0.4)
    elif mode == "errors":
        fig = new_figure(1, max(len(names), 1), panel_size, h_over_w)
        axes = np.atleast_1d(fig.subplots(1, max(len(names), 1)))
        for ax, n in zip(axes, names or [None]):
            if n is None:
                draw_image(ax, img, spacing)
                continue
            layers = {"TP": p[n] & t[n], "FP": p[n] & ~t[n], "FN": ~p[n] & t[n]}
            draw_image(ax, img, spacing)
            draw_masks(ax, layers, ERROR_COLORS, alpha=max(alpha, 0.45), contours=False, aspect=_aspect(spacing))
            if t[n].any():  # the truth's outline tells a missed border from a wrong one
                ax.contour(t[n].astype(np.uint8), levels=[0.5], colors=["white"], linewidths=0.8, linestyles="--")
            _fix_limits(ax, shape)
            labels = {k: f"{k} ({int(v.sum())} px)" for k, v in layers.items()}
            outline = Line2D([], [], color="white", linestyle="--", linewidth=0.8, label="truth outline")
            ax.legend(handles=[*legend_handles(ERROR_COLORS, 0.6, labels), outline], loc="upper right",
                      fontsize="small", framealpha=0.75, handlelength=1.2, borderaxespad=0.4, facecolor="#bbbbbb")
            ax.set_title(f"{n}: {_dice_label(dice[n])}")
    else:
        raise ValueError(f"mode must be 'side_by_side' or 'errors', got {mode!r}")
    if title:
        fig.suptitle(title)
    return fig


def compare_masks_grid(images: Sequence[Any], preds: Sequence[Mapping[str, np.ndarray]],
                       truths: Sequence[Mapping[str, np.ndarray]] | None = None, titles: Sequence[str] | None = None,
                       spacings: Sequence[Sequence[float] | None] | None = None, alpha: float = 0.35,
                       panel_size: float = 3.2) -> Figure:
    """Several slices, one row each: ground truth | prediction (Dice per class in the legend), or prediction only.

    Args:
        images: (H_i, W_i) images; sizes may differ between rows.
        preds, truths: per row ``{name: bool (H_i, W_i)}``; ``truths=None`` for unlabelled data.
        titles: per-row titles (e.g. slice ids).
        spacings: per-row ``(row_mm, col_mm)`` for the aspect ratio.
    """
    n = len(images)
    ncols = 1 if truths is None else 2
    names = list(dict.fromkeys(k for p in preds for k in p))
    palette = resolve_colors(names)
    fig = new_figure(max(n, 1), ncols, panel_size)
    axes = np.atleast_2d(fig.subplots(max(n, 1), ncols, squeeze=False))
    for i in range(n):
        spacing = spacings[i] if spacings is not None else None
        title = titles[i] if titles is not None else ""
        if truths is None:
            overlay_masks(images[i], dict(preds[i]), ax=axes[i, 0], colors=palette, alpha=alpha, spacing=spacing,
                          title=f"{title}: prediction")
            continue
        overlay_masks(images[i], dict(truths[i]), ax=axes[i, 0], colors=palette, alpha=alpha, spacing=spacing,
                      title=f"{title}: ground truth")
        overlay_masks(images[i], dict(preds[i]), ax=axes[i, 1], colors=palette, alpha=alpha, spacing=spacing,
                      title="prediction", legend=False)
        labels = {k: f"{k}: {_dice_label(_dice(preds[i][k], truths[i].get(k, np.zeros_like(preds[i][k]))))}"
                  for k in names}
        axes[i, 1].legend(handles=legend_handles(palette, alpha, labels), loc="upper right", fontsize="small",
                          framealpha=0.75, handlelength=1.2, borderaxespad=0.4)
    return fig
