"""seg2d compute helpers: post-processing chosen on val, and the attention of a query pixel over the key grid."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nbsupport.seg2d.inference import PostProcess, choose_postprocess, query_attention, remove_small_regions
from nbsupport.seg2d.model import build_seg2d_model
from nbsupport.seg2d.scoring import competition_score


def test_choose_postprocess_per_class_threshold_and_min_area(tmp_path: Path) -> None:
    """Class 0: a 30-pixel false speck on a slice without it (only min_area >= 32 removes it); class 1: an organ
    the model sees at probability 0.45 (only a threshold below it finds it); class 2: clean. The mean Dice it reports
    is the competition's Dice of the masks those settings make."""
    shape = (3, 40, 50)
    probs, truth = [np.zeros(shape, np.float32) for _ in range(3)], [np.zeros(shape, bool) for _ in range(3)]
    truth[0][0, 5:25, 5:25] = True
    probs[0][0, 5:25, 5:25] = 0.9
    probs[1][0, 30:35, 40:46] = 0.9  # 30 pixels, slice 1 has no class 0
    truth[0][1, 10:30, 10:30] = True
    probs[0][1, 10:30, 10:30] = 0.45
    truth[2][2, 0:20, 0:40] = True
    probs[2][2, 0:20, 0:40] = 0.8
    post = choose_postprocess(iter(probs), truth, thresholds=(0.4, 0.5), min_areas=(0, 32, 64))
    assert post.min_areas[0] == 32 and post.thresholds[1] == 0.4, post
    assert post.val_dice == pytest.approx(1.0)
    pred = [np.stack([remove_small_regions(p[c] > post.thresholds[c], post.min_areas[c]) for c in range(3)])
            for p in probs]
    ids = [f"case1_day1_slice_{i + 1:04d}" for i in range(3)]
    assert competition_score(ids, pred, truth)["dice"] == pytest.approx(post.val_dice)
    # fixed 0.5 / 0 misses the class-1 organ and keeps the speck: 2 of the 4 scored pairs are right
    fixed = [np.stack([p[c] > 0.5 for c in range(3)]) for p in probs]
    assert competition_score(ids, fixed, truth)["dice"] == pytest.approx(0.5)
    (tmp_path / "postprocess.json").write_text(post.to_json())
    assert PostProcess.from_file(tmp_path / "postprocess.json") == post


@pytest.mark.parametrize("arch", ["segformer", "beit", "dpt"])
def test_query_attention_maps_cover_the_key_grid(arch: str) -> None:
    model = build_seg2d_model(arch, 3, 64, width="tiny").eval()
    with torch.no_grad():
        _, attentions = model(torch.rand(1, 1, 64, 64), output_attentions=True)
    layers, heads = query_attention(attentions, model.spec, (10, 50), 64)
    assert len(layers) == len(attentions) and len(heads) == attentions[-1].shape[1]
    for _, m in layers:
        # A softmax row: the query's attention over the keys sums to 1 (the [CLS] key is dropped for ViTs).
        assert m.ndim == 2 and m.shape[0] == m.shape[1]
        assert 0.5 < m.sum() <= 1.0 + 1e-5
