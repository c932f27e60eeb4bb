"""ct_clip training task: the distributed launch choice (DDP vs DeepSpeed ZeRO-1), sentence sampling, the LoRA text
tower and its checkpoint, and the validation metric that picks the best checkpoint."""
from __future__ import annotations

import pytest
import torch
import yaml

from nbsupport import ct_clip
from nbsupport.checkpoints import WEIGHTS_FILE, save_weights, write_checkpoint
from nbsupport.config import ConfigError
from nbsupport.ct_clip.model import contrastive_loss, split_sentences
from nbsupport.ct_clip.task import ACCELERATE_ZERO1, CTClipTrainingTask, checkpoint_monitor, distributed_config
from nbsupport.launch import launch_command


def test_deepspeed_zero1_on_cuda_ddp_otherwise():
    assert distributed_config(2, cuda=True) == ACCELERATE_ZERO1
    assert distributed_config(2, cuda=False) is None and distributed_config(1, cuda=True) is None
    settings = yaml.safe_load(ACCELERATE_ZERO1.read_text())
    assert settings["distributed_type"] == "DEEPSPEED" and settings["deepspeed_config"]["zero_stage"] == 1
    command = launch_command(2, ["--out", "x"], accelerate_config=ACCELERATE_ZERO1)
    assert command[command.index("--config_file") + 1] == str(ACCELERATE_ZERO1) and "--multi_gpu" not in command
    assert "--multi_gpu" in launch_command(2, ["--out", "x"])  # the default launch is unchanged


def test_sentence_sampling_trains_on_report_subsets_and_evaluates_whole_reports(tiny_manifest):
    root, manifest = tiny_manifest
    cfg = ct_clip.TrainConfig.from_params({"profile": "smoke", "manifest": str(manifest), "sentence_keep": 0.4,
                                          "text_tuning": "frozen"})
    task = CTClipTrainingTask(cfg.to_dict(), str(manifest), str(root), cfg.model_spec().to_json())
    model = task.build_model()
    train = task.manifest[task.manifest.split == "train"].reset_index(drop=True)
    sentences = split_sentences(train.report[0])
    assert len(sentences) >= 8 and len(task._sentence_cache[0]) == len(sentences)
    whole = task._text_cache["train"][0]
    assert torch.allclose(task._sentence_cache[0].mean(0), whole, atol=1e-5)  # sentence_mean of all = the report
    index = torch.tensor([0])
    model.eval()
    assert torch.equal(task._text(model, "train", index)[0], whole)  # evaluation reads whole reports
    model.train()
    sampled = torch.stack([task._text(model, "train", index)[0] for _ in range(20)])
    assert not torch.allclose(sampled, whole.expand_as(sampled), atol=1e-4)  # training reads subsets
    with pytest.raises(ConfigError, match="sentence_keep"):
        ct_clip.TrainConfig.from_params({"sentence_keep": 0.0})


