"""Retrieval and classification metrics: hand-computed cases and a second, pairwise implementation of AUROC."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from nbsupport.metrics import (
    auroc,
    best_f1_threshold,
    binary_classification_metrics,
    retrieval_metrics,
    retrieval_ranks,
)


def _pairwise_auroc(labels, scores) -> float:
    """Fraction of (positive, negative) pairs ordered correctly, ties counted half: the AUROC definition."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_ranks_of_a_hand_made_similarity_matrix():
    sim = np.array([[0.9, 0.1, 0.0],   # query 0: its match (0) is best -> rank 1
                    [0.8, 0.5, 0.7],   # query 1: 0.8 and 0.7 beat 0.5 -> rank 3
                    [0.2, 0.9, 0.4]])  # query 2: 0.9 beats 0.4 -> rank 2
    assert retrieval_ranks(sim).tolist() == [1, 3, 2]
    m = retrieval_metrics(sim, ks=(1, 2, 5))
    assert m["R@1"] == pytest.approx(1 / 3) and m["R@2"] == pytest.approx(2 / 3)
    assert "R@5" not in m  # more than the candidates
    assert m["mean_rank"] == pytest.approx(2.0) and m["median_rank"] == 2.0
    assert m["chance_R@1"] == pytest.approx(1 / 3)


def test_ties_rank_pessimistically_and_explicit_matches():
    assert retrieval_ranks(np.zeros((4, 4))).tolist() == [4, 4, 4, 4]
    sim = np.array([[0.1, 0.9, 0.3], [0.5, 0.2, 0.6]])
    assert retrieval_ranks(sim, match=[1, 2]).tolist() == [1, 1]
    with pytest.raises(ValueError, match="match"):
        retrieval_ranks(sim, match=[0, 3])


def test_random_similarity_gives_chance_recall():
    rng = np.random.default_rng(0)
    m = retrieval_metrics(rng.normal(size=(2000, 200)), match=rng.integers(0, 200, 2000))
    assert m["R@10"] == pytest.approx(10 / 200, abs=0.015)
    assert m["mean_rank"] == pytest.approx(100.5, rel=0.05)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_the_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = rng.integers(0, 6, 60).astype(float)  # many ties
    assert auroc(labels, scores) == pytest.approx(_pairwise_auroc(labels, scores))


def test_auroc_extremes_and_undefined():
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert math.isnan(auroc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_classification_metrics_by_hand():
    labels = [1, 1, 0, 0, 1]
    scores = [0.9, 0.4, 0.6, 0.1, 0.7]  # predicted 1,0,1,0,1 -> tp 2, fp 1, fn 1, tn 1
    m = binary_classification_metrics(labels, scores, threshold=0.5)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(1 / 2)
    assert m["auroc"] == pytest.approx(_pairwise_auroc(labels, scores))


def test_best_f1_threshold_separates_separable_scores():
    labels = [0, 0, 0, 1, 1]
    scores = [0.1, 0.2, 0.35, 0.4, 0.8]
    t = best_f1_threshold(labels, scores)
    assert binary_classification_metrics(labels, scores, t)["f1"] == 1.0
