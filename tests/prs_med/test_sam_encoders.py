"""SAM-family image encoders: tiny checkpoints in each published layout, loaded the way a user's download is.

The layouts are written here from the original code, independently of the networks under test:
TinySAM ``tinysam/modeling/tiny_vit_sam.py`` (xinghaochen/TinySAM 11589bc, ``tvs:<line>``) and segment-anything
``segment_anything/modeling/image_encoder.py`` (``ie:<line>``) / ``common.py``; the Hugging Face layout is what
transformers' ``SamModel.save_pretrained`` writes.
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
from nbsupport.prs_med.tinysam import VIT_T, Attention, TinyViT, TinyViTConfig
from nbsupport.weights import WeightsMismatchError

# SAM's own prompt encoder / mask decoder tensors a whole-SAM file also holds (segment-anything prompt_encoder.py,
# mask_decoder.py): the encoder loader must leave them alone.
SAM_OTHER_PARTS = {"prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, 128),
                   "prompt_encoder.no_mask_embed.weight": (1, 256),
                   "mask_decoder.iou_token.weight": (1, 256),
                   "mask_decoder.output_upscaling.0.weight": (256, 64, 2, 2)}


def _conv_bn(name: str, cin: int, cout: int, ks: int, groups: int = 1) -> dict[str, tuple[int, ...]]:
    """Conv2d_BN: conv 'c' without bias + BatchNorm2d 'bn' with its running statistics (tvs:21-30)."""
    return {f"{name}.c.weight": (cout, cin // groups, ks, ks), f"{name}.bn.weight": (cout,), f"{name}.bn.bias": (cout,),
            f"{name}.bn.running_mean": (cout,), f"{name}.bn.running_var": (cout,),
            f"{name}.bn.num_batches_tracked": ()}


def tinysam_layout(c: TinyViTConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of TinySAM's image encoder (without the ``image_encoder.`` prefix), from tvs."""
    d = c.embed_dims
    out = _conv_bn("patch_embed.seq.0", c.in_chans, d[0] // 2, 3) | _conv_bn("patch_embed.seq.2", d[0] // 2, d[0], 3)
    hidden = int(d[0] * c.mbconv_expand_ratio)
    for j in range(c.depths[0]):  # MBConv (tvs:85-93)
        out |= (_conv_bn(f"layers.0.blocks.{j}.conv1", d[0], hidden, 1)
                | _conv_bn(f"layers.0.blocks.{j}.conv2", hidden, hidden, 3, groups=hidden)
                | _conv_bn(f"layers.0.blocks.{j}.conv3", hidden, d[0], 1))
    for i in range(len(d)):
        for j in range(c.depths[i] if i else 0):  # TinyViTBlock (tvs:323-333), Attention (tvs:229-245), Mlp
            p, mlp = f"layers.{i}.blocks.{j}", int(d[i] * c.mlp_ratio)
            out |= {f"{p}.attn.attention_biases": (c.num_heads[i], c.window_sizes[i] ** 2),
                    f"{p}.attn.norm.weight": (d[i],), f"{p}.attn.norm.bias": (d[i],),
                    f"{p}.attn.qkv.weight": (3 * d[i], d[i]), f"{p}.attn.qkv.bias": (3 * d[i],),
                    f"{p}.attn.proj.weight": (d[i], d[i]), f"{p}.attn.proj.bias": (d[i],),
                    f"{p}.mlp.norm.weight": (d[i],), f"{p}.mlp.norm.bias": (d[i],),
                    f"{p}.mlp.fc1.weight": (mlp, d[i]), f"{p}.mlp.fc1.bias": (mlp,),
                    f"{p}.mlp.fc2.weight": (d[i], mlp), f"{p}.mlp.fc2.bias": (d[i],)}
            out |= _conv_bn(f"{p}.local_conv", d[i], d[i], c.local_conv_size, groups=d[i])
        if i + 1 < len(d):  # PatchMerging (tvs:126-131)
            p = f"layers.{i}.downsample"
            out |= (_conv_bn(f"{p}.conv1", d[i], d[i + 1], 1) | _conv_bn(f"{p}.conv2", d[i + 1], d[i + 1], 3,
                                                                         groups=d[i + 1])
                    | _conv_bn(f"{p}.conv3", d[i + 1], d[i + 1], 1))
    out |= {"norm_head.weight": (d[-1],), "norm_head.bias": (d[-1],),  # tvs:529-531
            "head.weight": (c.num_classes, d[-1]), "head.bias": (c.num_classes,),
            "neck.0.weight": (c.out_chans, d[-1], 1, 1), "neck.1.weight": (c.out_chans,),  # tvs:536-552
            "neck.1.bias": (c.out_chans,), "neck.2.weight": (c.out_chans, c.out_chans, 3, 3),
            "neck.3.weight": (c.out_chans,), "neck.3.bias": (c.out_chans,)}
    return out


def sam_vit_layout(dim: int, depth: int, heads: int, grid: int, patch: int, window: int, global_blocks: list[int],
                   mlp: int, out: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of an original SAM ViT image encoder (without ``image_encoder.``), from ie and common.py."""
    names = {"pos_embed": (1, grid, grid, dim), "patch_embed.proj.weight": (dim, 3, patch, patch),  # ie:68-70, 387
             "patch_embed.proj.bias": (dim,)}
    for i in range(depth):  # Block (ie:151-162), Attention (ie:212-222), MLPBlock (common.py:21-22)
        span = 2 * (grid if i in global_blocks else window) - 1
        p = f"blocks.{i}"
        names |= {f"{p}.norm1.weight": (dim,), f"{p}.norm1.bias": (dim,),
                  f"{p}.attn.rel_pos_h": (span, dim // heads), f"{p}.attn.rel_pos_w": (span, dim // heads),
                  f"{p}.attn.qkv.weight": (3 * dim, dim), f"{p}.attn.qkv.bias": (3 * dim,),
                  f"{p}.attn.proj.weight": (dim, dim), f"{p}.attn.proj.bias": (dim,),
                  f"{p}.norm2.weight": (dim,), f"{p}.norm2.bias": (dim,),
                  f"{p}.mlp.lin1.weight": (mlp, dim), f"{p}.mlp.lin1.bias": (mlp,),
                  f"{p}.mlp.lin2.weight": (dim, mlp), f"{p}.mlp.lin2.bias": (dim,)}
    return names | {"neck.0.weight": (out, dim, 1, 1), "neck.1.weight": (out,), "neck.1.bias": (out,),  # ie:88-104
                    "neck.2.weight": (out, out, 3, 3), "neck.3.weight": (out,), "neck.3.bias": (out,)}


def random_tensors(layout: dict[str, tuple[int, ...]], prefix: str = "", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values of the right kind: positive running variances, integer batch counters."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in layout.items():
        if name.endswith("num_batches_tracked"):
            out[prefix + name] = torch.tensor(100, dtype=torch.long)
        elif name.endswith("running_var"):
            out[prefix + name] = torch.rand(shape, generator=g) + 0.5
        else:
            out[prefix + name] = torch.randn(shape, generator=g) * 0.1
    return out


# vit_t's structure with small widths. Stage 0 is convolutional: its head count and window (vit_t's 2 and 7) are
# placeholders no tensor records, which is what the loader fills in.
TINY_VIT = TinyViTConfig(embed_dims=(8, 16, 24, 32), depths=(2, 2, 6, 2), num_heads=(2, 2, 3, 4),
                         window_sizes=(7, 7, 14, 7), num_classes=10, out_chans=16)
SAM_TINY = dict(dim=32, depth=4, heads=2, grid=8, patch=16, window=4, global_blocks=[1, 3], mlp=128, out=16)


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
