"""cxr_report's cases for the slice viewer: one per disease, most probable first, with both reports."""
from __future__ import annotations

import numpy as np

from nbsupport import cxr_report
from nbsupport.cxr_report.labeler import LABELS
from nbsupport.cxr_report.pipeline import AttentionResult


def test_one_case_per_disease_with_its_own_evidence_map_most_probable_first():
    rng = np.random.default_rng(0)
    evidence = rng.random((14, 4, 4)).astype(np.float32)
    probabilities = np.linspace(0.05, 0.7, 14)[::-1].copy()
    probabilities[LABELS.index("Cardiomegaly")] = 0.95
    att = AttentionResult("p1/s1/frontal", "The heart is enlarged. No pleural effusion.", None, None, None, None,
                          rng.integers(0, 255, (32, 32), dtype=np.uint8), evidence, probabilities,
                          "Cardiomegaly. No effusion.")
    cases = cxr_report.attention_viewer_cases(att)
    assert len(cases) == 14
    assert cases[0]["title"] == "Cardiomegaly p=0.95"
    np.testing.assert_array_equal(cases[0]["attention"], evidence[LABELS.index("Cardiomegaly")])
    assert "The heart is enlarged." in cases[0]["text"] and "Cardiomegaly. No effusion." in cases[0]["text"]
    assert "\u201cThe heart is enlarged.\u201d" in cases[0]["text"]  # the generated sentence naming the finding
    assert {c["modality"] for c in cases} == {"XR"}
