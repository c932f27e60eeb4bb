"""Merlin's I3ResNet: Merlin's strides and axis order, its published checkpoint loaded tensor for tensor through the
path a download takes, and the full ResNet-152 size on the meta device."""
from __future__ import annotations

import pytest
import torch

from nbsupport.ct_clip.i3resnet import I3ResNet, load_merlin_weights
from nbsupport.ct_clip.inference import relevance_map
from nbsupport.ct_clip.model import CTClip, CTClipSpec
from nbsupport.weights import WeightsMismatchError, read_state_dict

TINY = {"width": 4, "blocks": (1, 1, 1, 1)}


def test_depth_is_the_inflated_axis_with_merlins_strides():
    encoder = I3ResNet(**TINY).eval()
    volume = torch.rand(2, 1, 64, 96, 32)  # (B, 1, X, Y, Z)
    with torch.no_grad():
        features = encoder.feature_map(volume)
    # X, Y: stem, max-pool and three strided stages halve them (/32); Z: the stem keeps it (stride 1 in time), /16
    assert features.shape == (2, 128, 2, 3, 2) and encoder.out_dim == 128
    assert encoder.pool(features).shape == (2, 128)
    flipped = volume.flip(-1)
    with torch.no_grad():  # a different volume gives different features (the encoder reads its input)
        assert not torch.allclose(encoder.pool(encoder.feature_map(flipped)), encoder.pool(features))


def test_merlins_clip_checkpoint_loads_every_image_tensor(merlin_checkpoint, capsys):
    encoder = I3ResNet(**TINY)
    load_merlin_weights(encoder, merlin_checkpoint)
    out = capsys.readouterr().out
    n = len(encoder.state_dict())
    assert f"{merlin_checkpoint}: loaded {n} of {n} tensors (0 missing, 0 unexpected)" in out
    assert "left out 4 tensors of Merlin's other parts" in out  # its text tower and logit scale
    saved = read_state_dict(merlin_checkpoint)
    for name in ("conv1.weight", "layer4.0.downsample.1.running_var", "layer2.0.conv2.weight", "classifier.bias"):
        torch.testing.assert_close(encoder.state_dict()[name], saved[f"encode_image.i3_resnet.{name}"], msg=name)
    assert encoder.conv1.weight.shape == (4, 3, 3, 7, 7) and encoder.layer2[0].conv2.weight.shape[2:] == (3, 3, 3)


def test_a_bare_i3resnet_state_dict_loads_and_a_foreign_tensor_is_an_error(merlin_checkpoint, tmp_path):
    state = read_state_dict(merlin_checkpoint)
    image = {k.removeprefix("encode_image.i3_resnet."): v for k, v in state.items() if k.startswith("encode_image.")}
    image["classifier.weight"], image["classifier.bias"] = torch.randn(6, 128, 1, 1, 1), torch.randn(6)
    five_year = tmp_path / "resnet_clinical_longformer_five_year_disease_prediction.pt"  # I3ResNet alone, 6 classes
    torch.save(image, five_year)
    encoder = I3ResNet(**TINY)
    load_merlin_weights(encoder, five_year, log=None)
    assert encoder.classifier.out_channels == 6

    wrong = tmp_path / "wrong.pt"
    torch.save({**image, "layer5.0.conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(WeightsMismatchError, match="unexpected: layer5.0.conv1.weight"):
        load_merlin_weights(I3ResNet(**TINY), wrong, log=None)
    shallow = tmp_path / "shallow.pt"  # a ResNet-50-deep file into a ResNet-152-deep network
    torch.save(image, shallow)
    with pytest.raises(WeightsMismatchError, match=r"18 missing: layer1\.1\.bn1\.bias"):
        load_merlin_weights(I3ResNet(4, (2, 1, 1, 1)), shallow, log=None)


def test_ct_clip_uses_merlins_weights_and_its_2048_features(merlin_checkpoint, capsys):
    spec = CTClipSpec(input_size=(32, 32, 16), image_arch="i3resnet", image_width=4, image_blocks=(1, 1, 1, 1),
                      image_weights=str(merlin_checkpoint), text_encoder="tiny", embed_dim=16)
    model = CTClip(spec)
    assert "(0 missing, 0 unexpected)" in capsys.readouterr().out
    assert model.image_projection[0].normalized_shape == (128,)  # LayerNorm(2048) + Linear at full width
    image, _ = model(torch.rand(2, 1, 32, 32, 16), model.text_encoder(["a.", "b."]))
    assert image.shape == (2, 16)
    relevance = relevance_map(model, torch.rand(1, 32, 32, 16), "Cardiomegaly is present.")
    assert relevance.shape == (32, 32, 16) and relevance.max() <= 1  # the feature map is back in (X, Y, Z) order
    with pytest.raises(ValueError, match="image_arch='i3resnet'"):
        CTClip(CTClipSpec(**{**spec.__dict__, "image_arch": "resnet"}))


def test_the_full_size_is_resnet_152_inflated():
    with torch.device("meta"):
        encoder = I3ResNet()
    count = sum(p.numel() for p in encoder.parameters())
    resnet152 = 60_192_808  # torchvision's published ResNet-152 parameter count
    fc = 2048 * 1000 + 1000  # its ImageNet head, which Merlin's conv_class I3ResNet replaces
    kxk = 64 * 3 * 7 * 7 + sum(n * (w * w * 9) for n, w in zip((3, 8, 36, 3), (64, 128, 256, 512)))
    heads = (2048 * 1692 + 1692) + (2048 * 512 + 512)  # classifier (phenotypes) and contrastive head
    assert count == resnet152 - fc + 2 * kxk + heads == 121_882_204  # every 7x7 and 3x3 kernel 3 deep
    assert encoder.out_dim == 2048
