"""textseg3d on CUDA (run where a GPU is lent: ``pytest -m gpu tests/gpu``): the smoke profile trains a few steps in
bf16 (the shared loop's ``mixed_precision="auto"`` on CUDA), then 03_infer's sliding window and ``predict_files``
run on the GPU with every tensor of the network there."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nbsupport import textseg3d
from nbsupport.runs import RunFolder
from nbsupport.textseg3d.config import InferConfig, PreprocessConfig, TrainConfig
from nbsupport.textseg3d.demo_data import DEMO_SIZES, write_demo_dataset
from nbsupport.textseg3d.pipeline import load_trained_model, predict_files
from nbsupport.optim import resolve_mixed_precision

pytestmark = pytest.mark.gpu  # tests/conftest.py skips gpu tests, saying why, where CUDA is absent


def test_smoke_trains_in_bf16_and_infers_on_cuda(tmp_path: Path) -> None:
    assert resolve_mixed_precision("auto") == "bf16"  # what the training loop decides on this GPU
    root = write_demo_dataset(tmp_path / "data", **DEMO_SIZES["smoke"])
    run_dir = tmp_path / "runs" / "gpu" / "textseg3d"
    common = {"profile": "smoke", "manifest": str(tmp_path / "manifest.csv"), "run_dir": str(run_dir)}
    prep = PreprocessConfig.from_params({**common, "data_root": str(root), "n_examples": 1})
    textseg3d.preprocess(prep, RunFolder.for_stage(prep))
    train_cfg = TrainConfig.from_params({**common, "device": "cuda", "max_steps": 4})
    outcome = textseg3d.train(train_cfg, RunFolder.for_stage(train_cfg))
    assert outcome.history and np.isfinite(outcome.scores["dice"]).all()

    model = load_trained_model(outcome.checkpoint, "cuda")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cuda"}
    infer_cfg = InferConfig.from_params({**common, "device": "cuda", "n_examples": 1})
    result = textseg3d.predict(infer_cfg, RunFolder.for_stage(infer_cfg))
    metrics = json.loads((run_dir / "metrics.json").read_text())["03_infer"]
    assert metrics["test_dice_true_ci95"] and len(result.evaluations["true"].cases) == 2

    image = root / result.evaluations["true"].cases[0] / "data.npz"
    summary = predict_files(run_dir, [image], tmp_path / "masks", device="cuda",
                            report="N0, cT2, breast conserving surgery, left side")
    assert summary.ok and [p.name for p in summary.written] == [f"{image.parent.name}.nii.gz"]
    assert nib.load(str(summary.written[0])).shape == np.load(image)["data"].shape
