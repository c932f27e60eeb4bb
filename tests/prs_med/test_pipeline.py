"""The four prs_med verbs called from Python, as a notebook would: what each writes into the run folder, including
the offline views the run index links (03_case_viewer.html, 04_attention_viewer.html), and the trained model
loaded back with the one signature every system has."""
from __future__ import annotations

import json
from typing import Any

import pytest

from nbsupport.prs_med import pipeline
from nbsupport.runs import RunFolder


@pytest.mark.slow
def test_the_verbs_write_what_the_run_folder_promises(smoke_run: Any) -> None:
    run, outcome, inferred = smoke_run.run, smoke_run.outcome, smoke_run.inferred
    attention = pipeline.attention_maps(smoke_run.stages[3], RunFolder.for_stage(smoke_run.stages[3]))

    assert inferred.viewer_path == run.path / "03_case_viewer.html" and inferred.viewer_path.is_file()
    assert len(inferred.viewer_cases) == 2 and "model answer:" in inferred.viewer_cases[0]["text"]
    assert attention.viewer_path == run.path / "04_attention_viewer.html" and attention.viewer_path.is_file()
    assert [c["title"] for c in attention.viewer_cases][0] == "decoder cross-attention: question (mean)"
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics["02_train"]["parameters"] == outcome.parameters.to_dict()
    assert {"lora_adapters", "vlm", "trainable", "total"} <= set(metrics["02_train"]["parameters"])
    assert "test_baseline_image_only_dice" in metrics["02_train"] and "test_dice" in metrics["03_infer"]
    model = pipeline.load_trained_model(outcome.checkpoint, device="cpu")
    assert not model.training and {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"}
    assert int(model.trained_batches) == 1


@pytest.mark.slow
def test_every_test_metric_has_its_interval_and_the_run_its_headline(smoke_run: Any) -> None:
    metrics = json.loads((smoke_run.run.path / "metrics.json").read_text())
    for stage in ("02_train", "03_infer"):
        scored = {k: v for k, v in metrics[stage].items() if k.startswith("test_") and isinstance(v, float)}
        assert {"test_dice", "test_position_accuracy", "test_baseline_image_only_dice"} <= set(scored)
        for key in scored:
            low, high = metrics[stage][f"{key}_ci95"]
            assert low is None or low <= scored[key] <= high, (stage, key)
        for task_scores in metrics[stage]["per_task"].values():
            assert "dice_ci95" in task_scores and "position_accuracy_ci95" in task_scores
        paired = metrics[stage]["test_dice_minus_image_only_dice"]
        assert paired["diff"] == pytest.approx(scored["test_dice"] - scored["test_baseline_image_only_dice"])
        assert len(paired["ci95"]) == 2 and "test_position_accuracy_minus_most_frequent_position" in metrics[stage]
    headline = json.loads((smoke_run.run.path / "headline.json").read_text())
    assert headline["stage"] == "03_infer" and headline["metric"] == "test Dice"
    assert headline["value"] == metrics["03_infer"]["test_dice"]
    assert headline["ci95"] == metrics["03_infer"]["test_dice_ci95"]
    assert headline["baseline_value"] == metrics["03_infer"]["test_baseline_image_only_dice"]
    table = smoke_run.inferred.table
    assert list(table.index) == ["polyp_endoscopy", "all"] and " (" in table.loc["all", "position_accuracy"]
    assert list(smoke_run.inferred.comparisons.index)[0] == "dice_minus_image_only_dice"
