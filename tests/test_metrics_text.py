"""Text-generation metrics: BLEU against nltk, ROUGE-L and CIDEr-D on hand-computed cases, clinical efficacy."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nbsupport.metrics import bleu_scores, cider_d, clinical_efficacy, rouge_l, tokenize_report

HYPS = ["There is a small left pleural effusion.", "The heart is enlarged. No pneumothorax.",
        "No acute cardiopulmonary abnormality.", "Focal right lower lobe consolidation is present."]
REFS = ["Small left pleural effusion is present.", "The heart is enlarged. There is no pneumothorax.",
        "No acute cardiopulmonary process.", "There is consolidation in the right lower lobe."]


def test_tokenize_report_splits_words_and_punctuation() -> None:
    assert tokenize_report("No effusion. Left-sided PICC, tip in SVC.") == \
        ["no", "effusion", ".", "left-sided", "picc", ",", "tip", "in", "svc", "."]


def test_bleu_matches_nltk_corpus_bleu() -> None:
    from nltk.translate.bleu_score import corpus_bleu

    ours = bleu_scores(HYPS, REFS)
    hyps = [tokenize_report(h) for h in HYPS]
    refs = [[tokenize_report(r)] for r in REFS]
    for n in range(1, 5):
        theirs = corpus_bleu(refs, hyps, weights=tuple([1.0 / n] * n))
        assert ours[f"bleu{n}"] == pytest.approx(theirs, abs=1e-6), n
    assert 0 < ours["bleu4"] < ours["bleu1"] < 1


def test_bleu_of_identical_reports_is_one() -> None:
    assert bleu_scores(REFS, REFS)["bleu4"] == pytest.approx(1.0)


def test_rouge_l_hand_computed() -> None:
    # hyp "a b c d" vs ref "a c d e f": LCS "a c d" = 3, P = 3/4, R = 3/5, beta 1.2
    p, r, b2 = 3 / 4, 3 / 5, 1.2 ** 2
    assert rouge_l(["a b c d"], ["a c d e f"]) == pytest.approx((1 + b2) * p * r / (r + b2 * p))
    assert rouge_l(["x y"], ["a b"]) == 0.0
    assert rouge_l(["a b", "a b c d"], ["a b", "a c d e f"]) == pytest.approx(
        (1.0 + (1 + b2) * p * r / (r + b2 * p)) / 2)


def test_cider_d_hand_computed() -> None:
    # Two reports with disjoint vocabularies, each predicted exactly: every n-gram has df = 1 of N = 2, so each
    # order's cosine is 1 and the length penalty is 1 -> 10 x mean(1) = 10.
    assert cider_d(["a b c d", "e f g h"], ["a b c d", "e f g h"]) == pytest.approx(10.0)
    # Nothing shared -> 0.
    assert cider_d(["x y z w", "u v s t"], ["a b c d", "e f g h"]) == 0.0
    # Unigrams only: hyp1 "a x" vs ref1 "a b"; hyp2 = ref2 = "c d"; N = 2, idf = log 2 for a, b, c, d.
    # report 1: h = {a: log2, x: log2 (df 0 -> max(1, 0) = 1)}, r = {a: log2, b: log2}:
    # dot = min(log2, log2) * log2 = log2^2; |h| |r| = 2 log2^2 -> 0.5. Report 2: 1. CIDEr = 10 * 0.75.
    assert cider_d(["a x", "c d"], ["a b", "c d"], max_order=1) == pytest.approx(7.5)
    # Clipping and the Gaussian length penalty: hyp "a b a b a b" (6 tokens) vs ref "a b" (2 tokens):
    # h = {a: 3 log2, b: 3 log2}, r = {a: log2, b: log2}; clipped dot = 2 log2^2, |h| |r| = 6 log2^2 -> 1/3,
    # times exp(-(6 - 2)^2 / (2 * 6^2)); report 2 scores 1.
    longer = cider_d(["a b a b a b", "c d"], ["a b", "c d"], max_order=1)
    assert longer == pytest.approx(10 * (math.exp(-16 / 72) / 3 + 1) / 2, rel=1e-9)


def test_clinical_efficacy_counts() -> None:
    names = ["A", "B", "C"]
    ref = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    pred = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]])
    ce = clinical_efficacy(pred, ref, names)
    # TP = 2 (A row0, B row1), FP = 1 (B row0), FN = 1 (A row1)
    assert ce["micro_precision"] == pytest.approx(2 / 3)
    assert ce["micro_recall"] == pytest.approx(2 / 3)
    assert ce["micro_f1"] == pytest.approx(2 / 3)
    # macro over A (P 1, R 0.5) and B (P 0.5, R 1); C never positive -> left out
    assert ce["macro_precision"] == pytest.approx(0.75)
    assert ce["macro_f1"] == pytest.approx(2 / 3)
    assert ce["per_label"]["A"]["support"] == 2


def test_mismatched_inputs_are_errors() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        bleu_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="expected two"):
        clinical_efficacy(np.zeros((2, 3)), np.zeros((2, 2)), ["A", "B", "C"])
