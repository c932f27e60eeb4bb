"""What the training loop gets from prs_med: the modality-loss schedule across a resume, the position loss, and the
image-only baseline's task, each rebuilt from the config, the manifest and the spec's JSON as in a training process."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from nbsupport.manifest import write_manifest
from nbsupport.prs_med import config, data, demo_data, pipeline
from nbsupport.prs_med.task import ImageOnlyTrainingTask, PRSMedTrainingTask


def _task_kwargs(tmp_path: Path, **params: object) -> dict[str, object]:
    """What launch_training passes each process: a one-task demo's manifest, the smoke config, the spec's JSON."""
    root = demo_data.write_demo_dataset(tmp_path / "d", n_train=4, n_val=0, n_test=0, image_size=32,
                                        tasks=("polyp_endoscopy",))
    manifest, _ = data.build_manifest(root)
    write_manifest(manifest, tmp_path / "m.csv", data.PRSMED_SCHEMA, root)
    cfg = config.TrainConfig.from_params({"profile": "smoke", "image_size": 32, "vision_size": 32,
                                          "lora_dropout": 0.0, **params})
    return {"config": cfg.to_dict(), "manifest": str(tmp_path / "m.csv"), "data_root": str(root),
            "spec_json": cfg.spec().to_json()}


def test_modality_loss_schedule_survives_a_resume(tmp_path: Path) -> None:
    """The early modality loss is keyed on the batches the network was trained on, which a resumed run restores from
    the checkpoint: after a resume past ``cls_epochs`` the loss stays off (a fresh counter would turn it back on)."""
    from nbsupport.checkpoints import load_weights
    from nbsupport.train import fit

    kwargs = _task_kwargs(tmp_path, batch_size=2, cls_epochs=1)
    task = PRSMedTrainingTask(**kwargs)
    assert task.cls_steps == 2
    settings = pipeline.loop_settings(task.cfg, task.manifest)
    fit(task, dataclasses.replace(settings, max_steps=2), tmp_path / "run")
    resumed = PRSMedTrainingTask(**kwargs)  # a new process: nothing carried over but the checkpoint
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
    task = PRSMedTrainingTask(**_task_kwargs(tmp_path, lambda_position=2.0, image_tokens_at="before_answer",
                                             answer_loss_to_vision=False))
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


def test_image_only_task_builds_the_baseline_of_the_spec_it_is_given(tmp_path: Path) -> None:
    """The baseline's task takes the spec from its JSON (not from the config) and the prompt width from the caller;
    its step is the structure loss of the question-free decoder."""
    kwargs = _task_kwargs(tmp_path)
    task = ImageOnlyTrainingTask(**kwargs, prompt_dim=12)
    assert task.spec.to_json() == kwargs["spec_json"] and task.spec.fingerprint() == task.cfg.spec().fingerprint()
    model = task.build_model().eval()
    assert model.prompt.shape == (1, 1, 12)
    batch = data.collate_qa([task.train_dataset()[i] for i in range(2)])
    loss = task.training_step(model, batch)
    assert loss.ndim == 0 and 0 < float(loss) < 5
    assert set(task.evaluate(model, [batch], torch.device("cpu"))) == {"loss", "dice"}


# the options of the CPU profiles on the tiny VLM: smoke as it is; demo's tower, projector, token placement and
# position loss; the official decoder of full
VARIANTS = {"smoke": {},
            "demo": {"vision_stem": "conv", "projector": "spatial", "image_tokens_at": "before_answer",
                     "lambda_position": 2.0, "answer_loss_to_vision": False, "position_weight": 5.0},
            "official_decoder": {"mask_decoder": "official"}}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_trainable_tensor_gets_a_gradient_in_every_step(tmp_path: Path, variant: str) -> None:
    """DDP with find_unused_parameters=False (the shared loop's, num_processes > 1) stops at the second step if a
    trainable tensor gets no gradient: in one training step each one gets one, during the modality-loss epochs and
    after them (the classifier then stays in the graph with weight 0), and so does the image-only baseline's."""
    task = PRSMedTrainingTask(**_task_kwargs(tmp_path, batch_size=2, cls_epochs=1, **VARIANTS[variant]))
    batch = data.collate_qa([task.train_dataset()[i] for i in range(2)])
    model = task.build_model().train()
    for trained_batches in (0, task.cls_steps):
        model.zero_grad(set_to_none=True)
        model.trained_batches.fill_(trained_batches)
        task.training_step(model, batch).backward()
        without = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert without == [], (trained_batches, without)
    frozen_tower = [n for n, p in model.llava.model.vision_tower.named_parameters() if not p.requires_grad]
    assert frozen_tower == ["post_layernorm.weight", "post_layernorm.bias"]  # CLIP's pooled output, unread by LLaVA

    baseline_task = ImageOnlyTrainingTask(**_task_kwargs(tmp_path / "b", **VARIANTS[variant]), prompt_dim=8)
    baseline = baseline_task.build_model().train()
    baseline_task.training_step(baseline, batch).backward()
    assert [n for n, p in baseline.named_parameters() if p.requires_grad and p.grad is None] == []


def test_a_vision_tower_no_loss_reaches_is_refused(tmp_path: Path) -> None:
    """``answer_loss_to_vision=False`` without the position loss would leave the assembled VLM's random tower and
    projector untrained (and gradient-less, which DDP refuses): an error naming both settings."""
    with pytest.raises(ValueError, match=r"answer_loss_to_vision=False needs the position loss \(lambda_position"):
        PRSMedTrainingTask(**_task_kwargs(tmp_path, answer_loss_to_vision=False)).build_model()
