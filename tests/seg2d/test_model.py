"""seg2d model factory: the four HF families, logits at input size, multi-label loss, spec round trip."""
from __future__ import annotations

import pytest
import torch

from nbsupport.seg2d.model import (ARCHITECTURES, BCEDiceLoss, Seg2DModelSpec, build_seg2d_model, model_from_spec,
                                   save_hf_model)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_family_predicts_at_input_size_and_rebuilds_from_spec(arch: str) -> None:
    torch.manual_seed(0)
    model = build_seg2d_model(arch, num_labels=3, image_size=64, width="tiny").eval()
    x = torch.rand(2, 1, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 3, 64, 64)
    # The spec alone rebuilds the same network: loading its weights reproduces the logits.
    spec = Seg2DModelSpec.from_json(model.spec.to_json())
    clone = model_from_spec(spec).eval()
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone(x), logits)
    assert spec.fingerprint() == model.spec.fingerprint()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_family_runs_on_the_meta_device(arch: str) -> None:
    """Every parameter, buffer and tensor made in forward follows the model: on meta, one left on the CPU fails."""
    model = build_seg2d_model(arch, num_labels=3, image_size=64, width="tiny").to("meta").eval()
    with torch.no_grad():
        logits = model(torch.zeros(2, 1, 64, 64, device="meta"))
    assert logits.device.type == "meta" and tuple(logits.shape) == (2, 3, 64, 64)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_family_saved_for_hf_loads_with_auto_model_and_gives_the_same_logits(arch: str, tmp_path) -> None:
    """What 02_train exports: ``AutoModelForSemanticSegmentation.from_pretrained`` of the saved folder computes the
    network's own logits, and names the classes."""
    from transformers import AutoModelForSemanticSegmentation

    torch.manual_seed(0)
    model = build_seg2d_model(arch, num_labels=3, image_size=64, width="tiny").eval()
    save_hf_model(model, tmp_path, ("large_bowel", "small_bowel", "stomach"))
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model.hf) and loaded.config.id2label[2] == "stomach"
    pixel_values = model.prepare(torch.rand(2, 1, 64, 64))
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixel_values).logits, model.hf(pixel_values=pixel_values).logits,
                                   rtol=0, atol=1e-6)


def test_fingerprint_changes_with_the_label_set() -> None:
    a = build_seg2d_model("segformer", 3, 64, width="tiny").spec
    b = build_seg2d_model("segformer", 2, 64, width="tiny").spec
    assert a.fingerprint() != b.fingerprint()


def test_pretrained_checkpoint_from_a_local_folder(tmp_path) -> None:
    """A 3-channel checkpoint saved with save_pretrained loads by path; grayscale is repeated to 3 channels."""
    import transformers as tf

    config = tf.SegformerConfig(num_channels=3, hidden_sizes=[8, 16, 32, 64], decoder_hidden_size=32,
                                depths=[1, 1, 1, 1], num_labels=150)
    tf.SegformerForSemanticSegmentation(config).save_pretrained(tmp_path / "mit-tiny")
    model = build_seg2d_model("segformer", 3, 64, model_name_or_path=str(tmp_path / "mit-tiny"))
    assert model.spec.in_channels == 3 and model.spec.source.endswith("mit-tiny")
    assert model(torch.rand(1, 1, 64, 64)).shape == (1, 3, 64, 64)  # new 3-class head, logits at input size


def test_missing_hub_checkpoint_says_how_to_get_it() -> None:
    from nbsupport.models import ModelNotAvailableError

    with pytest.raises(ModelNotAvailableError, match="download"):
        build_seg2d_model("upernet", 3, 64, model_name_or_path="openmmlab/upernet-convnext-nonexistent")


def test_loss_is_multilabel_and_lower_for_the_truth() -> None:
    target = torch.zeros(2, 3, 16, 16)
    target[:, 0, 2:10, 2:10] = 1
    target[:, 2, 5:12, 5:12] = 1  # overlaps class 0: a softmax loss could not fit both
    loss = BCEDiceLoss()
    perfect = loss(target * 20 - 10, target)
    wrong = loss(torch.zeros_like(target), target)
    assert perfect < 0.05 < wrong
