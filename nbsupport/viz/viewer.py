"""Slice viewer: scroll through the slices of a volume, or through cases, with masks (and attention) overlaid
next to the report text.

In JupyterLab it is an ipywidgets panel: a slider over slices (and one over cases), a checkbox per mask, the
image rendered by matplotlib into an ``ipywidgets.Image`` (PNG; lighter than an Output widget and kept when the
notebook is saved), and the text beside it. Headless (papermill, ``nbsupport run``, tests), a widget would be a
dead "Loading widget..." in the executed notebook and its HTML report, so :func:`slice_viewer` draws a static
overview figure instead.
"""
from __future__ import annotations

import dataclasses
import html
import io
import textwrap
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from nbsupport.progress import is_headless
from nbsupport.viz.attention import normalise_map, upsample_bilinear
from nbsupport.viz.overlay import (_aspect, legend_handles, named_masks, new_figure, overlay_masks, resolve_colors,
                                   to_numpy)

CASE_KEYS = ("image", "masks", "title", "text", "spacing", "attention", "modality")


@dataclasses.dataclass
class ViewerCase:
    """One case as the viewer holds it: 2D images are volumes of depth 1."""

    image: np.ndarray  # (D, H, W)
    masks: dict[str, np.ndarray]  # name -> bool (D, H, W)
    title: str = ""
    text: str = ""
    spacing: tuple[float, float] | None = None  # (row_mm, col_mm) in-plane
    attention: np.ndarray | None = None  # (d, h, w), any in-plane size; d == D or mapped proportionally
    is_volume: bool = False
    slice_mm: float | None = None  # distance between slices when the spacing gave it (3 values)
    modality: str = ""  # "CT" enables the window presets; anything else gets an automatic window
    color: np.ndarray | None = None  # (D, H, W, 3) uint8 of a colour photograph (modality "RGB"); image = luminance

    @property
    def depth(self) -> int:
        return self.image.shape[0]

    def slices_with_masks(self) -> np.ndarray:
        if not self.masks:
            return np.zeros(0, dtype=int)
        any_mask = np.any([m.reshape(self.depth, -1).any(axis=1) for m in self.masks.values()], axis=0)
        return np.flatnonzero(any_mask)

    def default_slice(self) -> int:
        """The slice with the most mask area (where a reader wants to start), else the middle one."""
        if self.masks:
            area = sum(m.reshape(self.depth, -1).sum(axis=1) for m in self.masks.values())
            if area.max() > 0:
                return int(np.argmax(area))
        return self.depth // 2

    def attention_slice(self, k: int) -> np.ndarray | None:
        if self.attention is None:
            return None
        d = self.attention.shape[0]
        return self.attention[min(d - 1, int((k + 0.5) * d / self.depth))]


