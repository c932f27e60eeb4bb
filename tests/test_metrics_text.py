"""Text-generation metrics on hand-computed cases (the pycocoevalcap comparison is test_metrics_pycocoevalcap.py),
R2Gen's report cleaning, and clinical efficacy."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nbsupport.metrics import bleu_scores, cider_d, clinical_efficacy, rouge_l, tokenize_report

HYPS = ["There is a small left pleural effusion.", "The heart is enlarged. No pneumothorax.",
        "No acute cardiopulmonary abnormality.", "Focal right lower lobe consolidation is present."]
REFS = ["Small left pleural effusion is present.", "The heart is enlarged. There is no pneumothorax.",
        "No acute cardiopulmonary process.", "There is consolidation in the right lower lobe."]


def test_tokenize_report_cleans_like_r2gen() -> None:
    # lower case, a "." token per sentence, list markers and most punctuation gone, hyphens kept, and what R2Gen's
    # cleaner deletes is deleted, not split on ("3.5" -> "35", "AP/lateral" -> "aplateral")
    assert tokenize_report("1. Left-sided PICC, tip in SVC.  2. No effusion") == \
        ["left-sided", "picc", "tip", "in", "svc", ".", "no", "effusion", "."]
    assert tokenize_report("AP/lateral view... A 3.5 cm nodule (stable); patient's heart: normal!") == \
        ["aplateral", "view", ".", "a", "35", "cm", "nodule", "stable", "patients", "heart", "normal", "."]
    assert tokenize_report("Heart normal.\nLungs clear.") == ["heart", "normal", ".", "lungs", "clear", "."]
    assert tokenize_report("") == tokenize_report("  . ") == tokenize_report(None) == []


def test_bleu_has_no_smoothing_and_a_brevity_penalty() -> None:
    # "no effusion ." vs "no pleural effusion .": 1-grams 3/3, 2-grams 1/2 ("effusion ."), 3-grams 0/1, 4-grams 0/0;
    # brevity penalty exp(1 - 4/3). Without smoothing BLEU-3 is ~0 (sacrebleu's smoothing gave ~0.3 here).
    scores = bleu_scores(["No effusion."], ["No pleural effusion."])
    penalty = math.exp(1 - 4 / 3)
    assert scores["bleu1"] == pytest.approx(penalty)
    assert scores["bleu2"] == pytest.approx(math.sqrt(0.5) * penalty)
    assert scores["bleu3"] < 1e-4 and scores["bleu4"] < 1e-4


def test_bleu_of_identical_reports_is_one() -> None:
    assert bleu_scores(REFS, REFS)["bleu4"] == pytest.approx(1.0)
    assert 0 < bleu_scores(HYPS, REFS)["bleu4"] < bleu_scores(HYPS, REFS)["bleu1"] < 1


def test_rouge_l_hand_computed() -> None:
    # tokens "a b c d ." vs "a c d e f .": LCS "a c d ." = 4, P = 4/5, R = 4/6, beta 1.2
    p, r, b2 = 4 / 5, 4 / 6, 1.2 ** 2
    assert rouge_l(["a b c d"], ["a c d e f"]) == pytest.approx((1 + b2) * p * r / (r + b2 * p))
    assert rouge_l(["x y"], ["a b"]) == pytest.approx((1 + b2) * (1 / 3) ** 2 / ((1 + b2) / 3))  # only "." shared
    assert rouge_l(["a b", "a b c d"], ["a b", "a c d e f"]) == pytest.approx(
        (1.0 + (1 + b2) * p * r / (r + b2 * p)) / 2)


def test_cider_d_hand_computed() -> None:
    # Every report ends in the "." token, which is in all N references: idf log(N) - log(N) = 0, it weighs nothing.
    # Two reports with otherwise disjoint words, each predicted exactly: every other n-gram has df = 1 of N = 2, so
    # each order's cosine is 1 and the length penalty is 1 -> 10 x mean(1) = 10.
    assert cider_d(["a b c d", "e f g h"], ["a b c d", "e f g h"]) == pytest.approx(10.0)
    assert cider_d(["x y z w", "u v s t"], ["a b c d", "e f g h"]) == 0.0
    # Unigrams only: hyp1 "a x" vs ref1 "a b"; hyp2 = ref2 = "c d"; N = 2, idf = log 2 for a, b, c, d, x.
    # report 1: h = {a: log2, x: log2}, r = {a: log2, b: log2}: dot = log2^2, |h| |r| = 2 log2^2 -> 0.5;
    # report 2: 1. CIDEr = 10 * 0.75.
    assert cider_d(["a x", "c d"], ["a b", "c d"], max_order=1) == pytest.approx(7.5)
    # Clipping: hyp "a b a b a b" vs ref "a b", unigrams: h = {a: 3 log2, b: 3 log2}, r = {a: log2, b: log2};
    # clipped dot = 2 log2^2, |h| |r| = 6 log2^2 -> 1/3; report 2 scores 1. pycocoevalcap measures length in
    # bigrams, so with unigrams only there is no length penalty.
    assert cider_d(["a b a b a b", "c d"], ["a b", "c d"], max_order=1) == pytest.approx(10 * (1 / 3 + 1) / 2)
    # Bigrams too: h = {ab: 3, ba: 2, "b .": 1} x log2, r = {ab: 1, "b .": 1} x log2 -> cosine 2 / sqrt(14 * 2);
    # 6 vs 2 bigrams -> Gaussian length penalty exp(-(6 - 2)^2 / (2 * 6^2)).
    penalty = math.exp(-16 / 72)
    assert cider_d(["a b a b a b", "c d"], ["a b", "c d"], max_order=2) == pytest.approx(
        10 * (penalty * (1 / 3 + 2 / math.sqrt(28)) / 2 + 1) / 2, rel=1e-9)


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
