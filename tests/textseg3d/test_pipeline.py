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
from nbsupport.textseg3d.model import LLMSeg, LLMSegSpec, build_llmseg
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
    assert result.viewer_html == run_dir / "03_case_viewer.html" and result.viewer_html.stat().st_size > 0
    test_cases = list(result.evaluations["true"].cases)
    assert [c["title"] for c in result.viewer_cases] == test_cases and len(test_cases) == 2
    assert set(result.viewer_cases[0]["masks"]) == {"ground truth", "pred (true report)", "pred (flipped report)",
                                                    "pred (empty report)", "pred (image-only UNet)"}
    assert str(result.viewer_cases[0]["title"]) in result.viewer_html.read_text()

    cfg = AttentionConfig.from_params({**common, "scale": 1})
    att = textseg3d.attention_maps(cfg, RunFolder.for_stage(cfg))
    assert att.viewer_html == run_dir / "04_attention_viewer.html" and att.viewer_html.stat().st_size > 0
    assert [c["title"] for c in att.viewer_cases] == ["scale 1/4, prompt token 1", "scale 1/4, prompt token 2"]
    assert att.case == test_cases[0] and (run_dir / "figures" / "04_fusion_attention.png").exists()
