"""ct_clip on CUDA (run where a GPU is lent: ``pytest -m gpu tests/gpu``): the smoke profile trains a few steps in
bf16 (the shared loop's ``mixed_precision="auto"`` on CUDA), then 03_infer, 04_attention (Grad-CAM relevance) and
``predict_files`` run on the GPU with every tensor of the network there."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nbsupport import ct_clip
from nbsupport.ct_clip.config import AttentionConfig, InferConfig, PreprocessConfig, TrainConfig
from nbsupport.ct_clip.data import scan_dataset
from nbsupport.ct_clip.demo_data import DEMO_SIZES, write_demo_dataset
from nbsupport.ct_clip.pipeline import load_trained_model, predict_files
from nbsupport.runs import RunFolder
from nbsupport.optim import resolve_mixed_precision

pytestmark = pytest.mark.gpu  # tests/conftest.py skips gpu tests, saying why, where CUDA is absent


def test_smoke_trains_in_bf16_and_infers_on_cuda(tmp_path: Path) -> None:
    assert resolve_mixed_precision("auto") == "bf16"  # what the training loop decides on this GPU
    root = write_demo_dataset(tmp_path / "data", **DEMO_SIZES["smoke"])
    run_dir = tmp_path / "runs" / "gpu" / "ct_clip"
    common = {"profile": "smoke", "manifest": str(tmp_path / "manifest.csv"), "run_dir": str(run_dir)}
    prep = PreprocessConfig.from_params({**common, "data_root": str(root), "n_examples": 1, "real_ct": "none"})
    ct_clip.preprocess(prep, RunFolder.for_stage(prep))
    train_cfg = TrainConfig.from_params({**common, "device": "cuda", "max_steps": 4})
    outcome = ct_clip.train(train_cfg, RunFolder.for_stage(train_cfg))
    assert outcome.history and np.isfinite(outcome.evaluation.headline()["report_to_volume_R@1"])

    model = load_trained_model(outcome.checkpoint, "cuda")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cuda"}
    infer_cfg = InferConfig.from_params({**common, "device": "cuda"})
    ct_clip.predict(infer_cfg, RunFolder.for_stage(infer_cfg))
    metrics = json.loads((run_dir / "metrics.json").read_text())["03_infer"]
    assert metrics["test_zero_shot_mean_auroc_ci95"] and metrics["test_report_to_volume_R@1_ci95"]
    attention_cfg = AttentionConfig.from_params({**common, "device": "cuda"})
    attention = ct_clip.attention_maps(attention_cfg, RunFolder.for_stage(attention_cfg))
    assert np.isfinite(attention.relevance).all()

    manifest = pd.read_csv(tmp_path / "manifest.csv")
    volume = manifest[manifest.split == "test"].volume.iloc[0]
    nifti = root / scan_dataset(root).set_index("volume").loc[volume, "nifti"]
    summary = predict_files(run_dir, [nifti], tmp_path / "predictions", device="cuda")
    assert summary.ok and np.isclose(np.linalg.norm(np.load(summary.written[0])), 1, atol=1e-3)
