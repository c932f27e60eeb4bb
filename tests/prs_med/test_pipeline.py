"""The four prs_med verbs called from Python, as a notebook would: what each writes into the run folder, including
the offline views the run index links (03_case_viewer.html, 04_attention_viewer.html), and the trained model
loaded back with the one signature every system has."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from nbsupport.prs_med import config, demo_data, pipeline
from nbsupport.prs_med.model import PRSMedNet, PRSMedSpec
from nbsupport.runs import RunFolder
from on_meta import forward_parts_on_meta, tensors_off


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


@pytest.mark.slow
def test_export_loads_as_its_card_says_into_the_trained_network(smoke_run: Any) -> None:
    """``<run>/export``, loaded as its model card says (the network tensors into ``PRSMedNet(spec)``, the adapter
    with ``PeftModel.from_pretrained`` on the VLM without LoRA), is the network ``load_trained_model`` gives, every
    tensor equal; the LoRA tensors are in the adapter only."""
    import safetensors.torch
    import torch
    from peft import PeftModel

    from nbsupport.prs_med.model import PRSMedNet, PRSMedSpec

    export = smoke_run.run.path / "export"
    network = safetensors.torch.load_file(str(export / "network" / "model.safetensors"))
    assert network and not [k for k in network if ".lora_" in k]
    spec = PRSMedSpec.from_json(json.dumps(json.loads((export / "network" / "config.json").read_text())["model_spec"]))
    model = PRSMedNet(spec)
    model.load_state_dict(network, strict=False)
    model.vlm = PeftModel.from_pretrained(model.vlm.unload(), export / "adapter")
    trained = pipeline.load_trained_model(smoke_run.outcome.checkpoint).state_dict()
    ours = model.state_dict()
    assert ours.keys() == trained.keys()
    assert [k for k in trained if not torch.equal(ours[k], trained[k])] == []
    lora = [k for k in trained if ".lora_B." in k]
    assert lora and any(trained[k].abs().max() > 0 for k in lora)  # trained: the adapter is not the zero init


def test_02_train_on_a_tinysam_checkpoint_with_the_official_decoder(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """The smoke profile with ``sam_ckpt`` = a tinysam_42.3.pth-layout file and ``mask_decoder='official'`` trains,
    evaluates and trains the image-only baseline; every load of the file prints the one line, nothing missing or
    unexpected."""
    from prs_med_layouts import TINY_VIT, write_tinysam_checkpoint

    from nbsupport.prs_med.tinysam import TinyViT

    root = demo_data.write_demo_dataset(tmp_path / "data", n_train=2, n_val=1, n_test=2, image_size=32,
                                        tasks=("polyp_endoscopy",))
    ckpt = tmp_path / "weights" / "tinysam_42.3.pth"
    n = write_tinysam_checkpoint(ckpt)
    common = {"profile": "smoke", "manifest": str(tmp_path / "m.csv"), "run_dir": str(tmp_path / "run" / "prs_med")}
    preprocess = config.PreprocessConfig.from_params({**common, "data_root": str(root), "n_examples": 1})
    run = RunFolder.for_stage(preprocess)
    pipeline.preprocess(preprocess, run)
    train = config.TrainConfig.from_params({**common, "image_size": 32, "vision_size": 32, "max_steps": 2,
                                            "batch_size": 2, "max_new_tokens": 3, "sam_ckpt": str(ckpt),
                                            "mask_decoder": "official"})
    capsys.readouterr()
    pipeline.train(train, run)
    loads = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"{ckpt}:")]
    assert loads and set(loads) == {f"{ckpt}: loaded {n} of {n} tensors (0 missing, 0 unexpected)"}
    spec = json.loads((run.path / "model_spec.json").read_text())
    assert (spec["sam_path"], spec["mask_decoder"]) == (str(ckpt), "official")
    metrics = json.loads((run.path / "metrics.json").read_text())["02_train"]
    assert metrics["parameters"]["sam_image_encoder"] == sum(p.numel() for p in TinyViT(TINY_VIT).parameters())
    assert metrics["steps"] == 2 and "test_baseline_image_only_dice" in metrics


# ============================================================================================ the device rule on meta
@pytest.mark.slow
def test_the_trained_network_and_its_baseline_load_and_run_on_meta(smoke_run: Any) -> None:
    """The device rule, checkable without a GPU: the smoke run's network rebuilt for ``device="meta"`` has every
    parameter and buffer there, and so does its image-only baseline; every part of the forward runs there with meta
    inputs (a tensor made on the CPU would make torch refuse to mix devices), giving the shapes it gives on a
    device with values."""
    checkpoint = smoke_run.outcome.checkpoint
    model = pipeline.load_trained_model(checkpoint, device="meta")
    assert tensors_off(model, "meta") == {} and not model.training
    out = forward_parts_on_meta(model, ["Where is the polyp?", "Which part?"], ["It is in the top left.", "center"])
    assert {t.device.type for t in out.values()} == {"meta"}
    assert out["mask_logits"].shape == (2, 1, model.spec.image_size, model.spec.image_size)
    assert out["answer_logits"].shape[-1] == len(model.tokenizer) and out["modality"].shape == (2, 6)

    baseline = pipeline.baseline_of(checkpoint, model).to("meta")  # as evaluate_split moves it
    assert tensors_off(baseline, "meta") == {}
    size = model.spec.image_size
    assert baseline(torch.empty(3, 3, size, size, device="meta")).shape == (3, 1, size, size)


@pytest.mark.parametrize("options", [{"vision_stem": "conv", "projector": "spatial", "position_head": True,
                                      "image_tokens_at": "before_answer", "answer_loss_to_vision": False},
                                     {"mask_decoder": "official", "decoder_hidden": 32}])
def test_every_variant_runs_on_meta(options: dict[str, Any]) -> None:
    """The demo's parts (conv stem, whole-grid projector, position head on the detached image tokens, image tokens
    before the answer) and the official decoder, moved to meta as ``load_trained_model`` moves a network: nothing
    stays behind, and the forward's parts run there."""
    spec = PRSMedSpec(**{"image_size": 32, "sam_hidden": 16, "sam_layers": 1, "sam_heads": 2, "sam_patch": 4,
                         "sam_out_channels": 16, "vlm": "tiny", "vision_size": 32, "vision_patch": 16,
                         "vision_hidden": 16, "vision_layers": 1, "decoder_hidden": 16, **options})
    model = PRSMedNet(spec).to("meta").eval()
    assert tensors_off(model, "meta") == {}
    out = forward_parts_on_meta(model, ["Where?"], ["bottom right"])
    assert {t.device.type for t in out.values()} == {"meta"} and out["mask_logits"].shape == (1, 1, 32, 32)
    if spec.position_head:
        assert out["position"].shape == (1, model.n_image_tokens, 5)
