"""Figures every system's notebooks share: image grids, training curves, metric tables.

Functions here return a new ``matplotlib.figure.Figure`` that is not registered with pyplot: nothing piles up
when they are called in a loop, ``RunFolder.save_figure(fig, name)`` saves them, and a notebook cell shows one by
returning it (or ``display(fig)``); nobody needs ``plt.show()`` or ``plt.close()``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from nbsupport.viz.overlay import _aspect, as_2d_image, legend_handles, new_figure, overlay_masks, resolve_colors

X_KEYS = ("step", "epoch")
LR_KEYS = ("lr", "learning_rate")
EVAL_PREFIXES = ("val_", "eval_", "test_")


def image_grid(images: Sequence[Any] | np.ndarray, titles: Sequence[str] | None = None, ncols: int = 4,
               cmap: str = "gray", masks: Sequence[Mapping[str, Any] | None] | None = None,
               suptitle: str | None = None, spacing: Sequence[float] | Sequence[Sequence[float]] | None = None,
               colors: Mapping[str, str] | None = None, alpha: float = 0.35, panel_size: float = 3.0) -> Figure:
    """A grid of images, optionally with masks, sharing one legend.

    Args:
        images: N (H_i, W_i) images (a list, or an (N, H, W) array).
        titles: N panel titles.
        ncols: panels per row.
        cmap: colour map of the images (masks keep their class colours).
        masks: N ``{name: bool (H_i, W_i)}`` dicts (``None`` for an image without masks).
        spacing: ``(row_mm, col_mm)`` for all images, or one per image.

    Returns:
        A new figure (not registered with pyplot).
    """
    images = list(images)
    n = len(images)
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    for name, seq in (("titles", titles), ("masks", masks)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} images")
    if spacing is None or np.ndim(spacing) == 1:
        spacings = [spacing] * n
    elif len(spacing) == n:
        spacings = list(spacing)
    else:
        raise ValueError(f"spacing must be one (row_mm, col_mm) pair or one pair per image, got {len(spacing)} pairs "
                         f"for {n} images")

    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    first = as_2d_image(images[0])
    mask_names = list(dict.fromkeys(k for m in (masks or []) if m for k in m))
    fig = new_figure(nrows, ncols, panel_size, _aspect(spacings[0]) * first.shape[0] / first.shape[1],
                     extra_width=1.5 if mask_names else 0.0)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    palette = resolve_colors(mask_names, colors)
    for i, ax in enumerate(axes):
        if i >= n:
            ax.set_axis_off()
            continue
        overlay_masks(images[i], (masks[i] if masks is not None else None) or {}, ax=ax, colors=palette,
                      alpha=alpha, spacing=spacings[i], legend=False, cmap=cmap)
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize="medium")
    if mask_names:
        fig.legend(handles=legend_handles(palette, alpha), loc="outside right upper", fontsize="small")
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def _series(history: Sequence[Mapping[str, Any]], key: str, x: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(float(h[x]), float(h[key])) for h in history
           if _is_number(h.get(key)) and _is_number(h.get(x))]
    pts.sort()
    arr = np.asarray(pts, dtype=float).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def _is_number(v: Any) -> bool:
    if isinstance(v, bool) or v is None:
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def plot_training_curves(history: Sequence[Mapping[str, Any]] | pd.DataFrame, x: str = "step",
                         title: str | None = None) -> Figure:
    """Loss curves, validation metrics and the learning rate against steps (or epochs).

    Args:
        history: log entries such as ``{"step": 10, "epoch": 0.5, "train_loss": 0.7, "lr": 1e-4}`` and
            ``{"step": 100, "epoch": 1.0, "val_loss": 0.5, "val_dice": 0.8}`` (a list of dicts or a DataFrame).
            Keys containing ``loss`` go on the loss axis; other keys starting with ``val_``/``eval_``/``test_`` on
            the metric axis; ``lr``/``learning_rate`` on a small bottom axis (log scale when it spans >10x).
            Other keys (grad norms, throughput) are ignored.
        x: ``"step"`` or ``"epoch"``; falls back to the other when no entry has it.

    Returns:
        A new figure (not registered with pyplot); each curve is a line labelled with its key.
    """
    if isinstance(history, pd.DataFrame):
        history = history.to_dict("records")
    history = list(history)
    if not history:
        raise ValueError("training history is empty: nothing to plot")
    if not any(_is_number(h.get(x)) for h in history):
        other = next((k for k in X_KEYS if k != x and any(_is_number(h.get(k)) for h in history)), None)
        if other is None:
            raise ValueError(f"no history entry has a numeric {x!r} (or {X_KEYS}) to plot against")
        x = other
    keys = list(dict.fromkeys(k for h in history for k, v in h.items() if _is_number(v)))
    loss_keys = [k for k in keys if "loss" in k.lower() and k not in X_KEYS]
    lr_keys = [k for k in keys if k in LR_KEYS]
    metric_keys = [k for k in keys if k.startswith(EVAL_PREFIXES) and k not in loss_keys]

    panels: list[tuple[str, list[str], float]] = []
    if loss_keys:
        panels.append(("loss", loss_keys, 3.0))
    if metric_keys:
        panels.append(("metric", metric_keys, 3.0))
    if lr_keys:
        panels.append(("lr", lr_keys, 1.2))
    if not panels:
        raise ValueError(f"no loss, validation metric or lr keys among {keys}")

    fig = Figure(figsize=(8, sum(p[2] for p in panels) + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(panels), 1, sharex=True,
                                      gridspec_kw={"height_ratios": [p[2] for p in panels]}))
    for ax, (kind, ks, _) in zip(axes, panels):
        for k in ks:
            xs, ys = _series(history, k, x)
            sparse = len(xs) <= 20  # evaluation points: markers make single evaluations visible
            ax.plot(xs, ys, label=k, marker="o" if sparse else None, markersize=3.5,
                    linewidth=1.0 if kind == "lr" else 1.5)
            if kind == "lr" and len(ys) and ys.min() > 0 and ys.max() / ys.min() > 10:
                ax.set_yscale("log")
        ax.set_ylabel({"loss": "loss", "metric": "validation metric", "lr": "lr"}[kind])
        ax.grid(True, alpha=0.3)
        if kind != "lr" or len(ks) > 1:
            ax.legend(fontsize="small", loc="best")
    axes[-1].set_xlabel(x)
    if title:
        fig.suptitle(title)
    return fig


def metric_table_figure(df: pd.DataFrame, title: str | None = None, float_format: str = "{:.3f}",
                        max_rows: int = 40) -> Figure:
    """A DataFrame (e.g. per-class means) drawn as a table, for HTML reports and saved figures.

    Floats are formatted with ``float_format``, NaN/None shown as "–"; more than ``max_rows`` rows are cut with a
    final "…" row.
    """
    shown = df.head(max_rows)

    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        if isinstance(v, (float, np.floating)):
            return float_format.format(v)
        return str(v)

    cells = [[fmt(v) for v in row] for row in shown.itertuples(index=False)]
    if len(df) > max_rows:
        cells.append(["…"] * len(df.columns))
    n_rows = max(len(cells), 1)
    fig = Figure(figsize=(max(4.0, 1.3 * len(df.columns)), 0.6 + 0.3 * (n_rows + 1)), layout="constrained")
    ax = fig.subplots()
    ax.set_axis_off()
    table = ax.table(cellText=cells or [[""] * len(df.columns)], colLabels=[str(c) for c in df.columns],
                     loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1.0, 1.25)
    for (r, _), cell in table.get_celld().items():
        if r == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#e8e8e8")
    if title:
        ax.set_title(title)
    return fig