def _case(image: Any, masks: Any = None, class_names: Sequence[str] | None = None, title: str = "", text: str = "",
          spacing: Sequence[float] | None = None, attention: Any = None, where: str = "volume",
          modality: str = "") -> ViewerCase:
    img = to_numpy(image).astype(np.float32)
    color = None
    if str(modality or "").upper() == "RGB":  # endoscopy, dermoscopy...: drawn in colour, windows on the luminance
        if img.ndim != 3 or img.shape[-1] not in (3, 4):
            raise ValueError(f"{where}: an RGB image must be (H, W, 3), got shape {img.shape}")
        color = np.clip(np.round(img[None, ..., :3]), 0, 255).astype(np.uint8)
        img = img[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    if img.ndim not in (2, 3):
        raise ValueError(f"{where}: image must be (H, W) or (D, H, W), got shape {img.shape}")
    is_volume = img.ndim == 3
    vol = img if is_volume else img[None]
    try:
        named = named_masks(masks, class_names, vol.shape if is_volume else vol.shape[1:])
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    named = {k: (m if is_volume else m[None]) for k, m in named.items()}
    in_plane, slice_mm = None, None
    if spacing is not None:
        sp = tuple(float(s) for s in spacing)
        if len(sp) not in (2, 3):
            raise ValueError(f"{where}: spacing must be (row_mm, col_mm) or (slice_mm, row_mm, col_mm), got {sp}")
        if min(sp) <= 0:
            raise ValueError(f"{where}: spacing must be positive (mm), got {sp}")
        in_plane = sp[-2:]
        slice_mm = sp[0] if len(sp) == 3 else None
    att = None
    if attention is not None:
        att = to_numpy(attention).astype(np.float32)
        if att.ndim == 2:
            att = att[None]
        if att.ndim != 3:
            raise ValueError(f"{where}: attention must be (h, w) or (d, h, w), got shape {att.shape}")
    return ViewerCase(vol, named, str(title or ""), str(text or ""), in_plane, att, is_volume, slice_mm,
                      str(modality or ""), color)


def as_cases(volume_or_cases: Any, masks: Any = None, class_names: Sequence[str] | None = None, text: str = "",
             title: str = "", spacing: Sequence[float] | None = None, attention: Any = None,
             modality: str = "") -> list[ViewerCase]:
    """Viewer cases from a volume/image (+ masks) or from a list of case dicts (keys ``image``, ``masks``,
    ``title``, ``text``, ``spacing``, ``attention``, ``modality``); ``modality`` is the default of cases that do not
    name theirs."""
    if isinstance(volume_or_cases, Mapping):
        volume_or_cases = [volume_or_cases]
    if isinstance(volume_or_cases, (list, tuple)) and volume_or_cases and isinstance(volume_or_cases[0], Mapping):
        cases = []
        for i, c in enumerate(volume_or_cases):
            unknown = set(c) - set(CASE_KEYS)
            if unknown or "image" not in c:
                raise ValueError(f"case {i}: keys {sorted(c)}; expected 'image' and optionally {CASE_KEYS[1:]}")
            cases.append(_case(c["image"], c.get("masks"), class_names, c.get("title") or f"case {i}",
                               c.get("text", ""), c.get("spacing"), c.get("attention"), where=f"case {i}",
                               modality=c.get("modality") or modality))
        return cases
    return [_case(volume_or_cases, masks, class_names, title, text, spacing, attention, modality=modality)]


VIEWS = ("axial", "coronal", "sagittal")

# (window width, level) in Hounsfield units; the usual radiology presets (CT cases only).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft tissue": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "mediastinum": (350.0, 50.0),
    "bone": (1800.0, 400.0),
}


def window_options(case: ViewerCase) -> list[str]:
    """Window choices for a case: "auto" (robust percentiles) and, for CT, the presets of :data:`CT_WINDOWS`."""
    return ["auto", *CT_WINDOWS] if case.modality.upper() == "CT" else ["auto"]


def window_range(name: str) -> tuple[float | None, float | None]:
    """(low, high) grey-level bounds of a preset; (None, None) for "auto"."""
    if name in CT_WINDOWS:
        width, level = CT_WINDOWS[name]
        return level - width / 2, level + width / 2
    return None, None


def plane_count(case: ViewerCase, view: str) -> int:
    """Number of planes along the view's axis: slices (axial), rows (coronal) or columns (sagittal)."""
    return case.image.shape[VIEWS.index(view)]


def case_plane(case: ViewerCase, view: str, k: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None,
                                                              tuple[float, float] | None]:
    """Plane ``k`` of a case in one view: (image (rows, cols), masks, attention at its own grid or None,
    (row_mm, col_mm) or None). Coronal and sagittal planes put the last slice at the top."""
    if view == "axial":
        return case.image[k], {n: m[k] for n, m in case.masks.items()}, case.attention_slice(k), case.spacing
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if not case.is_volume:
        raise ValueError(f"{case.title or 'case'}: a 2D image has only the axial view")
    row_mm, col_mm = case.spacing if case.spacing is not None else (1.0, 1.0)
    slice_mm = case.slice_mm if case.slice_mm is not None else max(row_mm, col_mm)
    att = None
    if view == "coronal":
        take = (slice(None, None, -1), k, slice(None))
        spacing = (slice_mm, col_mm)
        if case.attention is not None:
            a = case.attention
            att = a[::-1, min(a.shape[1] - 1, int((k + 0.5) * a.shape[1] / case.image.shape[1])), :]
    else:
        take = (slice(None, None, -1), slice(None), k)
        spacing = (slice_mm, row_mm)
        if case.attention is not None:
            a = case.attention
            att = a[::-1, :, min(a.shape[2] - 1, int((k + 0.5) * a.shape[2] / case.image.shape[2]))]
    return case.image[take], {n: m[take] for n, m in case.masks.items()}, att, spacing


