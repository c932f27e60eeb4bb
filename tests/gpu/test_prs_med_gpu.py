"""prs_med on CUDA (run where a GPU is lent: ``pytest -m gpu tests/gpu``): the smoke profile trains a few steps in
bf16 (the shared loop's ``mixed_precision="auto"`` on CUDA) with its image-only baseline, then 02_train's test
evaluation, 03_infer (answer generation + mask) and ``predict_files`` run on the GPU with every tensor of the network
there; 04_attention, which works on the CPU by design, reads the CUDA-trained run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nbsupport.prs_med import pipeline
from nbsupport.prs_med.config import AttentionConfig, InferConfig, PreprocessConfig, TrainConfig
from nbsupport.prs_med.demo_data import DEMO_SIZES, write_demo_dataset
from nbsupport.runs import RunFolder
from nbsupport.train import resolve_mixed_precision

pytestmark = pytest.mark.gpu  # tests/conftest.py skips gpu tests, saying why, where CUDA is absent


def test_smoke_trains_in_bf16_and_answers_on_cuda(tmp_path: Path) -> None:
    assert resolve_mixed_precision("auto") == "bf16"  # what the training loop decides on this GPU
    root = write_demo_dataset(tmp_path / "data", **DEMO_SIZES["smoke"])
    run_dir = tmp_path / "runs" / "gpu" / "prs_med"
    common = {"profile": "smoke", "manifest": str(tmp_path / "manifest.csv"), "run_dir": str(run_dir)}
    prep = PreprocessConfig.from_params({**common, "data_root": str(root), "n_examples": 1})
    pipeline.preprocess(prep, RunFolder.for_stage(prep))
    train_cfg = TrainConfig.from_params({**common, "device": "cuda", "max_steps": 4})
    outcome = pipeline.train(train_cfg, RunFolder.for_stage(train_cfg))
    assert outcome.history and all(np.isfinite(e["train_loss"]) for e in outcome.history if "train_loss" in e)
    assert json.loads((run_dir / "metrics.json").read_text())["02_train"]["steps"] == 4

    model = pipeline.load_trained_model(outcome.checkpoint, "cuda")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cuda"}
    infer_cfg = InferConfig.from_params({**common, "device": "cuda", "n_examples": 1})
    result = pipeline.predict(infer_cfg, RunFolder.for_stage(infer_cfg))
    metrics = json.loads((run_dir / "metrics.json").read_text())["03_infer"]
    assert metrics["test_dice_ci95"] and metrics["test_position_accuracy_ci95"] and len(result.predictions) == 10
    attention_cfg = AttentionConfig.from_params({**common, "max_new_tokens": 4})
    attention = pipeline.attention_maps(attention_cfg, RunFolder.for_stage(attention_cfg))
    assert attention.decoder_maps and np.isfinite(attention.decoder_maps[0][1]).all()

    image = root / result.predictions.image_path.iloc[0]
    summary = pipeline.predict_files(run_dir, [image], tmp_path / "answers", device="cuda",
                                     question="Where is the lesion located in this image?")
    assert summary.ok and (tmp_path / "answers" / pipeline.ANSWERS_TABLE).is_file()
