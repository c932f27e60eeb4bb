"""Attention maps over the image they attend to: one overlay, or a grid per layer / head / query."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from nbsupport.viz.overlay import _aspect, _fix_limits, as_2d_image, draw_image, new_figure, to_numpy


def upsample_bilinear(attention: Any, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (h, w) map to ``shape`` = (H, W).

    Same sampling as ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` (pixel centres
    aligned, edges clamped), i.e. how the models upsample their own low-resolution outputs.
    """
    a = to_numpy(attention).astype(np.float64)
    if a.ndim != 2:
        raise ValueError(f"attention map must be (h, w), got shape {a.shape}")
    out_h, out_w = int(shape[0]), int(shape[1])

    def src_coords(n_in: int, n_out: int) -> np.ndarray:
        return np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)

    rows = np.arange(a.shape[0])
    cols = np.arange(a.shape[1])
    # separable: along columns for every input row, then along rows for every output column
    tmp = np.stack([np.interp(src_coords(a.shape[1], out_w), cols, r) for r in a])  # (h, W)
    return np.stack([np.interp(src_coords(a.shape[0], out_h), rows, c) for c in tmp.T], axis=1)  # (H, W)


def normalise_map(a: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes zeros (no structure to show)."""
    a = np.nan_to_num(np.asarray(a, dtype=np.float64))
    lo, hi = float(a.min()), float(a.max())
    return np.zeros_like(a) if hi - lo <= 1e-12 else (a - lo) / (hi - lo)


def _draw_query(ax: Axes, query_point: Sequence[float] | None) -> None:
    if query_point is not None:
        row, col = query_point
        ax.plot([col], [row], marker="*", markersize=15, markerfacecolor="white", markeredgecolor="black",
                markeredgewidth=1.2, linestyle="none", label="query")


def attention_overlay(image: Any, attention: Any, ax: Axes | None = None, alpha: float = 0.5, cmap: str = "jet",
                      query_point: Sequence[float] | None = None, title: str | None = None,
                      spacing: Sequence[float] | None = None, colorbar: bool = True, normalise: bool = True) -> Axes:
    """An attention map (any resolution) as a heatmap over the grayscale image.

    Args:
        image: (H, W) image.
        attention: (h, w) float map, e.g. one head's attention from a query to all keys, reshaped to the key grid;
            upsampled bilinearly to (H, W) and min-max normalised (``normalise=False`` keeps raw values).
        ax: axes to draw into; ``None`` makes a new pyplot figure (shown inline by Jupyter).
        alpha: opacity of the heatmap.
        query_point: ``(row, col)`` in image pixels of the query whose attention this is; drawn as a star.
        spacing: ``(row_mm, col_mm)`` for the aspect ratio.
        colorbar: add a colourbar for the heatmap.

    Returns:
        The axes; ``ax.images[-1]`` holds the upsampled (H, W) heatmap.
    """
    img = as_2d_image(image)
    shape = img.shape[:2]
    if ax is None:
        _, ax = plt.subplots(figsize=(5.6, 5 * _aspect(spacing) * shape[0] / shape[1]), layout="constrained")
    heat = upsample_bilinear(attention, shape)
    if normalise:
        heat = normalise_map(heat)
    norm = Normalize(0.0, 1.0) if normalise else Normalize(float(heat.min()), float(heat.max()))
    draw_image(ax, img, spacing)
    ax.imshow(heat, cmap=cmap, norm=norm, alpha=alpha, interpolation="bilinear", aspect=_aspect(spacing))
    _draw_query(ax, query_point)
    _fix_limits(ax, shape)
    if colorbar:
        # a separate opaque mappable: the translucent heatmap would give a washed-out bar
        ax.figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.046, pad=0.03,
                           label="attention (normalised)" if normalise else "attention")
    if title:
        ax.set_title(title)
    return ax


def attention_grid(image: Any, maps: Sequence[tuple[str, Any]] | Mapping[str, Any], ncols: int = 4,
                   query_point: Sequence[float] | None = None, alpha: float = 0.5, cmap: str = "jet",
                   spacing: Sequence[float] | None = None, suptitle: str | None = None,
                   panel_size: float = 3.0) -> Figure:
    """Several attention maps of one image (per layer, head or query), each normalised, one shared colourbar.

    Args:
        image: (H, W) image.
        maps: ``[(title, (h, w) map), ...]`` or ``{title: map}``; maps may differ in resolution (e.g. SegFormer
            stages with spatial-reduction ratios 8, 4, 2, 1).
        ncols: panels per row.
        query_point: ``(row, col)`` in image pixels, drawn on every panel.

    Returns:
        A new figure (not registered with pyplot).
    """
    items = list(maps.items()) if isinstance(maps, Mapping) else [tuple(m) for m in maps]
    if not items:
        raise ValueError("attention_grid needs at least one (title, map) pair")
    img = as_2d_image(image)
    ncols = max(1, min(ncols, len(items)))
    nrows = -(-len(items) // ncols)
    fig = new_figure(nrows, ncols, panel_size, _aspect(spacing) * img.shape[0] / img.shape[1], extra_width=0.8)
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax, (name, amap) in zip(axes, items):
        attention_overlay(img, amap, ax=ax, alpha=alpha, cmap=cmap, query_point=query_point, spacing=spacing,
                          colorbar=False, title=str(name))
    for ax in axes[len(items):]:
        ax.set_axis_off()
    fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap), ax=list(axes[:len(items)]), shrink=0.8,
                 label="attention (normalised per map)")
    if suptitle:
        fig.suptitle(suptitle)
    return fig
