"""Bootstrap intervals: coverage and width on data of known distribution, determinism by seed, corpus metrics,
paired differences, the metrics.json helper and the table format."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nbsupport.metrics import (
    auroc, bootstrap_ci95, cider_d, format_ci, format_with_ci, paired_bootstrap_diff, with_ci95,
)


def test_interval_of_the_mean_covers_the_true_mean_about_95_percent() -> None:
    # 200 seeded samples of N(0, 1), n = 100: the 95 % interval of the mean should contain 0 in ~190 of them
    rng = np.random.default_rng(123)
    hits = 0
    for trial in range(200):
        low, high = bootstrap_ci95(rng.normal(size=100), n_resamples=1000, seed=trial)
        hits += low <= 0.0 <= high
    assert 0.91 <= hits / 200 <= 0.99, hits


def test_width_shrinks_as_one_over_sqrt_n() -> None:
    rng = np.random.default_rng(7)
    widths = {}
    for n in (100, 400, 1600):
        lows_highs = [bootstrap_ci95(rng.normal(size=n), n_resamples=500, seed=s) for s in range(10)]
        widths[n] = float(np.mean([h - l for l, h in lows_highs]))
    # the normal-theory width of the mean of N(0, 1): 2 x 1.96 / sqrt(n)
    assert widths[100] == pytest.approx(2 * 1.96 / 10, rel=0.12)
    assert widths[100] / widths[400] == pytest.approx(2.0, rel=0.15)
    assert widths[400] / widths[1600] == pytest.approx(2.0, rel=0.15)


def test_same_seed_same_interval_other_seed_other_interval() -> None:
    values = np.random.default_rng(0).normal(size=50)
    assert bootstrap_ci95(values, seed=3) == bootstrap_ci95(values, seed=3)
    assert bootstrap_ci95(values, seed=3) != bootstrap_ci95(values, seed=4)
    hyps = ["No effusion.", "Small left effusion.", "Heart is enlarged.", "", "Lungs clear."] * 4
    refs = ["No pleural effusion.", "Left effusion.", "The heart is enlarged.", "Normal.", "Clear lungs."] * 4
    assert bootstrap_ci95(cider_d, hyps, refs, n_resamples=200, seed=1) == \
        bootstrap_ci95(cider_d, hyps, refs, n_resamples=200, seed=1)


def test_per_case_values_use_nan_mean_over_all_entries() -> None:
    # (N, k) per-case values with NaN (e.g. Dice per image and class, both masks empty): the metric is the mean over
    # all defined entries, and a case is resampled with all its entries
    values = np.array([[1.0, np.nan], [0.0, 0.0], [1.0, 1.0]])
    low, high = bootstrap_ci95(values, n_resamples=2000, seed=0)
    assert 0.0 <= low < 0.6 < high <= 1.0
    assert bootstrap_ci95(np.full(10, 0.5)) == (0.5, 0.5)
    assert all(np.isnan(bootstrap_ci95(np.full(10, np.nan))))


def test_corpus_metric_is_recomputed_on_each_resample() -> None:
    # AUROC is no mean of per-case numbers: the interval must come from recomputing it on resampled cases
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=300)
    scores = labels + rng.normal(scale=1.0, size=300)
    point = auroc(labels, scores)
    low, high = bootstrap_ci95(auroc, labels, scores, n_resamples=500)
    assert low < point < high and 0.6 < low and high < 0.9
    # a metric undefined on a resample (one class only) leaves that resample out instead of failing
    low, high = bootstrap_ci95(auroc, np.array([0, 1, 0, 0]), np.array([0.1, 0.9, 0.3, 0.2]), n_resamples=200)
    assert 0.0 <= low <= high <= 1.0


def test_paired_difference_cancels_what_both_systems_share() -> None:
    rng = np.random.default_rng(1)
    case_difficulty = rng.normal(scale=3.0, size=200)  # large between-case spread, common to both systems
    a = case_difficulty + 0.3 + rng.normal(scale=0.2, size=200)
    b = case_difficulty + rng.normal(scale=0.2, size=200)
    diff, low, high = paired_bootstrap_diff(a, b, seed=0)
    assert diff == pytest.approx(float(np.mean(a - b)))
    assert 0.0 < low < diff < high and high - low < 0.15
    # unpaired intervals of the same two means overlap widely: pairing is what resolves the difference
    (a_low, a_high), (b_low, b_high) = bootstrap_ci95(a), bootstrap_ci95(b)
    assert a_low < b_high and b_low < a_high


def test_paired_difference_of_equal_systems_covers_zero_about_95_percent() -> None:
    rng = np.random.default_rng(5)
    hits = 0
    for trial in range(200):
        shared = rng.normal(size=80)
        a, b = shared + rng.normal(size=80), shared + rng.normal(size=80)
        _, low, high = paired_bootstrap_diff(a, b, n_resamples=500, seed=trial)
        hits += low <= 0.0 <= high
    assert 0.90 <= hits / 200 <= 0.99, hits


def test_paired_difference_of_a_corpus_metric() -> None:
    refs = ["No pleural effusion.", "Left effusion.", "The heart is enlarged.", "Normal chest.", "Clear lungs."] * 8
    model = ["No effusion.", "Small left effusion.", "Heart is enlarged.", "Normal.", "Lungs clear."] * 8
    empty = [""] * len(refs)
    diff, low, high = paired_bootstrap_diff((model, refs), (empty, refs), metric=cider_d, n_resamples=200)
    assert diff == pytest.approx(cider_d(model, refs) - cider_d(empty, refs))
    assert 0 < low < diff < high
    with pytest.raises(ValueError, match="same cases on both sides"):
        paired_bootstrap_diff(np.zeros(5), np.zeros(6))


def test_with_ci95_puts_intervals_beside_the_metrics_as_json() -> None:
    rng = np.random.default_rng(2)
    dice, iou = rng.uniform(size=40), rng.uniform(size=40)
    metrics = {"dice": float(dice.mean()), "iou": float(iou.mean()), "n_samples": 40, "per_class": {}}
    out = with_ci95(metrics, {"dice": dice, "iou": iou}, n_resamples=300)
    assert list(out) == ["dice", "dice_ci95", "iou", "iou_ci95", "n_samples", "per_class"]
    assert out["dice_ci95"] == list(bootstrap_ci95(dice, n_resamples=300))
    json.dumps(out, allow_nan=False)  # valid metrics.json
    with pytest.raises(ValueError, match="no such key"):
        with_ci95(metrics, {"hd95": dice})


def test_with_ci95_of_a_dict_valued_metric_function() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=100)
    scores = labels + rng.normal(size=100)

    def classification(y, s):
        return {"auroc": auroc(y, s), "mean_score": float(np.mean(s)), "n": len(y)}

    metrics = classification(labels, scores)
    out = with_ci95(metrics, classification, labels, scores, n_resamples=200)
    assert list(out) == ["auroc", "auroc_ci95", "mean_score", "mean_score_ci95", "n"]  # no interval on a count
    assert out["auroc_ci95"][0] < metrics["auroc"] < out["auroc_ci95"][1]
    undefined = with_ci95({"auroc": None}, classification, np.zeros(5), np.ones(5), n_resamples=20)
    assert undefined == {"auroc": None, "auroc_ci95": [None, None]}


def test_format_for_notebook_tables() -> None:
    assert format_ci(0.8012, [0.7391, 0.8456]) == "0.80 (0.74–0.85)"
    assert format_ci(0.8, None) == "0.80"
    assert format_ci(None, [None, None]) == "n/a"
    assert format_ci(12.3456, (11.0, 13.5), digits=1) == "12.3 (11.0–13.5)"
    table = format_with_ci({"dice": 0.8, "dice_ci95": [0.7, 0.9], "hd95": None, "n_samples": 4})
    assert table == {"dice": "0.80 (0.70–0.90)", "hd95": "n/a"}


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci95([])
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_ci95(cider_d, ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="several values"):
        bootstrap_ci95(lambda y: {"a": 1.0, "b": 2.0}, [1, 2])
    with pytest.raises(ValueError, match="needs the cases"):
        bootstrap_ci95(cider_d)
    with pytest.raises(ValueError, match="returning a dict"):
        with_ci95({"cider_d": 1.0}, cider_d, ["a b", "c"], ["a b", "c"])
