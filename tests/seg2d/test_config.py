"""seg2d stage configs on the shared bases: seed defaults, the demo manifest, split checks, warm-up length."""
from __future__ import annotations

import pytest

from nbsupport.config import ConfigError
from nbsupport.seg2d.config import DEFAULT_MANIFEST, InferConfig, PreprocessConfig, TrainConfig


def test_seed_defaults_profiles_and_the_demo_manifest() -> None:
    full = TrainConfig()
    assert (full.epochs, full.lr, full.weight_decay, full.scheduler) == (6, 2e-4, 1e-4, "multistep")  # seed's
    smoke = TrainConfig.from_params({"profile": "smoke", "manifest": None, "grad_accum": 2})
    assert (smoke.width, smoke.image_size, smoke.grad_accum, smoke.manifest) == ("tiny", 96, 2, DEFAULT_MANIFEST)
    assert InferConfig.from_params({"manifest": ""}).manifest == DEFAULT_MANIFEST
    assert str(PreprocessConfig().source_root()).endswith("seg2d")
    with pytest.raises(ConfigError, match=r"^seg2d/01_preprocess: .*val_fraction=0.7, test_fraction=0.4"):
        PreprocessConfig.from_params({"val_fraction": 0.7, "test_fraction": 0.4})


def test_warmup_is_one_epoch_at_most_100_steps_and_only_for_warmup_cosine() -> None:
    cfg = TrainConfig.from_params({"profile": "smoke"})  # warmup_cosine, batch 8
    assert (cfg.warmup_steps(64), cfg.warmup_steps(4), cfg.warmup_steps(8000)) == (8, 1, 100)
    assert TrainConfig.from_params({"scheduler": "multistep"}).warmup_steps(64) == 0
