"""A Figure returned by a notebook cell is formatted as PNG even when pyplot never ran."""
from __future__ import annotations

import numpy as np
from IPython.core.interactiveshell import InteractiveShell

from nbsupport.viz import overlay_masks, register_figure_display
from nbsupport.viz.overlay import new_figure


def test_figures_made_outside_pyplot_format_as_png():
    shell = InteractiveShell.instance()
    fig = new_figure()
    overlay_masks(np.zeros((8, 8)), {"m": np.eye(8, dtype=bool)}, ax=fig.subplots())
    png = shell.display_formatter.formatters["image/png"]
    png.type_printers.pop(type(fig), None)  # as in a fresh kernel where pyplot never switched backends
    assert "image/png" not in shell.display_formatter.format(fig)[0]
    assert register_figure_display(shell)
    data = shell.display_formatter.format(fig)[0]["image/png"]
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
