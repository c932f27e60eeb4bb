"""ct_clip's cases for the slice viewer: preprocessed RAS volumes shown in the radiological convention, in HU."""
from __future__ import annotations

import numpy as np
import pandas as pd

from nbsupport import ct_clip
from nbsupport.ct_clip import preprocessing as ct_pre
from nbsupport.ct_clip.pipeline import AttentionResult
from nbsupport.ct_clip.views import viewer_attention, viewer_volume


def test_a_right_anterior_superior_voxel_is_drawn_top_left_of_the_last_axial_slice():
    volume = np.zeros((1, 6, 5, 4), np.float16)  # (1, X->R, Y->A, Z->S), 0..1 over HU_WINDOW
    volume[0, 5, 4, 3] = 1.0  # the most right, anterior and superior voxel
    image, spacing = viewer_volume(volume, (1.0, 2.0, 3.0))
    assert image.shape == (4, 5, 6) and spacing == (3.0, 2.0, 1.0)  # (D=S, H=A, W=R), mm the same way
    # radiological convention: anterior at the top, the patient's right on the left; slices inferior -> superior
    assert np.unravel_index(np.argmax(image), image.shape) == (3, 0, 0)
    assert image.max() == ct_pre.HU_WINDOW[1] and image.min() == ct_pre.HU_WINDOW[0]
    relevance = np.zeros((6, 5, 4), np.float32)
    relevance[5, 4, 3] = 1.0
    assert np.unravel_index(np.argmax(viewer_attention(relevance)), image.shape) == (3, 0, 0)


def test_attention_viewer_case_carries_the_volume_the_heatmap_and_the_reports(tmp_path):
    volume = np.random.default_rng(0).random((1, 8, 8, 6)).astype(np.float16)
    np.savez(tmp_path / "v.npz", image=volume)
    top = pd.DataFrame({"rank": [1, 2], "report of": ["v", "w"], "similarity": [0.9, 0.4],
                        "is its own report": [True, False], "report": ["Pleural effusion.", "Normal."]})
    att = AttentionResult("v", None, top, None, np.ones((4, 4, 3), np.float32), tmp_path / "v.npz", (1.5, 1.5, 2.0),
                          "Pleural effusion is present.", "Bilateral pleural effusion.")
    (case,) = ct_clip.attention_viewer_cases(att)
    assert case["modality"] == "CT" and case["image"].shape == (6, 8, 8) and case["attention"].shape == (3, 4, 4)
    assert case["spacing"] == (2.0, 1.5, 1.5)
    assert "Pleural effusion is present." in case["text"] and "Bilateral pleural effusion." in case["text"]
    assert "1. 0.900 report of v (its own): Pleural effusion." in case["text"]
