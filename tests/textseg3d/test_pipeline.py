"""textseg3d verbs: a new case segmented from an image file and a report string, the 03/04 verbs writing their own
HTML views, and trained models loaded onto a device."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from nbsupport import textseg3d
from nbsupport.checkpoints import SPEC_FILE, WEIGHTS_FILE, save_weights, write_checkpoint
from nbsupport.runs import RunFolder
from nbsupport.textseg3d.config import AttentionConfig, InferConfig, PreprocessConfig
from nbsupport.textseg3d.demo_data import DEMO_SIZES, write_demo_dataset
from nbsupport.textseg3d.inference import predict_volume
from nbsupport.textseg3d.model import LLMSeg, LLMSegSpec, ReportTokens, build_llmseg
from nbsupport.textseg3d.pipeline import load_trained_model, predict_new_case

SMOKE = DEMO_SIZES["smoke"]
REPORT = "N0, cT2, breast conserving surgery, left side"


def _store_checkpoint(run_dir: Path, spec: LLMSegSpec, model: LLMSeg) -> Path:
    """``<run_dir>/checkpoints/best`` and ``model_spec.json`` as 02_train writes them (trainable weights only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SPEC_FILE).write_text(spec.to_json())
    meta = {"config_hash": spec.fingerprint(), "step": 1, "kind": "best"}
    target = run_dir / "checkpoints" / "best"
    write_checkpoint(target, meta, lambda tmp: save_weights(model, tmp / WEIGHTS_FILE, meta, trainable_only=True))
    return target


def _shifted(spec: LLMSegSpec) -> LLMSeg:
    """A network whose trainable weights differ from a fresh build's, as after training."""
    model = build_llmseg(spec)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    return model


def test_a_new_case_is_segmented_from_an_image_file_and_a_report_string(tmp_path: Path) -> None:
    root = write_demo_dataset(tmp_path / "d", layout="nifti", table="csv", **SMOKE)
    image = root / "BC003" / "data.nii.gz"
    run = RunFolder(tmp_path / "runs" / "r" / "textseg3d")
    cfg = InferConfig.from_params({"profile": "smoke", "input_image": str(image),
                                   "input_report": "N0, cT2, breast conserving surgery, left side"})
    model = build_llmseg(LLMSegSpec(feature_size=4, text_encoder="tiny_sentence", roi=SMOKE["shape"]))
    result = predict_new_case(cfg, run, model, torch.device("cpu"))
    written = nib.load(str(result.result_path))
    assert result.result_path.name == "BC003.nii.gz"
    np.testing.assert_array_equal(written.affine, nib.load(str(image)).affine)
    assert written.shape == nib.load(str(image)).shape and set(np.unique(np.asarray(written.dataobj))) <= {0, 1}
    assert (run.path / "figures" / "03_new_case.png").exists()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_trained_model_is_loaded_with_every_tensor_on_the_device(tmp_path: Path, device: str) -> None:
    """The trained weights come back, the frozen text encoder (not in the checkpoint) is rebuilt as it was trained,
    and every parameter and buffer, the encoder's included, is on ``device``."""
    spec = LLMSegSpec(feature_size=4, text_encoder="tiny_sentence", roi=SMOKE["shape"])
    trained = _shifted(spec)
    model = load_trained_model(_store_checkpoint(tmp_path / "run", spec, trained), device)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {device}
    assert next(model.text_encoder.backbone.parameters()).device.type == device and not model.training
    loaded = model.state_dict()
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(loaded[name].cpu(), tensor, rtol=0, atol=0, msg=name)
    prob = predict_volume(model, torch.rand(1, 1, *SMOKE["shape"]), REPORT, spec.roi, device=device)
    assert prob.shape == (2, *SMOKE["shape"])


def test_a_folder_without_its_spec_is_not_a_textseg3d_checkpoint(tmp_path: Path) -> None:
    spec = LLMSegSpec(feature_size=4, use_text=False, roi=SMOKE["shape"])
    checkpoint = _store_checkpoint(tmp_path / "run", spec, build_llmseg(spec))
    (tmp_path / "run" / SPEC_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="not a textseg3d checkpoint"):
        load_trained_model(checkpoint)


