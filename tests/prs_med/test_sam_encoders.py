"""SAM-family image encoders: tiny checkpoints in each published layout, loaded the way a user's download is.

The TinySAM and SAM ViT layouts come from ``prs_med_layouts.py`` (written from the original code, independently of
the networks under test; ``tvs:<line>`` / ``ie:<line>`` cite TinySAM's ``tiny_vit_sam.py`` and segment-anything's
``image_encoder.py``); the Hugging Face layout is what transformers' ``SamModel.save_pretrained`` writes.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from nbsupport.prs_med.sam_encoders import (
    SamImageEncoder,
    encoder_parameter_counts,
    load_sam_image_encoder,
    sam_vit_to_hf,
)
from nbsupport.prs_med.tinysam import VIT_T, Attention, TinyViT
from nbsupport.weights import WeightsMismatchError
from prs_med_layouts import (  # tests/prs_med/prs_med_layouts.py
    SAM_OTHER_PARTS,
    SAM_TINY,
    TINY_VIT,
    random_tensors,
    sam_vit_layout,
    tinysam_layout,
)


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_full_size_encoders_have_the_published_layouts_and_sizes() -> None:
    with torch.device("meta"):
        vit_t = TinyViT()
        from transformers import SamVisionConfig

        vit_b = SamImageEncoder.from_config(SamVisionConfig())
    assert _shapes(vit_t) == tinysam_layout(VIT_T) and len(_shapes(vit_t)) == 302
    hf_names = sam_vit_to_hf({"image_encoder." + k: torch.empty(s, device="meta") for k, s in sam_vit_layout(
        768, 12, 12, 64, 16, 14, [2, 5, 8, 11], 3072, 256).items()})  # build_sam.py:37-44, 62-79
    assert {k: tuple(v.shape) for k, v in hf_names.items()} == _shapes(vit_b.encoder) and len(hf_names) == 177
    counts = encoder_parameter_counts()
    assert counts == {"tinysam_vit_t": 6_065_532, "tinysam_vit_t_without_head": 5_743_892, "sam_vit_b": 89_670_912}
    assert 5.7e6 <= counts["tinysam_vit_t_without_head"] < counts["tinysam_vit_t"] <= 6.1e6
    with torch.device("meta"):  # the image embedding PRS-Med's decoder takes, at 1024 px
        pixels = torch.empty(2, 3, 1024, 1024)
        assert vit_t(pixels).shape == vit_b(pixels).shape == (2, 256, 64, 64)


def test_attention_bias_numbering_is_the_originals() -> None:
    """tvs:233-247 numbers the |dy|, |dx| offsets in the order it first meets them; the port writes the rule."""
    for window in (7, 14):
        points = list(itertools.product(range(window), range(window)))
        offsets: dict[tuple[int, int], int] = {}
        idxs = [offsets.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(offsets)) for a in points for b in points]
        ported = Attention(dim=8, key_dim=4, num_heads=2, window=window).attention_bias_idxs
        assert torch.equal(ported, torch.tensor(idxs).view(window * window, window * window))


def test_tinysam_checkpoint_loads_every_encoder_tensor(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    state = random_tensors(tinysam_layout(TINY_VIT), "image_encoder.") | random_tensors(SAM_OTHER_PARTS, seed=1)
    path = tmp_path / "weights" / "tinysam_42.3.pth"
    path.parent.mkdir()
    torch.save(state, path)  # a plain state dict, as TinySAM's build_sam.py:89-92 reads it
    encoder = load_sam_image_encoder(str(path))
    n = len(tinysam_layout(TINY_VIT))
    assert capsys.readouterr().out == f"{path}: loaded {n} of {n} tensors (0 missing, 0 unexpected)\n"
    assert encoder.kind == "tinyvit" and encoder.encoder.config == TINY_VIT and encoder.out_channels == 16
    own = encoder.encoder.state_dict()
    assert all(torch.equal(own[k], state["image_encoder." + k]) for k in own)
    with torch.no_grad():
        assert encoder.eval()(torch.randn(2, 3, 128, 128)).shape == (2, 16, 8, 8)


def test_prs_med_saved_image_encoder_loads_like_tinysam(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """PRS-Med's image_encoder.pth (model_v7.py:105) is its ImageEncoder wrapper's state: the encoder as
    ``image_encoder.*`` and again inside the whole SAM as ``sam.*`` (model_v7.py:27-28)."""
    encoder_state = random_tensors(tinysam_layout(TINY_VIT))
    state = ({"sam.image_encoder." + k: v for k, v in encoder_state.items()}
             | {"sam." + k: v for k, v in random_tensors(SAM_OTHER_PARTS).items()}
             | {"image_encoder." + k: v for k, v in encoder_state.items()})
    torch.save(state, tmp_path / "image_encoder.pth")
    encoder = load_sam_image_encoder(tmp_path / "image_encoder.pth")
    assert "(0 missing, 0 unexpected)" in capsys.readouterr().out
    assert torch.equal(encoder.encoder.neck[0].weight, encoder_state["neck.0.weight"])


def test_original_sam_vit_checkpoint_loads_under_transformers_names(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    layout = sam_vit_layout(**SAM_TINY)
    state = random_tensors(layout, "image_encoder.") | random_tensors(SAM_OTHER_PARTS, seed=1)
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(state, path)
    encoder = load_sam_image_encoder(path)
    n = len(layout)
    assert capsys.readouterr().out == f"{path}: loaded {n} of {n} tensors (0 missing, 0 unexpected)\n"
    config = encoder.encoder.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.image_size,
            config.window_size, list(config.global_attn_indexes), config.mlp_dim, config.output_channels) == (
        32, 4, 2, 128, 4, [1, 3], 128, 16)
    own = encoder.encoder.state_dict()
    spot = {"vision_encoder.patch_embed.projection.weight": "image_encoder.patch_embed.proj.weight",
            "vision_encoder.layers.3.layer_norm2.bias": "image_encoder.blocks.3.norm2.bias",
            "vision_encoder.layers.1.attn.rel_pos_h": "image_encoder.blocks.1.attn.rel_pos_h",
            "vision_encoder.neck.layer_norm1.weight": "image_encoder.neck.1.weight",
            "vision_encoder.neck.conv2.weight": "image_encoder.neck.2.weight"}
    assert all(torch.equal(own[hf], state[orig]) for hf, orig in spot.items())
    with torch.no_grad():
        assert encoder.eval()(torch.randn(1, 3, 128, 128)).shape == (1, 16, 8, 8)


def test_hugging_face_sam_folder_and_its_weight_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import SamConfig, SamModel, SamVisionConfig

    vision = SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16,
                             window_size=2, global_attn_indexes=[1], output_channels=16, mlp_dim=64)
    torch.manual_seed(0)
    sam = SamModel(SamConfig(vision_config=vision.to_dict()))
    folder = tmp_path / "sam-vit-base"
    sam.save_pretrained(folder)  # config.json (model_type "sam") + model.safetensors, tensors vision_encoder.*
    expected = {k: v for k, v in sam.state_dict().items() if k.startswith("vision_encoder.")}
    for given in (folder, folder / "model.safetensors"):
        encoder = load_sam_image_encoder(given)
        n = len(expected)
        assert capsys.readouterr().out == f"{given}: loaded {n} of {n} tensors (0 missing, 0 unexpected)\n"
        assert all(torch.equal(encoder.encoder.state_dict()[k], v) for k, v in expected.items())
        assert encoder.kind == "sam_vit" and encoder.image_size == 64 and encoder.out_channels == 16
    with torch.no_grad():
        assert encoder.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 16, 4, 4)


def test_wrong_or_damaged_checkpoints_are_errors_naming_them(tmp_path: Path) -> None:
    other = tmp_path / "resnet50.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7)}, other)
    with pytest.raises(ValueError, match=r"resnet50\.pth: not a SAM image-encoder checkpoint.*conv1\.weight"):
        load_sam_image_encoder(other)
    state = random_tensors(tinysam_layout(TINY_VIT), "image_encoder.")
    del state["image_encoder.layers.2.blocks.5.mlp.fc2.bias"]
    torch.save(state, tmp_path / "tinysam_42.3.pth")
    with pytest.raises(WeightsMismatchError, match=r"tinysam_42\.3\.pth: .*1 missing: layers\.2\.blocks\.5\.mlp"):
        load_sam_image_encoder(tmp_path / "tinysam_42.3.pth", log=None)
    (tmp_path / "folder").mkdir()
    torch.save({"vision_encoder.patch_embed.projection.weight": torch.zeros(1)}, tmp_path / "folder" / "w.bin")
    with pytest.raises(FileNotFoundError, match="needs its config.json"):
        load_sam_image_encoder(tmp_path / "folder" / "w.bin")
