"""prs_med evaluation: the per-task table and the predictions of an untrained network at each image's size."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nbsupport.prs_med import config, data, demo_data, inference
from nbsupport.prs_med.model import PRSMedNet


def test_per_task_table_counts_positions_and_agreement() -> None:
    preds = pd.DataFrame({
        "task": ["a", "a", "b", "b"],
        "pred_answer": ["It is in the top left.", "centre", "bottom right", "?"],
        "position": ["top left", "top right", "bottom right", "center"],
        "dice": [0.8, 0.6, 0.9, 0.1], "iou": [0.7, 0.5, 0.8, 0.05], "hd95": [2.0, 4.0, 1.0, np.nan],
        "mask_position_correct": [True, False, True, True], "answer_mask_agree": [True, False, True, False],
    })
    manifest = pd.DataFrame({"split": ["train"] * 3, "task": ["a", "a", "b"],
                             "position": ["top right", "top right", "center"]})
    table = inference.per_task_table(preds, manifest)
    assert list(table.index) == ["a", "b", "all"]
    assert table.loc["a", "position_accuracy"] == 0.5 and table.loc["b", "position_accuracy"] == 0.5
    assert table.loc["all", "position_accuracy"] == 0.5 and table.loc["all", "n"] == 4
    assert table.loc["a", "dice"] == pytest.approx(0.7) and table.loc["b", "hd95_px"] == 1.0
    assert table.loc["a", "baseline_most_frequent_position_accuracy"] == 0.5  # "top right" for task a
    assert table.loc["b", "baseline_most_frequent_position_accuracy"] == 0.5  # "center" for task b
    assert table.loc["all", "answer_mask_agreement"] == 0.5


@pytest.mark.slow
def test_evaluate_split_writes_every_column_at_image_size(tmp_path: Path) -> None:
    root = demo_data.write_demo_dataset(tmp_path / "d", n_train=1, n_val=0, n_test=2, image_size=40,
                                        tasks=("polyp_endoscopy", "lung_Xray"))
    manifest, _ = data.build_manifest(root)
    cfg = config.TrainConfig.from_params({"profile": "smoke", "image_size": 32, "vision_size": 32})
    model = PRSMedNet(cfg.spec())
    ev = inference.evaluate_split(model, manifest, "test", root, torch.device("cpu"), batch_size=3,
                                  max_new_tokens=3)
    assert list(ev.predictions.columns[:8]) == list(inference.PREDICTION_COLUMNS)
    assert len(ev.predictions) == 4 and all(m.shape == (40, 40) for m in ev.pred_masks)
    assert list(ev.per_task.index) == ["lung_Xray", "polyp_endoscopy", "all"]
    assert ev.predictions["dice"].between(0, 1).all()
    assert ev.overall["n"] == 4