def test_the_03_and_04_verbs_write_their_viewers_and_return_the_cases(tmp_path: Path) -> None:
    """predict and attention_maps called from Python write 03_case_viewer.html, 04_attention_viewer.html and the
    bertviz page into the run folder, as the notebooks' runs do, and carry the viewer cases."""
    root = write_demo_dataset(tmp_path / "d", **SMOKE)
    run_dir, manifest = tmp_path / "runs" / "r" / "textseg3d", str(tmp_path / "m.csv")
    common = {"profile": "smoke", "manifest": manifest, "run_dir": str(run_dir)}
    prep = PreprocessConfig.from_params({**common, "data_root": str(root), "n_examples": 1})
    textseg3d.preprocess(prep, RunFolder.for_stage(prep))
    spec = LLMSegSpec(feature_size=4, text_encoder="tiny_sentence", context_length=2, roi=SMOKE["shape"])
    _store_checkpoint(run_dir, spec, _shifted(spec))
    image_only = LLMSegSpec(feature_size=4, use_text=False, roi=SMOKE["shape"])
    _store_checkpoint(run_dir / "image_only", image_only, _shifted(image_only))

    cfg = InferConfig.from_params(common)
    result = textseg3d.predict(cfg, RunFolder.for_stage(cfg))
    assert result.viewer_path == run_dir / "03_case_viewer.html" and result.viewer_path.stat().st_size > 0
    test_cases = list(result.evaluations["true"].cases)
    assert [c["title"] for c in result.viewer_cases] == test_cases and len(test_cases) == 2
    assert set(result.viewer_cases[0]["masks"]) == {"ground truth", "pred (true report)", "pred (flipped report)",
                                                    "pred (empty report)", "pred (image-only UNet)"}
    assert str(result.viewer_cases[0]["title"]) in result.viewer_path.read_text()

    cfg = AttentionConfig.from_params({**common, "scale": 1})
    att = textseg3d.attention_maps(cfg, RunFolder.for_stage(cfg))
    assert att.viewer_path == run_dir / "04_attention_viewer.html" and att.viewer_path.stat().st_size > 0
    assert [c["title"] for c in att.viewer_cases] == ["scale 1/4, prompt token 1", "scale 1/4, prompt token 2"]
    assert att.case == test_cases[0] and (run_dir / "figures" / "04_fusion_attention.png").exists()


def _devices(model: torch.nn.Module) -> dict[str, str]:
    """Every parameter and buffer by name -> the device type it is on."""
    return {name: t.device.type for name, t in [*model.named_parameters(), *model.named_buffers()]}


def _meta_report_tokens(model: LLMSeg, batch: int) -> torch.Tensor | ReportTokens:
    """Text tokens of the shape the sentence encoder gives, on meta: BERT's mask code in transformers reads tensor
    values (``padding_mask.all()``), which meta tensors do not have, so the frozen encoder itself cannot run there."""
    enc = model.text_encoder
    if model.spec.text_readout == "tokens":
        n = model.spec.n_prompts * 12
        return ReportTokens(torch.empty(batch, n, enc.hidden_size, device="meta"),
                            torch.ones(batch, n, dtype=torch.bool, device="meta"))
    return torch.empty(batch, model.spec.n_prompts, enc.hidden_size, device="meta")


def test_the_trained_smoke_run_loads_onto_meta_and_segments_there(smoke_run) -> None:
    """Both trained networks of the smoke run, rebuilt for ``device="meta"``: every parameter and buffer (the frozen
    encoder's too) is there, and a batch of windows sharing one report goes through the UNet and the fusion there:
    a tensor created on the CPU inside the network would stop it (or, on a GPU, stop it with CPU/CUDA mismatch)."""
    for run_dir in (smoke_run.run_dir, smoke_run.run_dir / "image_only"):
        model = load_trained_model(run_dir / "checkpoints" / "best", "meta")
        left_behind = {n: d for n, d in _devices(model).items() if d != "meta"}
        assert not left_behind and _devices(model), left_behind
        text = _meta_report_tokens(model, 1) if model.text_encoder is not None else None
        logits = model.segment(torch.empty(2, 1, *model.spec.roi, device="meta"), text)
        assert logits.device.type == "meta" and logits.shape == (2, 2, *model.spec.roi)


@pytest.mark.parametrize("options", [{"text_encoder": "tiny_sentence", "text_readout": "tokens", "image_pe": "random"},
                                     {"text_encoder": "tiny_causal"}], ids=["tokens_random_pe", "causal"])
def test_every_variant_runs_on_meta(tmp_path: Path, options: dict) -> None:
    """The demo's variant (per-token text with a key padding mask, random Fourier positions) and the causal <SEG>
    readout, loaded for meta; the causal encoder runs there too, from the report string to the logits (with eager
    attention: transformers' SDPA mask code reads the padding mask's values, which meta tensors do not have)."""
    spec = LLMSegSpec(feature_size=4, context_length=2, roi=SMOKE["shape"], **options)
    model = load_trained_model(_store_checkpoint(tmp_path / "run", spec, _shifted(spec)), "meta")
    assert set(_devices(model).values()) == {"meta"}
    if spec.text_encoder == "tiny_causal":
        model.text_encoder.backbone.config._attn_implementation = "eager"
        text = model.encode_reports([REPORT])
    else:
        text = _meta_report_tokens(model, 1)
    logits = model.segment(torch.empty(2, 1, *SMOKE["shape"], device="meta"), text)
    assert logits.device.type == "meta" and logits.shape == (2, 2, *SMOKE["shape"])
