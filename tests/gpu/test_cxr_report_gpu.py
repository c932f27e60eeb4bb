"""cxr_report on a CUDA device: the smoke profile trained for a few steps in bf16 (the tiny Llama quantized to NF4
on the GPU, the projection and LoRA beside it), then 03_infer (real radiograph included) and ``predict_files`` on
the GPU. Skipped without CUDA; run with ``pytest -m gpu tests/gpu``."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

from nbsupport.cxr_report import InferConfig, PreprocessConfig, TrainConfig, load_trained_model, predict
from nbsupport.cxr_report import predict_files, preprocess, train
from nbsupport.cxr_report.data import read_xray
from nbsupport.cxr_report.demo_data import write_demo_dataset
from nbsupport.runs import RunFolder
from nbsupport.optim import resolve_mixed_precision

pytestmark = pytest.mark.gpu  # tests/conftest.py skips gpu tests, saying why, where CUDA is absent


def test_smoke_trains_in_bf16_and_reports_on_cuda(tmp_path: Path) -> None:
    import bitsandbytes as bnb

    assert resolve_mixed_precision("auto") == "bf16"  # what the trainer picks on this GPU
    root = write_demo_dataset(tmp_path / "data", n_patients=16, image_size=64, seed=2)
    run_dir = tmp_path / "runs" / "r" / "cxr_report"
    common = {"profile": "smoke", "manifest": str(tmp_path / "m.csv"), "run_dir": str(run_dir), "device": "cuda"}
    cfg = PreprocessConfig.from_params({**common, "data_root": str(root), "n_examples": 1})
    preprocess(cfg, RunFolder.for_stage(cfg))
    cfg = TrainConfig.from_params({**common, "vision_epochs": 1, "max_steps": 2})
    train(cfg, RunFolder.for_stage(cfg))
    assert json.loads((run_dir / "report" / "train_result.json").read_text())["steps"] == 2

    model = load_trained_model(run_dir, device="cuda")
    tensors = [*model.vision.parameters(), *model.vision.buffers(), *model.generator.parameters(),
               *model.generator.buffers()]
    assert {t.device.type for t in tensors} == {"cuda"}
    packed = [m.weight for m in model.generator.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert packed and all(w.quant_state.absmax.is_cuda for w in packed)

    cfg = InferConfig.from_params({**common, "max_reports": 4, "n_examples": 1})
    result = predict(cfg, RunFolder.for_stage(cfg))
    assert len(result.predictions) == 4 and result.real_dicom is not None
    metrics = json.loads((run_dir / "metrics.json").read_text())["03_infer"]
    assert metrics["model_ce_micro_f1_ci95"] is not None

    image = tmp_path / "mine" / "x.png"
    image.parent.mkdir()
    cv2.imwrite(str(image), read_xray(next(root.glob("*/patient*/study*/view1_frontal.jpg"))))
    summary = predict_files(run_dir, [image.parent], tmp_path / "out", device="cuda")
    assert summary.ok and (tmp_path / "out" / "reports.csv").is_file()
