"""textseg3d's cases for the slice viewer: canonical IPL volumes turned inferior -> superior, fusion maps cropped to
the unpadded volume."""
from __future__ import annotations

import numpy as np

from nbsupport import textseg3d
from nbsupport.textseg3d.pipeline import AttentionResult


def test_fusion_attention_cases_crop_the_padding_and_run_inferior_to_superior():
    shape = (20, 24, 28)  # fusion_attention pads to (32, 32, 32): scale 1/2 maps are 16^3, of which 10x12x14 cover it
    image = np.zeros(shape, np.float32)
    image[0] = 500.0  # IPL: slice 0 is the most superior
    label = np.zeros(shape, bool)
    label[0, 5:9, 5:9] = True
    maps = [np.zeros((2, 16, 16, 16), np.float32), np.zeros((2, 8, 8, 8), np.float32)]
    maps[0][1, 0, 2, 3] = 1.0  # token 2, the most superior map slice
    maps[0][1, 15, 15, 15] = 5.0  # over the padding only: must not reach the viewer
    att = AttentionResult("BC001", "N0, cT1, left side", ["a"], None, None, None, image, label, label.copy(), maps,
                          (3.0, 1.0, 1.0))
    cases = textseg3d.attention_viewer_cases(att)
    assert [c["title"] for c in cases] == ["scale 1/2, prompt token 1", "scale 1/2, prompt token 2",
                                           "scale 1/4, prompt token 1", "scale 1/4, prompt token 2"]
    case = cases[1]
    assert case["attention"].shape == (10, 12, 14) and case["attention"].max() == 1.0
    assert np.unravel_index(np.argmax(case["attention"]), case["attention"].shape) == (9, 2, 3)
    assert (case["image"][-1] == 500.0).all() and case["masks"]["ground truth"][-1].any()
    assert case["modality"] == "CT" and case["spacing"] == (3.0, 1.0, 1.0)
    assert "N0, cT1, left side" in case["text"]
    assert len(textseg3d.attention_viewer_cases(att, scales=[1])) == 2
