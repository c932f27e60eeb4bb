"""prs_med views: the viewer cases of 04 (decoder cross-attention per prompt token, masks and the answers)."""
from __future__ import annotations

import numpy as np

from nbsupport import prs_med
from nbsupport.prs_med.pipeline import AttentionResult


def test_one_case_per_decoder_map_with_both_masks_and_the_answers():
    image = np.zeros((40, 50, 3), np.uint8)
    image[..., 0] = 200
    truth = np.zeros((40, 50), bool)
    truth[5:15, 5:15] = True
    maps = [("question (mean)", np.ones((4, 4))), ("'left'", np.eye(4))]
    att = AttentionResult("polyp:3", "Where is the polyp?", "top left", "The polyp is in the top left.", maps,
                          [("LM layer 1", np.ones((3, 3)))], image, None, None, None, truth, truth.copy(), "polyp")
    cases = prs_med.attention_viewer_cases(att)
    assert [c["title"] for c in cases] == ["decoder cross-attention: question (mean)",
                                           "decoder cross-attention: 'left'"]
    assert cases[0]["image"].shape == (40, 50, 3) and cases[0]["modality"] == "RGB"  # drawn in colour
    assert set(cases[0]["masks"]) == {"true finding", "predicted finding"}
    assert "Where is the polyp?" in cases[1]["text"] and "The polyp is in the top left." in cases[1]["text"]
    assert len(prs_med.attention_viewer_cases(att, vlm=True)) == 3
