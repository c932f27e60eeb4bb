"""UW-Madison competition score: perfect / empty / hand-computed cases, and agreement with the reference formula."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import directed_hausdorff

from nbsupport.seg2d.scoring import (UWMGI_CLASSES, case_parts, competition_score, dice_2d, hausdorff_3d,
                                     parse_slice_id, pooled_score)


def _ids(case: int, day: int, n: int, start: int = 1) -> list[str]:
    return [f"case{case}_day{day}_slice_{s:04d}" for s in range(start, start + n)]


def _reference_hausdorff(pred: np.ndarray, target: np.ndarray) -> float:
    """mle-bench's formula on every voxel (no shortcuts), for non-empty volumes."""
    shape = np.asarray(target.shape, dtype=float)
    a, b = np.argwhere(target) / shape, np.argwhere(pred) / shape
    return max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0]) / math.sqrt(3)


def test_parse_slice_id():
    sid = parse_slice_id("case123_day20_slice_0001")
    assert (sid.case, sid.day, sid.slice, sid.case_day) == (123, 20, 1, "case123_day20")
    with pytest.raises(ValueError, match="does not match"):
        parse_slice_id("case123_slice_0001")


def test_perfect_prediction_scores_one():
    rng = np.random.default_rng(1)
    target = rng.random((6, 3, 16, 16)) > 0.7
    ids = _ids(1, 2, 3) + _ids(7, 0, 3)
    result = competition_score(ids, target.copy(), target)
    assert result["score"] == pytest.approx(1.0)
    assert result["dice"] == pytest.approx(1.0) and result["hausdorff"] == pytest.approx(0.0)
    assert set(result["dice_per_class"]) == set(UWMGI_CLASSES)
    assert result["n_slices"] == 6 and result["n_case_days"] == 2


def test_empty_prediction_scores_zero():
    target = np.zeros((4, 3, 8, 8), dtype=bool)
    target[:, :, 2:5, 2:5] = True
    result = competition_score(_ids(5, 1, 4), np.zeros_like(target), target)
    assert result["dice"] == 0.0 and result["hausdorff"] == 1.0 and result["score"] == 0.0


def test_single_voxel_shifted_by_one_slice_hand_computed():
    # 4 slices of 4x4 -> a 4x4x4 volume. GT voxel at (slice 1, row 1, col 1), prediction one slice deeper.
    # Normalised coordinates: (1/4, 1/4, 1/4) vs (2/4, 1/4, 1/4) -> distance 1/4 -> Hausdorff (1/4)/sqrt(3).
    target = np.zeros((4, 3, 4, 4), dtype=bool)
    pred = np.zeros_like(target)
    target[1, 0, 1, 1] = True
    pred[2, 0, 1, 1] = True
    ids = _ids(9, 3, 4)
    order = [2, 0, 3, 1]  # ids in any order: slices are stacked by slice number
    result = competition_score([ids[i] for i in order], pred[order], target[order])
    expected_hd = (1 / 4) / math.sqrt(3)
    assert result["hausdorff"] == pytest.approx(expected_hd)
    assert result["hausdorff_per_class"]["large_bowel"] == pytest.approx(expected_hd)
    assert result["hausdorff_per_class"]["stomach"] is None  # both empty everywhere: skipped
    # Dice: slice 1 GT only, slice 2 prediction only -> 0 and 0; all other (slice, class) pairs both empty.
    assert result["dice"] == 0.0
    assert result["score"] == pytest.approx(0.4 * 0 + 0.6 * (1 - expected_hd))


def test_in_plane_normalisation_uses_volume_shape():
    # 2 slices of 8 rows x 4 cols; a 2-row shift -> 2/8 of the unit cube's side.
    target = np.zeros((2, 8, 4), dtype=bool)
    pred = np.zeros_like(target)
    target[0, 1, 1] = True
    pred[0, 3, 1] = True
    assert hausdorff_3d(pred, target) == pytest.approx((2 / 8) / math.sqrt(3))


def test_both_empty_case_days_and_classes_are_skipped():
    target = np.zeros((3, 3, 8, 8), dtype=bool)
    target[:, 2, 2:6, 2:6] = True
    pred = target.copy()
    pred[1, 2, 2:6, 2:4] = False  # half of the middle slice's stomach missed
    base = competition_score(_ids(1, 1, 3), pred, target)
    # a second case-day where nothing is present in prediction or GT changes nothing
    empty = np.zeros_like(target)
    both = competition_score(_ids(1, 1, 3) + _ids(2, 1, 3), np.concatenate([pred, empty]),
                             np.concatenate([target, empty]))
    assert both["score"] == pytest.approx(base["score"])
    assert base["dice"] == pytest.approx((1 + 1 + 2 * 8 / (8 + 16)) / 3)
    assert base["dice_per_class"]["large_bowel"] is None


def test_matches_reference_formula_on_random_blobs():
    rng = np.random.default_rng(3)
    for _ in range(5):
        target = np.zeros((6, 12, 10), dtype=bool)
        pred = np.zeros_like(target)
        for vol in (target, pred):
            for _ in range(3):
                z, r, c = rng.integers(0, 5), rng.integers(0, 9), rng.integers(0, 7)
                vol[z:z + 2, r:r + rng.integers(1, 4), c:c + rng.integers(1, 4)] = True
        assert hausdorff_3d(pred, target) == pytest.approx(_reference_hausdorff(pred, target), rel=1e-9)


