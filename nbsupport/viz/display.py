"""Figures returned by a notebook cell show as PNG images, whether or not pyplot ever ran.

The workbench's figures are ``matplotlib.figure.Figure`` objects made outside pyplot (nothing piles up in loops).
IPython only learns to render a Figure as PNG when the inline backend is activated, which happens when pyplot
first switches backends; a notebook that never calls pyplot (e.g. every stage under ``nbsupport run``) then shows
"<Figure size 640x480 with 1 Axes>" text, and so does its HTML report. Importing ``nbsupport.viz`` registers the
PNG formatter in a running kernel so returned figures are images from the first cell on.
"""
from __future__ import annotations

from typing import Any


def register_figure_display(shell: Any | None = None) -> bool:
    """Register the PNG formatter for matplotlib figures in ``shell`` (default: the running IPython kernel).

    Returns True when a formatter is in place afterwards, False outside IPython.
    """
    if shell is None:
        try:
            from IPython import get_ipython
        except ImportError:
            return False
        shell = get_ipython()
    if shell is None:
        return False
    from IPython.core.pylabtools import print_figure
    from matplotlib.figure import Figure

    png = shell.display_formatter.formatters["image/png"]
    if Figure not in png.type_printers:  # the inline backend's own registration wins when it ran first
        png.for_type(Figure, lambda fig: print_figure(fig, "png", bbox_inches="tight"))
    return True
