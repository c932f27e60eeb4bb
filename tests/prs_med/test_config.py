"""prs_med stage configs: every profile builds, the spec follows the config, unknown names are refused."""
from __future__ import annotations

import pytest

from nbsupport.config import ConfigError
from nbsupport.prs_med import config


def test_profiles_build_valid_configs() -> None:
    smoke = config.TrainConfig.from_params({"profile": "smoke"})
    demo = config.TrainConfig.from_params({"profile": "demo"})
    full = config.TrainConfig.from_params({"profile": "full"})
    assert smoke.spec().vlm == "tiny" and demo.spec().vlm == "smollm2-135m"
    assert demo.spec().position_head and not smoke.spec().position_head  # lambda_position > 0 adds the head
    assert (full.image_size, full.lora_r, full.decoder_hidden, full.epochs) == (1024, 16, 512, 20)
    assert full.vlm_path.startswith("weights/")  # local paths, never a download
    # PRS-Med's image encoder and decoder in full (model_v7.py:77-82); the CPU profiles keep what they were tuned with
    assert (full.sam_ckpt, full.mask_decoder) == ("weights/tinysam_42.3.pth", "official")
    assert (full.spec().sam_path, full.spec().mask_decoder) == ("weights/tinysam_42.3.pth", "official")
    assert (smoke.sam_ckpt, smoke.mask_decoder, demo.sam_ckpt, demo.mask_decoder) == ("", "simple", "", "simple")
    # issue 23 sped up the demo only: full trains in fp32 on a CPU ('auto') with the official decoder dropout, and
    # its spec JSON (so its fingerprint) does not mention decoder_dropout
    assert (full.mixed_precision, full.decoder_dropout, "decoder_dropout" in full.spec().to_json()) == ("auto", 0.1,
                                                                                                      False)
    assert (demo.mixed_precision, demo.spec().decoder_dropout) == ("bf16_native", 0.0)
    with pytest.raises(ConfigError, match="unknown parameter 'lora_rank'"):
        config.TrainConfig.from_params({"profile": "smoke", "lora_rank": 8})


def test_every_stage_reads_the_demo_manifest_by_default_and_takes_the_unified_names() -> None:
    for stage in (config.PreprocessConfig, config.TrainConfig, config.InferConfig, config.AttentionConfig):
        cfg = stage.from_params({"profile": "smoke", "manifest": ""})
        assert cfg.manifest == "data_manifests/prs_med_demo.csv" and cfg.SYSTEM == "prs_med", stage
    cfg = config.TrainConfig.from_params({"profile": "smoke", "grad_accum": 2, "resume": True, "num_processes": 2})
    settings = cfg.train_settings()
    assert (settings.grad_accum, settings.resume, settings.num_processes, settings.epochs) == (2, True, 2, 2)
    with pytest.raises(ConfigError, match="did you mean 'grad_accum'"):
        config.TrainConfig.from_params({"grad_acum": 2})


def test_the_renamed_sam_path_names_its_new_name() -> None:
    """``sam_path`` became PRS-Med's ``sam_ckpt``; the generic hint would offer ``sam_patch``."""
    with pytest.raises(ConfigError, match="parameter 'sam_path' is now 'sam_ckpt'"):
        config.TrainConfig.from_params({"profile": "smoke", "sam_path": "weights/sam-vit-base"})
    with pytest.raises(ConfigError, match="parameter 'vlm' is now 'vlm_path'"):
        config.TrainConfig.from_params({"profile": "smoke", "vlm": "weights/llava-med-v1.5-mistral-7b"})
    with pytest.raises(ConfigError, match="mask_decoder"):
        config.TrainConfig.from_params({"profile": "smoke", "mask_decoder": "unet"})
