"""prs_med verbs: configs per profile, the evaluation table and the predictions CSV of an untrained network."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nbsupport.config import ConfigError
from nbsupport.prs_med import data, pipeline
from nbsupport.prs_med.model import PRSMedNet


def test_profiles_build_valid_configs() -> None:
    smoke = pipeline.TrainConfig.from_params({"profile": "smoke"})
    demo = pipeline.TrainConfig.from_params({"profile": "demo"})
    full = pipeline.TrainConfig.from_params({"profile": "full"})
    assert smoke.spec().vlm == "tiny" and demo.spec().vlm == "smollm2-135m"
    assert (full.image_size, full.lora_r, full.decoder_hidden, full.epochs) == (1024, 16, 512, 20)
    assert full.sam_path and full.vlm.startswith("weights/")  # local paths, never a download
    with pytest.raises(ConfigError, match="unknown parameter 'lora_rank'"):
        pipeline.TrainConfig.from_params({"profile": "smoke", "lora_rank": 8})


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
    table = pipeline.per_task_table(preds, manifest)
    assert list(table.index) == ["a", "b", "all"]
    assert table.loc["a", "position_accuracy"] == 0.5 and table.loc["b", "position_accuracy"] == 0.5
    assert table.loc["all", "position_accuracy"] == 0.5 and table.loc["all", "n"] == 4
    assert table.loc["a", "dice"] == pytest.approx(0.7) and table.loc["b", "hd95_px"] == 1.0
    assert table.loc["a", "baseline_most_frequent_position_accuracy"] == 0.5  # "top right" for task a
    assert table.loc["b", "baseline_most_frequent_position_accuracy"] == 0.5  # "center" for task b
    assert table.loc["all", "answer_mask_agreement"] == 0.5


@pytest.mark.slow
def test_evaluate_split_writes_every_column_at_image_size(tmp_path: Path) -> None:
    root = data.write_demo_dataset(tmp_path / "d", n_train=1, n_val=0, n_test=2, image_size=40,
                                   tasks=("polyp_endoscopy", "lung_Xray"))
    manifest, _ = data.build_manifest(root)
    cfg = pipeline.TrainConfig.from_params({"profile": "smoke", "image_size": 32, "vision_size": 32})
    model = PRSMedNet(cfg.spec())
    ev = pipeline.evaluate_split(model, manifest, "test", root, torch.device("cpu"), batch_size=3, max_new_tokens=3)
    assert list(ev.predictions.columns[:8]) == list(pipeline.PREDICTION_COLUMNS)
    assert len(ev.predictions) == 4 and all(m.shape == (40, 40) for m in ev.pred_masks)
    assert list(ev.per_task.index) == ["lung_Xray", "polyp_endoscopy", "all"]
    assert ev.predictions["dice"].between(0, 1).all()
    assert ev.overall["n"] == 4


def test_modality_loss_schedule_survives_a_resume(tmp_path: Path) -> None:
    """The early modality loss is keyed on the batches the network was trained on, which a resumed run restores from
    the checkpoint: after a resume past ``cls_epochs`` the loss stays off (a fresh counter would turn it back on)."""
    from nbsupport.manifest import write_manifest
    from nbsupport.checkpoints import load_weights
    from nbsupport.train import fit

    root = data.write_demo_dataset(tmp_path / "d", n_train=4, n_val=0, n_test=0, image_size=32,
                                   tasks=("polyp_endoscopy",))
    manifest, _ = data.build_manifest(root)
    write_manifest(manifest, tmp_path / "m.csv", data.PRSMED_SCHEMA, root)
    config = pipeline.TrainConfig.from_params({"profile": "smoke", "image_size": 32, "vision_size": 32,
                                               "batch_size": 2, "cls_epochs": 1, "lora_dropout": 0.0}).to_dict()
    kwargs = {"config": config, "manifest": str(tmp_path / "m.csv"), "data_root": str(root)}
    task = pipeline.training_task(**kwargs)
    assert task.cls_steps == 2
    settings = pipeline._settings(task.cfg, manifest)
    fit(task, dataclasses.replace(settings, max_steps=2), tmp_path / "run")
    resumed = pipeline.training_task(**kwargs)  # a new process: nothing carried over but the checkpoint
    fit(resumed, dataclasses.replace(settings, max_steps=3, resume=True), tmp_path / "run")
    model = resumed.build_model()
    load_weights(model, tmp_path / "run" / "checkpoints" / "last")
    model.eval()  # no dropout: the loss is a deterministic function of the batch
    assert int(model.trained_batches) == 3
    batch = data.collate_qa([resumed.train_dataset()[i] for i in range(2)])
    parts = resumed.losses(model, batch)
    without_cls = parts["seg"] + task.cfg.lambda_txt * parts["lm"]
    assert torch.allclose(resumed.training_step(model, batch), without_cls, atol=1e-5)
    fresh = resumed.build_model().eval()  # a network at batch 0 still gets the modality loss
    parts = resumed.losses(fresh, batch)
    with_cls = parts["seg"] + task.cfg.lambda_txt * parts["lm"] + task.cfg.lambda_cls * parts["cls"]
    assert torch.allclose(resumed.training_step(fresh, batch), with_cls, atol=1e-5)


def test_position_loss_joins_the_training_step(tmp_path: Path) -> None:
    """``lambda_position`` > 0 (our addition) adds the image tokens' position cross-entropy against the manifest's
    position (from the mask) to the step's loss; without ``answer_loss_to_vision`` the answer loss leaves the vision
    tower untouched."""
    from nbsupport.manifest import write_manifest

    root = data.write_demo_dataset(tmp_path / "d", n_train=4, n_val=0, n_test=0, image_size=32,
                                   tasks=("polyp_endoscopy",))
    manifest, _ = data.build_manifest(root)
    write_manifest(manifest, tmp_path / "m.csv", data.PRSMED_SCHEMA, root)
    config = pipeline.TrainConfig.from_params({"profile": "smoke", "image_size": 32, "vision_size": 32,
                                               "lora_dropout": 0.0, "lambda_position": 2.0,
                                               "image_tokens_at": "before_answer",
                                               "answer_loss_to_vision": False}).to_dict()
    task = pipeline.training_task(config, str(tmp_path / "m.csv"), str(root))
    model = task.build_model().eval()
    batch = data.collate_qa([task.train_dataset()[i] for i in range(4)])
    parts = task.losses(model, batch)
    assert 0.5 < float(parts["position"]) < 5  # 5-way cross-entropy of an untrained head (chance: 1.61)
    expected = parts["seg"] + parts["lm"] + task.cfg.lambda_cls * parts["cls"] + 2.0 * parts["position"]
    assert torch.allclose(task.training_step(model, batch), expected, atol=1e-5)
    model.zero_grad()
    parts["lm"].backward()
    tower = model.llava.model.vision_tower
    assert all(p.grad is None for p in tower.parameters())
    assert any(p.grad is not None for n, p in model.vlm.named_parameters() if "lora_" in n)
