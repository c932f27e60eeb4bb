"""The ct_clip verbs called from Python (no notebook): 02 trains and records its parameter count, 03 and 04 write
the viewer pages the run folder promises and return their cases, and the trained model loads onto a device."""
from __future__ import annotations

import json

import torch

from nbsupport import ct_clip
from nbsupport.runs import RunFolder


def test_verbs_write_the_viewer_pages_themselves(tiny_manifest, tmp_path):
    root, manifest = tiny_manifest
    common = {"profile": "smoke", "manifest": str(manifest), "run_dir": str(tmp_path / "runs" / "py" / "ct_clip")}
    train_cfg = ct_clip.TrainConfig.from_params({**common, "max_steps": 1, "epochs": 1, "batch_size": 2})
    outcome = ct_clip.train(train_cfg, RunFolder.for_stage(train_cfg))
    metrics = json.loads((tmp_path / "runs" / "py" / "ct_clip" / "metrics.json").read_text())["02_train"]
    assert metrics["n_params"] == outcome.parameters.total > metrics["n_trainable"] == outcome.parameters.trainable > 0

    infer_cfg = ct_clip.InferConfig.from_params({**common, "split": "train", "linear_probe": False})  # labels vary
    infer_run = RunFolder.for_stage(infer_cfg)
    result = ct_clip.predict(infer_cfg, infer_run)
    assert result.viewer_path == infer_run.path / "03_case_viewer.html" and result.viewer_path.is_file()
    assert result.viewer_cases and result.viewer_cases[0]["modality"] == "CT"
    assert result.viewer_cases[0]["title"] in result.viewer_path.read_text()

    attention_cfg = ct_clip.AttentionConfig.from_params(common)
    attention = ct_clip.attention_maps(attention_cfg, RunFolder.for_stage(attention_cfg))
    assert attention.viewer_path is not None and attention.viewer_path.name == "04_attention_viewer.html"
    assert attention.viewer_path.is_file() and attention.viewer_cases[0]["attention"].ndim == 3

    model = ct_clip.load_trained_model(outcome.checkpoint, device="meta")
    assert {p.device for p in model.parameters()} | {b.device for b in model.buffers()} == {torch.device("meta")}


def test_the_trained_model_computes_on_the_device_it_was_loaded_on(tiny_manifest, tmp_path):
    """The device rule, checkable without a GPU: on "meta" the image path and the projections run with every tensor
    there (a tensor left on the CPU would make torch refuse to mix devices). The text tower cannot run on meta:
    transformers' attention tests its padding mask's values (``.all()``), which meta tensors do not hold."""
    root, manifest = tiny_manifest
    cfg = ct_clip.TrainConfig.from_params({"profile": "smoke", "manifest": str(manifest), "max_steps": 1,
                                           "epochs": 1, "batch_size": 2, "run_dir": str(tmp_path / "r" / "ct_clip")})
    outcome = ct_clip.train(cfg, RunFolder.for_stage(cfg))
    model = ct_clip.load_trained_model(outcome.checkpoint, device="meta")
    image_emb = model.encode_image(torch.zeros(2, 1, *model.spec.input_size, device="meta"))
    text_emb = model.project_text(torch.zeros(3, model.text_encoder.hidden, device="meta"))
    logits = model.logits(image_emb, text_emb)
    assert {t.device.type for t in (image_emb, text_emb, logits)} == {"meta"}
    assert tuple(logits.shape) == (2, 3) and tuple(image_emb.shape) == (2, model.spec.embed_dim)
