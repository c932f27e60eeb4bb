"""Slice viewer: static fallback when headless, and the widget's slider / toggles change what is rendered."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import nbsupport.viz.viewer as viewer_module  # noqa: E402
from nbsupport.viz import SliceViewer, build_slice_viewer, slice_overview, slice_viewer  # noqa: E402


def _volume(depth=10, h=32, w=40):
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(depth, h, w)).astype(np.float32) + np.arange(depth)[:, None, None]
    tumour = np.zeros((depth, h, w), dtype=bool)
    tumour[3:7, 8:20, 10:25] = True
    tumour[5, 5:25, 5:35] = True  # slice 5 has the largest area
    organ = np.zeros_like(tumour)
    organ[2:8, 15:30, 20:38] = True
    return vol, {"tumour": tumour, "organ": organ}


def test_headless_returns_static_figure(monkeypatch):
    monkeypatch.setenv("NBSUPPORT_HEADLESS", "1")
    vol, masks = _volume()
    before = plt.get_fignums()
    fig = slice_viewer(vol, masks, title="patient 7", text="CTV: left breast.")
    assert isinstance(fig, Figure)
    assert plt.get_fignums() == before
    titles = [a.get_title() for a in fig.axes if a.axison]
    # evenly spaced among the slices that contain a mask (2..7), at most 6
    assert titles == [f"slice {k}/10" for k in (3, 4, 5, 6, 7, 8)]
    assert fig.get_suptitle() == "patient 7"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["tumour", "organ"]


def test_static_overview_of_cases_shows_text():
    image = np.random.default_rng(1).random((20, 24))
    cases = [{"image": image, "masks": {"lesion": image > 0.9}, "title": f"case {i}", "text": f"report {i}"}
             for i in range(10)]
    fig = slice_overview(cases, count=4)
    panels = [a for a in fig.axes if a.axison]
    assert [a.get_title() for a in panels] == ["case 0", "case 3", "case 6", "case 9"]
    assert panels[1].get_xlabel() == "report 3"


def test_with_frontend_returns_widget(monkeypatch):
    monkeypatch.setattr(viewer_module, "is_headless", lambda: False)
    vol, masks = _volume()
    assert isinstance(slice_viewer(vol, masks), SliceViewer)


def test_slider_changes_rendered_image():
    vol, masks = _volume()
    v = build_slice_viewer(vol, masks, spacing=(3.0, 1.0, 1.0), text="report")
    assert v.slice_slider.value == 5  # starts at the slice with the most mask area
    assert v.slice_slider.max == 9 and v.case_slider.layout.display == "none"
    first = v.image.value
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    v.slice_slider.value = 0
    assert v.image.value != first
    assert "slice 1 / 10" in v.text_panel.value and "report" in v.text_panel.value
    v.slice_slider.value = 5
    assert v.image.value == first  # same view, same pixels (served from the cache)


def test_mask_toggle_changes_what_is_drawn():
    vol, masks = _volume()
    v = build_slice_viewer(vol, masks)
    with_all = v.image.value
    assert v.drawn_masks == ["tumour", "organ"]
    v.mask_toggles["tumour"].value = False
    assert v.drawn_masks == ["organ"]
    assert v.image.value != with_all
    v.mask_toggles["tumour"].value = True
    assert v.image.value == with_all


def test_case_slider_switches_image_text_and_slice_range():
    image2d = np.random.default_rng(2).random((24, 24))
    vol, masks = _volume(depth=6)
    cases = [
        {"image": image2d, "masks": {"tumour": image2d > 0.8}, "title": "x-ray", "text": "No effusion."},
        {"image": vol, "masks": masks, "title": "ct", "text": "Mass in <b>segment 4</b>.",
         "attention": np.random.default_rng(3).random((3, 4, 5))},
    ]
    v = build_slice_viewer(cases)
    assert v.slice_slider.layout.display == "none" and "No effusion." in v.text_panel.value
    png_case0 = v.image.value
    v.case_slider.value = 1
    assert v.image.value != png_case0
    assert v.slice_slider.max == 5 and v.slice_slider.layout.display is None
    assert "&lt;b&gt;segment 4&lt;/b&gt;" in v.text_panel.value  # report text is escaped, not rendered as HTML
    with_attention = v.image.value
    v.attention_toggle.value = False
    assert v.image.value != with_attention


def test_bad_case_keys_are_named():
    with pytest.raises(ValueError, match="case 0"):
        build_slice_viewer([{"image": np.zeros((4, 4)), "mask": {}}])
    with pytest.raises(ValueError, match="'tumour'"):
        build_slice_viewer(np.zeros((3, 8, 8)), {"tumour": np.zeros((3, 4, 4), dtype=bool)})


def _ct_volume() -> dict:
    z, y, x = np.mgrid[0:12, 0:16, 0:20]
    hu = np.where((y - 8) ** 2 + (x - 10) ** 2 < 49, 40.0, -1000.0)
    hu[:, 2:5, 3:7] = -850.0  # lung-density block
    lesion = (z - 6) ** 2 + (y - 8) ** 2 + (x - 10) ** 2 < 9
    return {"image": hu, "masks": {"lesion": lesion}, "spacing": (3.0, 0.8, 0.8), "modality": "CT",
            "attention": np.random.default_rng(0).random((4, 4, 5)), "title": "ct"}


def test_ct_window_presets_change_the_grey_levels_and_mr_has_auto_only():
    from nbsupport.viz.viewer import build_slice_viewer

    mr = {"image": np.random.default_rng(1).random((16, 16)), "title": "mr", "modality": "MR"}
    viewer = build_slice_viewer([_ct_volume(), mr])
    assert list(viewer.window.options) == ["auto", "soft tissue", "lung", "mediastinum", "bone"]
    assert viewer.window.value == "soft tissue"
    soft = viewer.render()
    viewer.window.value = "lung"
    assert viewer.image.value != soft
    viewer.case_slider.value = 1
    assert list(viewer.window.options) == ["auto"] and viewer.window.value == "auto"
    assert viewer.view.layout.display == "none"


def test_coronal_and_sagittal_planes_have_the_physical_aspect_and_own_slider_range():
    from nbsupport.viz.viewer import build_slice_viewer, case_plane

    viewer = build_slice_viewer([_ct_volume()])
    assert viewer.slice_slider.max == 11 and viewer.slice_slider.value == 6
    viewer.view.value = "coronal"
    assert viewer.slice_slider.max == 15 and viewer.slice_slider.description == "row"
    image, masks, att, spacing = case_plane(viewer.case, "coronal", 8)
    assert image.shape == (12, 20) and spacing == (3.0, 0.8) and att.shape == (4, 5)
    assert masks["lesion"].any()
    fig = viewer.figure()
    ax = fig.axes[0]
    assert ax.get_aspect() == pytest.approx(3.0 / 0.8)
    viewer.view.value = "sagittal"
    assert viewer.slice_slider.max == 19
    assert "sagittal plane" in viewer.text_panel.value


def test_mask_colour_and_heatmap_opacity_redraw():
    from nbsupport.viz.viewer import build_slice_viewer

    viewer = build_slice_viewer([_ct_volume()])
    first = viewer.render()
    viewer.mask_colors["lesion"].value = "#0000ff"
    recoloured = viewer.image.value
    assert recoloured != first
    viewer.attention_opacity.value = 0.0
    assert viewer.image.value != recoloured
    viewer.attention_opacity.value = 0.4
    viewer.mask_colors["lesion"].value = viewer.palette["lesion"]
    assert viewer.image.value == first  # same state, same picture (from the cache)


def test_static_overview_shows_ct_in_the_soft_tissue_window():
    fig = slice_overview([_ct_volume()], count=1)
    image = fig.axes[0].get_images()[0]
    assert image.get_clim() == (40.0 - 200.0, 40.0 + 200.0)


def test_the_widget_draws_an_rgb_photograph_in_colour():
    import io

    import matplotlib.image

    from nbsupport.viz import build_slice_viewer

    photo = np.zeros((32, 32, 3), np.uint8)
    photo[..., 0] = 200  # red everywhere
    viewer = build_slice_viewer([{"image": photo, "modality": "RGB", "title": "polyp"}])
    rendered = matplotlib.image.imread(io.BytesIO(viewer.render()))
    centre = rendered[rendered.shape[0] // 2, rendered.shape[1] // 2]
    assert centre[0] > 0.6 and centre[1] < 0.2 and centre[2] < 0.2, centre
    assert list(viewer.window.options) == ["auto"]