def draw_case_plane(ax: Axes, case: ViewerCase, k: int, view: str = "axial", visible: Sequence[str] | None = None,
                    show_attention: bool = True, colors: Mapping[str, str] | None = None, alpha: float = 0.35,
                    legend: bool = True, window: str = "auto", heat_alpha: float = 0.4) -> list[str]:
    """Plane ``k`` of ``case`` in ``view`` with its visible masks (and attention, at ``heat_alpha`` opacity) on
    ``ax``, grey levels through ``window``; returns the mask names drawn."""
    image, masks, att, spacing = case_plane(case, view, k)
    names = [n for n in case.masks if visible is None or n in visible]
    lo, hi = window_range(window)
    shown = case.color[k] if case.color is not None and view == "axial" else image
    overlay_masks(shown, {n: masks[n] for n in names}, ax=ax, colors=colors, alpha=alpha, spacing=spacing,
                  legend=legend, vmin=lo, vmax=hi)
    if att is not None and show_attention and heat_alpha > 0:
        heat = normalise_map(upsample_bilinear(att, image.shape))
        # above the image and fills, below the contours (zorder 2) and the legend
        ax.imshow(heat, cmap="jet", alpha=heat_alpha, vmin=0.0, vmax=1.0, interpolation="bilinear", zorder=0.5,
                  aspect=_aspect(spacing))
    return names


def draw_case_slice(ax: Axes, case: ViewerCase, k: int, visible: Sequence[str] | None = None,
                    show_attention: bool = True, colors: Mapping[str, str] | None = None, alpha: float = 0.35,
                    legend: bool = True) -> list[str]:
    """Slice ``k`` of ``case`` with its visible masks (and attention) on ``ax``; returns the mask names drawn."""
    return draw_case_plane(ax, case, k, "axial", visible, show_attention, colors, alpha, legend)


def _wrap(text: str, width: int, max_chars: int | None = None) -> str:
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 1].rstrip() + "…"
    return "\n".join(textwrap.fill(p, width) for p in text.splitlines() if p.strip())


