"""ct_clip stage configs: every profile builds, bad parameters are named with the values given."""
from __future__ import annotations

import pytest

from nbsupport import ct_clip
from nbsupport.config import PROFILES, ConfigError


@pytest.mark.parametrize("profile", PROFILES)
def test_every_stage_config_builds_for_every_profile(profile):
    for cls in (ct_clip.PreprocessConfig, ct_clip.TrainConfig, ct_clip.InferConfig, ct_clip.AttentionConfig):
        cfg = cls.from_params({"profile": profile})
        assert cfg.profile == profile
    full = ct_clip.PreprocessConfig.from_params({"profile": "full"})
    assert full.spacing == (1.25, 1.25, 2.0) and full.shape == (256, 256, 192)  # CT-Data's
    assert ct_clip.TrainConfig.from_params({"profile": "full"}).loss == "siglip"  # the seed's loss


def test_bad_parameters_are_named():
    with pytest.raises(ConfigError, match="loss"):
        ct_clip.TrainConfig.from_params({"loss": "triplet"})
    with pytest.raises(ConfigError, match="label must be one of"):
        ct_clip.AttentionConfig.from_params({"label": "Pneumothorax"})
    with pytest.raises(ConfigError, match="hu_max"):
        ct_clip.PreprocessConfig.from_params({"hu_min": 100.0, "hu_max": 0.0})


def test_config_shares_the_manifest_default_and_the_split_check():
    for cls in (ct_clip.PreprocessConfig, ct_clip.TrainConfig, ct_clip.InferConfig, ct_clip.AttentionConfig):
        assert cls.from_params({"manifest": None}).manifest == "data_manifests/ct_rate_demo.csv"
    with pytest.raises(ConfigError, match=r"val_fraction=1.5"):
        ct_clip.PreprocessConfig.from_params({"val_fraction": 1.5})
    train = ct_clip.TrainConfig.from_params({"profile": "smoke", "grad_accum": 2, "resume": True})
    settings = train.train_settings(monitor="train_loss")
    assert (settings.grad_accum, settings.resume, settings.epochs, settings.warmup_steps) == (2, True, 3, 0)


def test_full_uses_every_visible_gpu_with_the_seeds_10_volumes_each():
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    full = ct_clip.TrainConfig.from_params({"profile": "full"})
    assert full.num_processes == max(gpus, 1) and full.batch_size == 10 * full.num_processes  # not a fixed 6 x 10
    two = ct_clip.TrainConfig.from_params({"profile": "full", "num_processes": 2})
    assert (two.num_processes, two.batch_size) == (2, 20)
    assert ct_clip.TrainConfig.from_params({"profile": "full", "batch_size": 12}).batch_size == 12
    spec = full.model_spec()  # the seed's parts (CT-Data training/main.py:189-239)
    assert (spec.image_arch, spec.image_blocks, spec.text_pooling, spec.max_text_length, spec.embed_dim) == \
        ("i3resnet", (3, 8, 36, 3), "latent_attention", 512, 1280)
    assert spec.text_encoder.endswith("LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned")
    assert spec.text_encoder_weights.endswith("pytorch_model.bin") and spec.image_weights.endswith("epoch_99.pt")
    for profile in ("smoke", "demo"):  # CPU profiles keep MiniLM / the tiny BERT and the small CNN
        small = ct_clip.TrainConfig.from_params({"profile": profile}).model_spec()
        assert small.image_arch == "resnet" and not small.text_encoder_weights and not small.image_weights
