"""textseg3d stage configs: the profiles, and the checks that name the value given."""
from __future__ import annotations

import pytest

from nbsupport.config import ConfigError
from nbsupport.textseg3d.config import AttentionConfig, InferConfig, PreprocessConfig, TrainConfig


def test_the_profiles_build_valid_configs() -> None:
    for profile in ("smoke", "demo", "full"):
        cfg = TrainConfig.from_params({"profile": profile})
        assert all(r % 32 == 0 for r in cfg.roi)
    assert TrainConfig.from_params({"profile": "full"}).roi == (64, 352, 352)
    with pytest.raises(ValueError, match="divisible by 32"):
        TrainConfig.from_params({"profile": "smoke", "roi": [32, 40, 64]})


def test_split_fractions_are_checked_with_the_values_given_and_the_demo_manifest_is_the_default() -> None:
    with pytest.raises(ConfigError, match=r"val_fraction=0.6, test_fraction=0.5"):
        PreprocessConfig.from_params({"val_fraction": 0.6, "test_fraction": 0.5})
    for cls in (PreprocessConfig, TrainConfig, InferConfig, AttentionConfig):
        assert cls.from_params({"manifest": None}).manifest == PreprocessConfig.DEFAULT_MANIFEST
        assert cls.from_params({"manifest": "/data/rt.csv"}).manifest == "/data/rt.csv"


def test_train_settings_keep_the_seeds_optimisation_and_accept_the_unified_parameters() -> None:
    cfg = TrainConfig.from_params({"profile": "smoke", "grad_accum": 2, "resume": True, "num_processes": 2})
    settings = cfg.train_settings(scheduler="warmup_cosine")
    assert (settings.grad_accum, settings.resume, settings.num_processes) == (2, True, 2)
    assert (settings.lr, settings.weight_decay, settings.grad_clip, settings.batch_size) == (3e-3, 1e-5, None, 2)
    full = TrainConfig.from_params({"profile": "full"})
    assert (full.epochs, full.batch_size, full.lr, full.weight_decay, full.warmup_epochs) == (101, 2, 1e-4, 1e-5, 10)
    with pytest.raises(ConfigError, match=r"did you mean 'grad_accum'"):
        TrainConfig.from_params({"grad_acum": 2})