# ---------------------------------------------------------------------------------------------- static overview
def slice_overview(volume_or_cases: Any, masks: Any = None, count: int = 6, ncols: int = 3, *,
                   class_names: Sequence[str] | None = None, text: str = "", title: str = "",
                   spacing: Sequence[float] | None = None, attention: Any = None,
                   colors: Mapping[str, str] | None = None, alpha: float = 0.35, panel_size: float = 3.2) -> Figure:
    """A static grid standing in for the viewer: ``count`` evenly spaced slices (of those containing a mask, when
    any do) of one volume, or ``count`` evenly spaced cases (each at its slice with the most mask area).

    Same inputs as :func:`slice_viewer`; returns a new figure (not registered with pyplot).
    """
    cases = as_cases(volume_or_cases, masks, class_names, text, title, spacing, attention)
    if len(cases) == 1:
        case = cases[0]
        candidates = case.slices_with_masks()
        if candidates.size == 0:
            candidates = np.arange(case.depth)
        picks = [(case, int(candidates[i])) for i in np.unique(np.linspace(0, candidates.size - 1, count).round()
                                                                .astype(int))]
    else:
        picks = [(cases[i], cases[i].default_slice())
                 for i in np.unique(np.linspace(0, len(cases) - 1, count).round().astype(int))]
    names = list(dict.fromkeys(n for c in cases for n in c.masks))
    palette = resolve_colors(names, colors)

    ncols = max(1, min(ncols, len(picks)))
    nrows = -(-len(picks) // ncols)
    first = picks[0][0]
    has_text = len(cases) > 1 and any(c.text for c, _ in picks)
    fig = new_figure(nrows, ncols, panel_size, _aspect(first.spacing) * first.image.shape[1] / first.image.shape[2]
                     + (0.35 if has_text else 0.0), extra_width=1.5 if names else 0.0)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, (case, k) in zip(axes, picks):
        # CT in the soft-tissue window, as the interactive viewer opens; others on robust percentiles
        draw_case_plane(ax, case, k, colors=palette, alpha=alpha, legend=False,
                        window="soft tissue" if len(window_options(case)) > 1 else "auto")
        if len(cases) == 1:
            ax.set_title(f"slice {k + 1}/{case.depth}" if case.is_volume else case.title, fontsize="medium")
        else:
            ax.set_title(case.title + (f" (slice {k + 1}/{case.depth})" if case.is_volume else ""), fontsize="medium")
            if case.text:
                ax.set_xlabel(_wrap(case.text, 48, 240), fontsize=7.5, loc="left")
    for ax in axes[len(picks):]:
        ax.set_axis_off()
    if names:
        fig.legend(handles=legend_handles(palette, alpha), loc="outside right upper", fontsize="small")
    if len(cases) == 1:
        if cases[0].title and cases[0].is_volume:
            fig.suptitle(cases[0].title)
        if cases[0].text:
            fig.supxlabel(_wrap(cases[0].text, 110, 900), fontsize=8.5)
    return fig


# ---------------------------------------------------------------------------------------------- widget
class SliceViewer(widgets.VBox):
    """The interactive viewer (an ipywidgets VBox). Build it with :func:`build_slice_viewer`.

    Attributes:
        case_slider, slice_slider: ``IntSlider`` over cases / slices (hidden when there is only one).
        view: ``Dropdown`` axial / coronal / sagittal (volumes only).
        window: ``Dropdown`` "auto", plus the CT presets (soft tissue, lung, mediastinum, bone) for CT cases.
        mask_toggles: ``{name: Checkbox}``; mask_colors: ``{name: ColorPicker}``.
        attention_toggle, attention_opacity: ``Checkbox`` and ``FloatSlider`` when any case has attention.
        image: the ``ipywidgets.Image`` whose PNG ``value`` is the current rendering.
        text_panel: ``HTML`` beside the image with the case title, slice and text.
        drawn_masks: names of the masks in the last rendering.
    """

    def __init__(self, cases: Sequence[ViewerCase], colors: Mapping[str, str] | None = None, alpha: float = 0.35,
                 figsize: tuple[float, float] = (5.0, 5.0), dpi: int = 100, cache_size: int = 64):
        super().__init__()
        if not cases:
            raise ValueError("the slice viewer needs at least one case")
        self.cases = list(cases)
        self.alpha = alpha
        self.figsize = figsize
        self.dpi = dpi
        names = list(dict.fromkeys(n for c in self.cases for n in c.masks))
        self.palette = resolve_colors(names, colors)
        self.drawn_masks: list[str] = []
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._cache_size = cache_size
        self._syncing = False

        self.case_slider = widgets.IntSlider(value=0, min=0, max=max(len(self.cases) - 1, 0), description="case",
                                             continuous_update=True)
        self.slice_slider = widgets.IntSlider(value=0, min=0, max=0, description="slice", continuous_update=True)
        self.view = widgets.Dropdown(options=list(VIEWS), value="axial", description="view",
                                     layout=widgets.Layout(width="14em"))
        self.window = widgets.Dropdown(options=["auto"], value="auto", description="window",
                                       layout=widgets.Layout(width="16em"))
        self.mask_toggles = {n: widgets.Checkbox(value=True, description=n, indent=False,
                                                 layout=widgets.Layout(width="auto")) for n in names}
        self.mask_colors = {n: widgets.ColorPicker(value=self.palette[n], concise=True,
                                                   layout=widgets.Layout(width="2.2em")) for n in names}
        has_attention = any(c.attention is not None for c in self.cases)
        self.attention_toggle = (widgets.Checkbox(value=True, description="attention", indent=False,
                                                  layout=widgets.Layout(width="auto")) if has_attention else None)
        self.attention_opacity = (widgets.FloatSlider(value=0.4, min=0.0, max=1.0, step=0.05, description="opacity",
                                                      continuous_update=False) if has_attention else None)
        width_px = int(figsize[0] * dpi)
        self.image = widgets.Image(format="png", layout=widgets.Layout(width=f"{width_px}px"))
        self.text_panel = widgets.HTML(layout=widgets.Layout(max_width="40em", padding="0 0 0 12px"))
        if len(self.cases) == 1:
            self.case_slider.layout.display = "none"
        toggles = [w for n in names for w in (self.mask_colors[n], self.mask_toggles[n])]
        if self.attention_toggle is not None:
            toggles += [self.attention_toggle, self.attention_opacity]
        self.children = [widgets.HBox([self.case_slider, self.view, self.slice_slider, self.window]),
                         widgets.HBox(toggles, layout=widgets.Layout(flex_flow="row wrap")),
                         widgets.HBox([self.image, self.text_panel])]

        self._chosen_window: str | None = None
        self.window.observe(self._on_window, names="value")
        self.case_slider.observe(self._on_case, names="value")
        self.view.observe(self._on_view, names="value")
        for w in (self.slice_slider, self.window, *toggles):
            w.observe(self._on_change, names="value")
        self._enter_case(0)

    # ------------------------------------------------------------------ state
    @property
    def case(self) -> ViewerCase:
        return self.cases[self.case_slider.value]

    def visible_masks(self) -> list[str]:
        return [n for n, cb in self.mask_toggles.items() if cb.value]

    def _enter_case(self, index: int) -> None:
        case = self.cases[index]
        self._syncing = True  # moving max/value below would otherwise render intermediate states
        try:
            if not case.is_volume:
                self.view.value = "axial"
            self.view.layout.display = None if case.is_volume else "none"
            options = window_options(case)
            # a window the reader picked stays while it applies; else CT opens in soft tissue, the rest in auto
            keep = self._chosen_window if self._chosen_window in options else (
                "soft tissue" if len(options) > 1 else "auto")
            self.window.options = options
            self.window.value = keep
            self._set_planes(case, default=True)
            if self.attention_toggle is not None:
                shown = None if case.attention is not None else "none"
                self.attention_toggle.layout.display = self.attention_opacity.layout.display = shown
        finally:
            self._syncing = False
        self.render()

    def _set_planes(self, case: ViewerCase, default: bool) -> None:
        n = plane_count(case, self.view.value)
        self.slice_slider.max = n - 1
        self.slice_slider.value = case.default_slice() if self.view.value == "axial" and default else n // 2
        self.slice_slider.description = {"axial": "slice", "coronal": "row", "sagittal": "column"}[self.view.value]
        self.slice_slider.layout.display = None if n > 1 else "none"

    def _on_case(self, change: dict) -> None:
        self._enter_case(change["new"])

    def _on_window(self, change: dict) -> None:
        if not self._syncing:
            self._chosen_window = change["new"]

    def _on_view(self, _change: dict) -> None:
        if self._syncing:
            return
        self._syncing = True
        try:
            self._set_planes(self.case, default=True)
        finally:
            self._syncing = False
        self.render()

    def _on_change(self, _change: dict) -> None:
        if not self._syncing:
            self.render()

    # ------------------------------------------------------------------ drawing
    def figure(self) -> Figure:
        """The current view as a new matplotlib figure."""
        case, k, view = self.case, self.slice_slider.value, self.view.value
        fig = Figure(figsize=self.figsize, dpi=self.dpi, layout="constrained")
        ax = fig.subplots()
        show_att = self.attention_toggle is not None and self.attention_toggle.value
        colors = {n: cp.value for n, cp in self.mask_colors.items()}
        heat_alpha = self.attention_opacity.value if self.attention_opacity is not None else 0.0
        self.drawn_masks = draw_case_plane(ax, case, k, view, self.visible_masks(), show_att, colors, self.alpha,
                                           window=self.window.value, heat_alpha=heat_alpha)
        if case.is_volume:
            label = "slice" if view == "axial" else f"{view} plane"
            ax.set_title(f"{label} {k + 1}/{plane_count(case, view)}", fontsize="medium")
        return fig

    def render(self) -> bytes:
        """Redraw the current view into ``image`` and ``text_panel``; returns the PNG bytes."""
        case, k = self.case, self.slice_slider.value
        visible = self.visible_masks()
        show_att = self.attention_toggle is not None and self.attention_toggle.value
        key = (self.case_slider.value, self.view.value, k, tuple(visible), show_att, self.window.value,
               tuple(cp.value for cp in self.mask_colors.values()),
               self.attention_opacity.value if self.attention_opacity is not None else None)
        png = self._cache.get(key)
        if png is None:
            buf = io.BytesIO()
            self.figure().savefig(buf, format="png", dpi=self.dpi)
            png = buf.getvalue()
            self._cache[key] = png
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
            self.drawn_masks = [n for n in case.masks if n in visible]
        self.image.value = png
        self.text_panel.value = self._text_html(case, k, self.view.value)
        return png

    @staticmethod
    def _text_html(case: ViewerCase, k: int, view: str = "axial") -> str:
        parts = []
        if case.title:
            parts.append(f"<b>{html.escape(case.title)}</b>")
        if case.is_volume:
            label = "slice" if view == "axial" else f"{view} plane"
            parts.append(f"<div style='color:#666'>{label} {k + 1} / {plane_count(case, view)}</div>")
        areas = ([f"{html.escape(n)}: {int(m[k].sum())} px" for n, m in case.masks.items()] if view == "axial"
                 else [])
        if areas:
            parts.append(f"<div style='color:#666;font-size:90%'>{' · '.join(areas)}</div>")
        if case.text:
            parts.append("<div style='white-space:pre-wrap;margin-top:8px;font-size:13px;line-height:1.4'>"
                         f"{html.escape(case.text)}</div>")
        return "\n".join(parts)


def build_slice_viewer(volume_or_cases: Any, masks: Any = None, *, class_names: Sequence[str] | None = None,
                       text: str = "", title: str = "", spacing: Sequence[float] | None = None, attention: Any = None,
                       colors: Mapping[str, str] | None = None, alpha: float = 0.35,
                       figsize: tuple[float, float] = (5.0, 5.0), dpi: int = 100, modality: str = "") -> SliceViewer:
    """The interactive :class:`SliceViewer`, whether or not a frontend is attached. Arguments as
    :func:`slice_viewer`."""
    cases = as_cases(volume_or_cases, masks, class_names, text, title, spacing, attention, modality)
    return SliceViewer(cases, colors=colors, alpha=alpha, figsize=figsize, dpi=dpi)


def slice_viewer(volume_or_cases: Any, masks: Any = None, *, class_names: Sequence[str] | None = None,
                 text: str = "", title: str = "", spacing: Sequence[float] | None = None, attention: Any = None,
                 colors: Mapping[str, str] | None = None, alpha: float = 0.35, static_count: int = 6,
                 figsize: tuple[float, float] = (5.0, 5.0), modality: str = "") -> SliceViewer | Figure:
    """Scroll through slices or cases with masks overlaid; a static figure when headless.

    Args:
        volume_or_cases: a (D, H, W) volume or (H, W) image, or a list of case dicts ``{"image": (H, W) or
            (D, H, W), "masks": {name: bool array like image}, "title": str, "text": str, "spacing": (row_mm,
            col_mm) or (slice_mm, row_mm, col_mm), "attention": (h, w) or (d, h, w)}``.
        masks: for a volume/image: ``{name: bool array}`` of the image's shape, or a (C, ...) array with
            ``class_names``.
        text: report text shown beside the image (a single volume; cases carry their own).
        spacing: voxel size in mm; only the in-plane (row, col) part sets the aspect ratio.
        attention: attention map(s) drawn as a heatmap over the slice, toggled by a checkbox.
        static_count: how many slices/cases the headless figure shows.
        modality: "CT" (values in Hounsfield units) adds the window presets soft tissue, lung, mediastinum and
            bone; "RGB" takes an (H, W, 3) uint8 colour image (endoscopy, dermoscopy) and draws it in colour; MR,
            X-ray and others get an automatic window. Cases may carry their own ``"modality"``.

    Returns:
        A :class:`SliceViewer` widget with a frontend; headless (``nbsupport.progress.is_headless()``) the figure
        of :func:`slice_overview`, so the executed notebook and its HTML report still show the masks.
    """
    if is_headless():
        return slice_overview(volume_or_cases, masks, count=static_count, class_names=class_names, text=text,
                              title=title, spacing=spacing, attention=attention, colors=colors, alpha=alpha)
    return build_slice_viewer(volume_or_cases, masks, class_names=class_names, text=text, title=title,
                              spacing=spacing, attention=attention, colors=colors, alpha=alpha, figsize=figsize,
                              modality=modality)
