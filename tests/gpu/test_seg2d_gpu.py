"""seg2d on a CUDA device: the smoke profile trains a few steps in bf16, then 03_infer and ``predict_files`` run on
the GPU (issue 19). Skipped where there is no CUDA device; run with ``pytest -m gpu tests/gpu``."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu  # tests/conftest.py skips gpu tests, saying why, where CUDA is absent


def test_seg2d_smoke_trains_in_bf16_and_predicts_on_cuda(tmp_path: Path) -> None:
    from nbsupport import seg2d
    from nbsupport.runs import RunFolder
    from nbsupport.seg2d.demo_data import DEMO_SIZES, write_demo_dataset

    root = write_demo_dataset(tmp_path / "data", **DEMO_SIZES["smoke"])
    run_dir = tmp_path / "runs" / "gpu" / "seg2d"
    params = {"profile": "smoke", "manifest": str(tmp_path / "uwmgi.csv"), "run_dir": str(run_dir), "device": "cuda"}
    cfg = seg2d.PreprocessConfig.from_params({**params, "data_root": str(root)})
    seg2d.preprocess(cfg, RunFolder.for_stage(cfg))
    cfg = seg2d.TrainConfig.from_params({**params, "max_steps": 8, "mixed_precision": "bf16"})
    outcome = seg2d.train(cfg, RunFolder.for_stage(cfg))
    assert outcome.test_metrics["steps"] == 8
    assert all(torch.isfinite(torch.tensor(e["train_loss"])) for e in outcome.history if "train_loss" in e)

    model = seg2d.load_trained_model(outcome.checkpoint, device="cuda")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cuda"}
    cfg = seg2d.InferConfig.from_params(params)
    inferred = seg2d.predict(cfg, RunFolder.for_stage(cfg))
    assert inferred.scores["dice_ci95"] is not None and len(inferred.submission)

    image = root / inferred.evaluation.manifest.image[0]
    summary = seg2d.predict_files(run_dir, [image], tmp_path / "predicted", device="cuda")
    assert summary.ok and (tmp_path / "predicted" / "submission.csv").exists()
