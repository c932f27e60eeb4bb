"""seg2d stage configs on the shared bases: seed defaults, the demo manifest, split checks, warm-up length."""
from __future__ import annotations

import pytest

from nbsupport.config import ConfigError
from nbsupport.seg2d.config import InferConfig, PreprocessConfig, TrainConfig


def test_seed_defaults_profiles_and_the_demo_manifest() -> None:
    full = TrainConfig()
    assert (full.epochs, full.lr, full.weight_decay, full.scheduler) == (6, 2e-4, 1e-4, "multistep")  # seed's
    smoke = TrainConfig.from_params({"profile": "smoke", "manifest": None, "grad_accum": 2})
    assert (smoke.width, smoke.image_size, smoke.grad_accum, smoke.manifest) == ("tiny", 96, 2, PreprocessConfig.DEFAULT_MANIFEST)
    assert InferConfig.from_params({"manifest": ""}).manifest == PreprocessConfig.DEFAULT_MANIFEST
    assert str(PreprocessConfig().source_root()).endswith("seg2d")
    with pytest.raises(ConfigError, match=r"^seg2d/01_preprocess: .*val_fraction=0.7, test_fraction=0.4"):
        PreprocessConfig.from_params({"val_fraction": 0.7, "test_fraction": 0.4})


def test_warmup_is_one_epoch_at_most_100_steps_and_only_for_warmup_cosine() -> None:
    cfg = TrainConfig.from_params({"profile": "smoke"})  # warmup_cosine, batch 8
    assert (cfg.warmup_steps(64), cfg.warmup_steps(4), cfg.warmup_steps(8000)) == (8, 1, 100)
    assert TrainConfig.from_params({"scheduler": "multistep"}).warmup_steps(64) == 0


def test_full_is_the_seeds_recipe_and_demo_smoke_keep_theirs() -> None:
    from nbsupport.optim import lr_factor

    full = TrainConfig.from_params({"profile": "full"})
    settings = full.train_settings()
    assert (full.arch, full.model_name_or_path) == ("upernet", "openmmlab/upernet-convnext-small")
    assert (full.image_size, full.epochs, full.batch_size, full.lr, full.weight_decay) == (288, 100, 32, 2e-4, 1e-4)
    assert (settings.optimizer, settings.amsgrad, settings.scheduler, settings.gamma) == ("adamw", True, "multistep", 0.1)
    assert settings.grad_clip is None and settings.mixed_precision == "no" and full.augment
    # MultiStepLR(milestones=[max_epochs // 2]) stepped per epoch: with 962 steps per epoch the lr drops after
    # epoch 50 exactly
    total = 100 * 962
    assert lr_factor(settings, total, 50 * 962 - 1) == 1.0 and lr_factor(settings, total, 50 * 962) == 0.1
    assert lr_factor(settings, total, total - 1) == pytest.approx(0.1)
    for profile in ("demo", "smoke"):
        kept = TrainConfig.from_params({"profile": profile})
        assert not kept.augment and kept.train_settings().grad_clip == 1.0
        # demo: bf16 autocast where the CPU computes bf16 natively (half the step's CPU time, same test Dice)
        assert (kept.scheduler, kept.amsgrad, kept.mixed_precision) == (
            "warmup_cosine", False, "bf16_native" if profile == "demo" else "auto")
