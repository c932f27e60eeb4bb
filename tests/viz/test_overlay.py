"""Overlays, attention maps and shared figures: what is drawn, in which colours, with which aspect."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from nbsupport.viz import (attention_grid, attention_overlay, class_color, compare_masks, image_grid,  # noqa: E402
                           metric_table_figure, overlay_masks, plot_training_curves, upsample_bilinear)


@pytest.fixture(autouse=True)
def _close_pyplot_figures():
    yield
    plt.close("all")


def _scene(h=40, w=50):
    yy, xx = np.mgrid[:h, :w]
    image = np.hypot(yy - h / 2, xx - w / 2).max() - np.hypot(yy - h / 2, xx - w / 2)
    masks = {
        "stomach": (yy - 12) ** 2 + (xx - 15) ** 2 < 36,
        "small_bowel": (yy - 20) ** 2 + (xx - 25) ** 2 < 64,  # overlaps the stomach
        "liver_left": np.zeros((h, w), dtype=bool),
    }
    return image, masks


def _legend_labels(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_overlay_has_one_legend_entry_per_mask_in_class_colours():
    image, masks = _scene()
    ax = overlay_masks(image, masks, title="t")
    assert _legend_labels(ax) == ["stomach", "small_bowel", "liver_left (empty)"]
    edges = [to_hex(h.get_edgecolor()) for h in ax.get_legend().legend_handles]
    assert edges == [class_color("stomach"), class_color("small_bowel"), class_color("liver_left")]
    assert len(set(edges)) == 3
    assert ax.get_title() == "t"
    # image + one fill per non-empty mask
    assert len(ax.images) == 3


def test_overlay_aspect_follows_anisotropic_spacing():
    image, masks = _scene()
    ax = overlay_masks(image, masks, spacing=(2.0, 1.0))
    assert ax.get_aspect() == pytest.approx(2.0)
    assert ax.get_xlim() == pytest.approx((-0.5, 49.5)) and ax.get_ylim() == pytest.approx((39.5, -0.5))
    assert overlay_masks(image, masks).get_aspect() == pytest.approx(1.0)


def test_overlay_accepts_channel_array_tensor_and_window():
    image, masks = _scene()
    stack = torch.from_numpy(np.stack(list(masks.values())))
    fig, ax = plt.subplots()
    out = overlay_masks(torch.from_numpy(image), stack, ax=ax, class_names=list(masks), vmin=0, vmax=10)
    assert out is ax
    assert ax.images[0].get_clim() == (0, 10)
    with pytest.raises(ValueError, match="class_names"):
        overlay_masks(image, stack, ax=ax, class_names=["one"])
    with pytest.raises(ValueError, match="'bad'"):
        overlay_masks(image, {"bad": np.zeros((3, 3), dtype=bool)}, ax=ax)


def test_class_colours_are_stable_and_distinct():
    names = [f"organ_{i}" for i in range(6)]
    first = [class_color(n) for n in names]
    assert first == [class_color(n) for n in names]
    assert len(set(first)) == len(first)


def test_compare_masks_side_by_side_and_errors():
    image, truth = _scene()
    pred = {"stomach": np.roll(truth["stomach"], 2, axis=1), "small_bowel": truth["small_bowel"]}
    before = plt.get_fignums()
    fig = compare_masks(image, truth, pred, title="case 1")
    assert isinstance(fig, Figure) and plt.get_fignums() == before  # not registered with pyplot
    ax_truth, ax_pred = fig.axes
    assert ax_truth.get_title() == "ground truth"
    labels = _legend_labels(ax_pred)
    assert labels[1] == "small_bowel: Dice 1.00" and labels[2] == "liver_left: both empty"

    fig = compare_masks(image, truth, pred, mode="errors")
    assert [a.get_title().split(":")[0] for a in fig.axes] == ["stomach", "small_bowel", "liver_left"]
    tp, fp, fn, outline = _legend_labels(fig.axes[1])
    assert tp == f"TP ({int(truth['small_bowel'].sum())} px)" and fp == "FP (0 px)" and fn == "FN (0 px)"
    with pytest.raises(ValueError, match="mode"):
        compare_masks(image, truth, pred, mode="nope")


def test_upsample_bilinear_matches_torch():
    att = np.random.default_rng(0).random((5, 7))
    ours = upsample_bilinear(att, (23, 40))
    ref = torch.nn.functional.interpolate(torch.from_numpy(att)[None, None], size=(23, 40), mode="bilinear",
                                          align_corners=False)[0, 0].numpy()
    assert ours.shape == (23, 40)
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_attention_overlay_upsamples_to_image_size():
    image, _ = _scene(40, 50)
    att = np.zeros((4, 5))
    att[1, 2] = 3.0
    ax = attention_overlay(image, att, query_point=(12, 25), title="head 0")
    heat = ax.images[-1].get_array()
    assert heat.shape == (40, 50)
    assert float(heat.max()) == pytest.approx(1.0) and float(heat.min()) == pytest.approx(0.0)
    row, col = np.unravel_index(np.argmax(heat), heat.shape)
    assert 10 <= row <= 15 and 20 <= col <= 29  # the hot key cell (1, 2) covers rows 10-19, cols 20-29
    assert [tuple(line.get_xydata()[0]) for line in ax.lines] == [(25.0, 12.0)]  # star at (col, row)
    assert len(ax.figure.axes) == 2  # image + colourbar
    flat = attention_overlay(image, np.ones((4, 5)), colorbar=False)
    assert float(flat.images[-1].get_array().max()) == 0.0


def test_attention_grid_has_a_panel_per_map():
    image, _ = _scene()
    maps = [(f"layer {i}", np.random.default_rng(i).random((2 + i, 3 + i))) for i in range(5)]
    fig = attention_grid(image, maps, ncols=3, query_point=(5, 5))
    panels = [a for a in fig.axes if a.images]
    assert [a.get_title() for a in panels] == [m[0] for m in maps]
    assert all(a.images[-1].get_array().shape == image.shape for a in panels)


def test_image_grid_with_masks_and_shared_legend():
    image, masks = _scene()
    fig = image_grid([image] * 5, titles=list("abcde"), masks=[masks, None, masks, {}, masks], ncols=3,
                     suptitle="grid")
    visible = [a for a in fig.axes if a.get_visible() and a.axison]
    assert [a.get_title() for a in visible] == list("abcde")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(masks)
    with pytest.raises(ValueError, match="titles"):
        image_grid([image] * 2, titles=["only one"])


def test_training_curves_put_losses_metrics_and_lr_on_their_axes():
    history = []
    for step in range(0, 200, 10):
        history.append({"step": step, "epoch": step / 100, "train_loss": 1 / (1 + step), "lr": 1e-4 * (1 + step),
                        "grad_norm": 1.0})
        if step % 50 == 0:
            history.append({"step": step, "epoch": step / 100, "val_loss": 0.5, "val_dice": 0.1 * step / 50,
                            "val_hd95": 12.0})
    fig = plot_training_curves(history)
    assert isinstance(fig, Figure)
    loss_ax, metric_ax, lr_ax = fig.axes
    assert [ln.get_label() for ln in loss_ax.lines] == ["train_loss", "val_loss"]
    assert [ln.get_label() for ln in metric_ax.lines] == ["val_dice", "val_hd95"]
    assert [ln.get_label() for ln in lr_ax.lines] == ["lr"] and lr_ax.get_yscale() == "log"
    assert len(loss_ax.lines[0].get_xdata()) == 20 and len(loss_ax.lines[1].get_xdata()) == 4
    assert lr_ax.get_xlabel() == "step"
    by_epoch = plot_training_curves(pd.DataFrame(history), x="epoch")
    assert by_epoch.axes[-1].get_xlabel() == "epoch"
    only_loss = plot_training_curves([{"epoch": 1, "train_loss": 0.3}], x="step")  # falls back to epoch
    assert len(only_loss.axes) == 1
    with pytest.raises(ValueError, match="empty"):
        plot_training_curves([])


def test_metric_table_figure():
    df = pd.DataFrame({"class": ["a", "b"], "dice": [0.81234, float("nan")]})
    fig = metric_table_figure(df, title="per class")
    texts = {cell.get_text().get_text() for cell in fig.axes[0].tables[0].get_celld().values()}
    assert {"class", "dice", "0.812", "–"} <= texts
