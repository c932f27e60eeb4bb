"""Shared figures for every system's notebooks: mask overlays, image grids, training curves, attention maps and
the slice viewer.

Axes-level functions (``overlay_masks``, ``attention_overlay``) draw into a given ``ax`` or a new pyplot figure;
figure-level ones return a new ``Figure`` outside pyplot's registry (shown once when a cell returns it, saved with
``RunFolder.save_figure``). None of them calls ``plt.show()``.
"""
from __future__ import annotations

from nbsupport.viz.bertviz_offline import attention_view, save_attention_html
from nbsupport.viz.case_viewer_html import save_case_viewer_html
from nbsupport.viz.attention import attention_grid, attention_overlay, upsample_bilinear
from nbsupport.viz.figures import image_grid, metric_table_figure, plot_training_curves
from nbsupport.viz.overlay import ERROR_COLORS, PALETTE, class_color, compare_masks, compare_masks_grid, overlay_masks
from nbsupport.viz.display import register_figure_display
from nbsupport.viz.viewer import SliceViewer, build_slice_viewer, slice_overview, slice_viewer

register_figure_display()

__all__ = [
    "ERROR_COLORS",
    "PALETTE",
    "SliceViewer",
    "attention_grid",
    "attention_overlay",
    "attention_view",
    "build_slice_viewer",
    "class_color",
    "compare_masks",
    "compare_masks_grid",
    "image_grid",
    "metric_table_figure",
    "overlay_masks",
    "plot_training_curves",
    "register_figure_display",
    "save_attention_html",
    "save_case_viewer_html",
    "slice_overview",
    "slice_viewer",
    "upsample_bilinear",
]