def test_hausdorff_empty_rules():
    empty = np.zeros((2, 4, 4), dtype=bool)
    full = np.ones((2, 4, 4), dtype=bool)
    assert math.isnan(hausdorff_3d(empty, empty))
    assert hausdorff_3d(empty, full) == 1.0 and hausdorff_3d(full, empty) == 1.0
    assert math.isnan(dice_2d(empty[0], empty[0]))


def test_mlebench_mode_ors_classes_per_slice():
    # class 0 predicted exactly, class 1 predicted one slice off; the OR of the classes differs by one voxel only
    target = np.zeros((4, 3, 4, 4), dtype=bool)
    target[1, 0, 1, 1] = target[1, 1, 1, 1] = True
    pred = np.zeros_like(target)
    pred[1, 0, 1, 1] = pred[2, 1, 1, 1] = True
    ids = _ids(4, 4, 4)
    per_class = competition_score(ids, pred, target)
    mle = competition_score(ids, pred, target, mode="mlebench")
    hd = (1 / 4) / math.sqrt(3)
    assert per_class["hausdorff"] == pytest.approx((0 + hd) / 2)
    assert mle["hausdorff"] == pytest.approx(hd)  # one case-day, union volumes {v} vs {v, v + 1 slice}
    assert mle["hausdorff_per_class"] == {}
    # predicted volume > 10x the true one -> 1 without computing
    big = np.zeros_like(target)
    big[:, 0] = True
    assert competition_score(ids, big, target, mode="mlebench")["hausdorff"] == 1.0


def test_list_of_slices_with_per_case_day_sizes():
    t1 = [np.ones((3, 6, 5), dtype=bool) for _ in range(2)]
    t2 = [np.ones((3, 4, 4), dtype=bool) for _ in range(2)]
    result = competition_score(_ids(1, 1, 2) + _ids(2, 1, 2), t1 + t2, t1 + t2)
    assert result["score"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in"):
        competition_score(_ids(1, 1, 2), [t1[0], t2[0]], [t1[0], t2[0]])


def test_input_errors_name_the_slice():
    masks = np.zeros((2, 3, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match="appears twice"):
        competition_score(["case1_day1_slice_0001"] * 2, masks, masks)
    with pytest.raises(ValueError, match="case1_day1_slice_0002"):
        competition_score(_ids(1, 1, 2), [masks[0], masks[1, :2]], masks)
    with pytest.raises(ValueError, match="2 ids"):
        competition_score(_ids(1, 1, 2), masks[:1], masks)


# ---------------------------------------------------------------------------------------------- per-case parts
def _noisy_cases(rng: np.random.Generator, n_cases: int, days: int = 2, slices: int = 4) -> tuple[list, np.ndarray,
                                                                                                  np.ndarray]:
    ids = [i for case in range(1, n_cases + 1) for day in range(days) for i in _ids(case, day, slices)]
    target = rng.random((len(ids), 3, 10, 10)) > 0.6
    pred = target ^ (rng.random(target.shape) > 0.85)  # 15 % of pixels flipped
    return ids, pred, target


def test_pooled_case_parts_are_the_competition_score():
    ids, pred, target = _noisy_cases(np.random.default_rng(5), n_cases=4)
    order = np.random.default_rng(6).permutation(len(ids))  # any slice order
    ids, pred, target = [ids[i] for i in order], pred[order], target[order]
    parts = case_parts(ids, pred, target)
    assert [p.case for p in parts] == [1, 2, 3, 4]
    assert all(p.dice.shape == (8, 3) and p.hausdorff.shape == (2, 3) for p in parts)
    pooled, reference = pooled_score(parts), competition_score(ids, pred, target)
    for key in ("score", "dice", "hausdorff"):
        assert pooled[key] == pytest.approx(reference[key], abs=1e-12)
    for name in UWMGI_CLASSES:
        assert pooled[f"dice_{name}"] == pytest.approx(reference["dice_per_class"][name], abs=1e-12)
    # a case drawn twice counts twice, as in a bootstrap resample
    twice = pooled_score([parts[0], parts[0]])
    assert twice["dice"] == pytest.approx(pooled_score([parts[0]])["dice"])


def test_intervals_over_cases_contain_the_score_and_narrow_with_more_cases():
    from nbsupport.seg2d.inference import scores_with_ci95

    widths = []
    for n_cases in (4, 16):
        ids, pred, target = _noisy_cases(np.random.default_rng(n_cases), n_cases)
        parts = case_parts(ids, pred, target)
        scores = scores_with_ci95(pooled_score(parts), parts)
        for key in ("score", "dice", "hausdorff", "dice_stomach"):
            low, high = scores[f"{key}_ci95"]
            assert low < scores[key] < high, (n_cases, key)
        widths.append(scores["dice_ci95"][1] - scores["dice_ci95"][0])
    assert widths[1] < widths[0]