def test_lora_text_tower_trains_and_its_checkpoint_reloads(tiny_manifest, tmp_path):
    """The demo's trained text tower: the loss reaches the LoRA weights, a step changes the prompt embeddings, and
    the trainable-only checkpoint rebuilds the same text tower (CT-CLIP trains its text encoder)."""
    root, manifest = tiny_manifest
    cfg = ct_clip.TrainConfig.from_params({"profile": "smoke", "manifest": str(manifest)})
    assert cfg.text_tuning == "lora" and ct_clip.TrainConfig.from_params({"profile": "demo"}).text_tuning == "lora"
    spec = cfg.model_spec()
    task = CTClipTrainingTask(cfg.to_dict(), str(manifest), str(root), spec.to_json())
    model = task.build_model().train()
    assert not task._text_cache  # nothing the LoRA weights change is cached
    prompts = ["Pleural effusion is present.", "Pleural effusion is not present."]
    with torch.no_grad():
        before = model.eval().encode_text(prompts)
    dataset = task.train_dataset()
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    optimizer = torch.optim.AdamW(task.trainable_parameters(model), lr=1e-2)
    model.train()
    task.training_step(model, batch).backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and any(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    optimizer.step()
    with torch.no_grad():
        after = model.eval().encode_text(prompts)
    assert not torch.allclose(before, after, atol=1e-4)
    checkpoint = tmp_path / "run" / "checkpoints" / "best"  # as the trainer writes it (trainable tensors only)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model_spec.json").write_text(spec.to_json())
    meta = {"config_hash": spec.fingerprint(), "step": 1}
    write_checkpoint(checkpoint, meta, lambda folder: save_weights(model, folder / WEIGHTS_FILE, meta, True))
    reloaded = ct_clip.load_trained_model(checkpoint)
    with torch.no_grad():
        assert torch.allclose(reloaded.encode_text(prompts), after, atol=1e-5)


def test_best_checkpoint_is_picked_by_a_metric_the_validation_pass_reports(tiny_manifest):
    root, manifest = tiny_manifest
    cfg = ct_clip.TrainConfig.from_params({"profile": "smoke", "manifest": str(manifest)})
    assert cfg.select_checkpoint_by == "mean_rank"  # R@5 of a small validation split saturates at 1.0 early
    task = CTClipTrainingTask(cfg.to_dict(), str(manifest), str(root), cfg.model_spec().to_json())
    model = task.build_model().eval()
    loader = torch.utils.data.DataLoader(task.val_dataset(), batch_size=2)
    metrics = task.evaluate(model, loader, torch.device("cpu"))
    for choice in ("r5", "mean_rank"):
        assert checkpoint_monitor(choice).removeprefix("val_") in metrics
    assert metrics["mean_rank_report_to_volume"] >= 1
    with pytest.raises(ConfigError, match="select_checkpoint_by"):
        ct_clip.TrainConfig.from_params({"select_checkpoint_by": "r10"})


def test_bf16_autocasts_the_demo_step_and_leaves_the_float32_step_as_it_was(tiny_manifest):
    """``mixed_precision`` bf16 (``bf16_native`` on a CPU with bf16) runs both towers under bf16 autocast with
    float32 weights and loss, close to the float32 step; with ``no`` (and ``auto`` on a CPU, as every profile has) the
    step is the plain float32 computation, bit for bit, with no autocast context of its own (which would switch off
    accelerate's on CUDA)."""
    root, manifest = tiny_manifest
    for profile in ("demo", "full"):
        assert ct_clip.TrainConfig.from_params({"profile": profile}).mixed_precision == "auto"
    losses = {}
    for bf16 in (False, True):
        cfg = ct_clip.TrainConfig.from_params({"profile": "smoke", "manifest": str(manifest),
                                               "mixed_precision": "bf16" if bf16 else "no"})
        task = CTClipTrainingTask(cfg.to_dict(), str(manifest), str(root), cfg.model_spec().to_json())
        model = task.build_model().eval()  # no dropout: the same model function both times
        dataset = task.train_dataset()
        batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
        losses[bf16] = task.training_step(model, batch)
        if not bf16:
            image_emb, text_emb = model(batch["image"], model.text_encoder(list(task.split("train").report)))
            assert torch.equal(losses[False], contrastive_loss(model, image_emb, text_emb))
    assert losses[True].dtype == torch.float32
    assert losses[True].item() != losses[False].item()
    assert losses[True].item() == pytest.approx(losses[False].item(), rel=0.05)


def test_validation_ranks_in_float32_under_the_loops_bf16_autocast(tiny_manifest):
    """The shared loop evaluates inside its autocast; the similarity matrix must still be float32 (a bf16 one ties
    ranks and cannot become numpy), so validation gives the same numbers inside and outside that context."""
    root, manifest = tiny_manifest
    cfg = ct_clip.TrainConfig.from_params({"profile": "smoke", "manifest": str(manifest), "mixed_precision": "bf16"})
    task = CTClipTrainingTask(cfg.to_dict(), str(manifest), str(root), cfg.model_spec().to_json())
    model = task.build_model().eval()
    loader = torch.utils.data.DataLoader(task.val_dataset(), batch_size=4)
    plain = task.evaluate(model, loader, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert task.evaluate(model, loader, torch.device("cpu")) == plain
