"""Segmentation metrics: hand-computed cases, agreement with MONAI, the empty-mask convention."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou
from scipy.ndimage import binary_erosion

from nbsupport.metrics import segmentation_metrics, summarise


def _square(shape, rows, cols):
    m = np.zeros(shape, dtype=bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


def _batch(*masks):
    """(N, 1, ...) from N single-class masks."""
    return np.stack(masks)[:, None]


def test_dice_iou_of_overlapping_squares_match_hand_computation():
    a = _square((12, 12), (2, 7), (2, 7))  # 5x5 = 25 px
    b = _square((12, 12), (4, 9), (3, 8))  # 5x5 = 25 px, overlap rows 4..6 x cols 3..6 = 3*4 = 12 px
    df = segmentation_metrics(_batch(a), _batch(b))
    assert list(df.columns) == ["sample", "class", "dice", "iou", "hd95", "gt_empty", "pred_empty"]
    row = df.iloc[0]
    assert row["dice"] == pytest.approx(2 * 12 / (25 + 25))
    assert row["iou"] == pytest.approx(12 / (25 + 25 - 12))
    assert not row["gt_empty"] and not row["pred_empty"]


def test_hd95_of_shifted_bars_with_anisotropic_spacing_is_in_mm():
    # One-pixel-thick bars along axis 1, shifted by 3 px along axis 0: every surface distance is exactly 3 rows,
    # i.e. 6 mm with 2 mm rows, so HD95 = 6 mm (3 px without spacing).
    gt = _square((16, 16), (4, 5), (2, 12))
    pred = _square((16, 16), (7, 8), (2, 12))
    assert segmentation_metrics(_batch(pred), _batch(gt), spacing=(2.0, 1.0))["hd95"].iloc[0] == pytest.approx(6.0)
    assert segmentation_metrics(_batch(pred), _batch(gt))["hd95"].iloc[0] == pytest.approx(3.0)
    # along the 1 mm axis the same shift is 3 mm
    assert segmentation_metrics(_batch(pred.T), _batch(gt.T), spacing=(2.0, 1.0))["hd95"].iloc[0] == pytest.approx(3.0)


def test_hausdorff_of_shifted_squares_equals_shift_in_mm():
    # For a translated square the maximum surface distance is the translation: 3 rows * 2 mm.
    gt = _square((20, 20), (4, 10), (4, 10))
    pred = _square((20, 20), (7, 13), (4, 10))
    df = segmentation_metrics(_batch(pred), _batch(gt), spacing=(2.0, 1.0), hd_percentile=100)
    assert df["hd95"].iloc[0] == pytest.approx(6.0)


def _brute_force_hd(pred, gt, spacing, percentile):
    """Symmetric percentile Hausdorff over surface pixels (mask minus its erosion), all pairs."""
    def surface(m):
        return np.argwhere(m & ~binary_erosion(m)) * np.asarray(spacing)

    sp, sg = surface(pred), surface(gt)
    d = np.sqrt(((sp[:, None, :] - sg[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), percentile), np.percentile(d.min(0), percentile))


def test_hd95_of_shifted_squares_matches_brute_force_surface_distances():
    gt = _square((20, 20), (4, 10), (4, 10))
    pred = _square((20, 20), (7, 13), (5, 12))
    got = segmentation_metrics(_batch(pred), _batch(gt), spacing=(2.0, 1.0))["hd95"].iloc[0]
    assert got == pytest.approx(_brute_force_hd(pred, gt, (2.0, 1.0), 95), rel=1e-5)


def test_per_sample_spacing():
    gt = _square((16, 16), (4, 5), (2, 12))
    pred = _square((16, 16), (7, 8), (2, 12))
    df = segmentation_metrics(_batch(pred, pred), _batch(gt, gt), spacing=np.array([[2.0, 1.0], [0.5, 1.0]]))
    assert df["hd95"].tolist() == pytest.approx([6.0, 1.5])
    with pytest.raises(ValueError, match="per-sample spacing"):
        segmentation_metrics(_batch(pred, pred), _batch(gt, gt), spacing=np.ones((3, 2)))
    with pytest.raises(ValueError, match="one per spatial dim"):
        segmentation_metrics(_batch(pred), _batch(gt), spacing=(1.0, 1.0, 1.0))


def test_empty_mask_convention():
    blob = _square((10, 10), (2, 5), (2, 5))
    empty = np.zeros((10, 10), dtype=bool)
    pred = _batch(empty, blob, empty)
    gt = _batch(empty, empty, blob)
    df = segmentation_metrics(pred, gt)
    both, hallucinated, missed = (df.iloc[i] for i in range(3))
    assert math.isnan(both["dice"]) and math.isnan(both["iou"]) and math.isnan(both["hd95"])
    assert both["gt_empty"] and both["pred_empty"]
    assert hallucinated["dice"] == 0 and hallucinated["iou"] == 0 and math.isnan(hallucinated["hd95"])
    assert hallucinated["gt_empty"] and not hallucinated["pred_empty"]
    assert missed["dice"] == 0 and math.isnan(missed["hd95"]) and missed["pred_empty"] and not missed["gt_empty"]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecated internal argument
def test_agrees_with_monai_on_random_blobs():
    rng = np.random.default_rng(0)
    n, c = 3, 2
    pred = np.zeros((n, c, 24, 24), dtype=bool)
    gt = np.zeros_like(pred)
    for i in range(n):
        for j in range(c):
            r, q = rng.integers(2, 12, size=2)
            gt[i, j, r:r + 8, q:q + 6] = True
            pred[i, j, r + rng.integers(-2, 3):r + 7, q:q + rng.integers(4, 9)] = True
    spacing = (1.5, 0.7)
    df = segmentation_metrics(torch.from_numpy(pred), torch.from_numpy(gt), spacing=spacing, class_names=["a", "b"])
    pf, gf = torch.from_numpy(pred).float(), torch.from_numpy(gt).float()
    assert df["dice"].to_numpy() == pytest.approx(compute_dice(pf, gf).numpy().ravel(), rel=1e-6)
    assert df["iou"].to_numpy() == pytest.approx(compute_iou(pf, gf).numpy().ravel(), rel=1e-6)
    hd = compute_hausdorff_distance(pf, gf, include_background=True, percentile=95, spacing=spacing)
    assert df["hd95"].to_numpy() == pytest.approx(hd.numpy().ravel(), rel=1e-5)
    assert df["class"].tolist() == ["a", "b"] * n
    assert df["sample"].tolist() == [0, 0, 1, 1, 2, 2]


def test_3d_cubes_with_slice_spacing():
    gt = np.zeros((12, 10, 10), dtype=bool)
    gt[2:6, 2:6, 2:6] = True  # 64 voxels
    pred = np.zeros_like(gt)
    pred[4:8, 2:6, 2:6] = True  # shifted 2 slices: overlap 2*4*4 = 32 voxels
    df = segmentation_metrics(_batch(pred), _batch(gt), spacing=(3.0, 1.0, 1.0), hd_percentile=100)
    assert df["dice"].iloc[0] == pytest.approx(2 * 32 / (64 + 64))
    assert df["iou"].iloc[0] == pytest.approx(32 / 96)
    assert df["hd95"].iloc[0] == pytest.approx(6.0)  # 2 slices * 3 mm


def test_summarise_means_and_json():
    blob = _square((10, 10), (2, 5), (2, 5))
    half = _square((10, 10), (2, 5), (2, 4))  # 6 of blob's 9 px
    empty = np.zeros((10, 10), dtype=bool)
    pred = np.stack([np.stack([blob, empty]), np.stack([half, empty])])
    gt = np.stack([np.stack([blob, empty]), np.stack([blob, empty])])
    summary = summarise(segmentation_metrics(pred, gt, class_names=["liver", "tumour"]))
    expected_dice = (1.0 + 2 * 6 / 15) / 2
    assert summary["dice"] == pytest.approx(expected_dice)  # NaN rows of the empty class are skipped
    assert summary["per_class"]["liver"]["dice"] == pytest.approx(expected_dice)
    assert summary["per_class"]["tumour"]["dice"] is None
    assert summary["per_class"]["tumour"]["n_gt_empty"] == 2
    assert summary["per_class"]["liver"]["n_scored"] == 2
    assert summary["n_samples"] == 2
    json.loads(json.dumps(summary, allow_nan=False))  # valid JSON: no NaN


def test_input_validation():
    a = np.zeros((1, 2, 8, 8), dtype=bool)
    with pytest.raises(ValueError, match="class_names"):
        segmentation_metrics(a, a, class_names=["only_one"])
    with pytest.raises(ValueError, match="shape"):
        segmentation_metrics(a, a[:, :1])
    with pytest.raises(ValueError, match="binary"):
        segmentation_metrics(np.full((1, 1, 4, 4), 0.3), np.zeros((1, 1, 4, 4)))
