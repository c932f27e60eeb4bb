"""Tiny checkpoints in the published SAM-family layouts, shared by the prs_med tests (imported by module name: the
folder is put on ``sys.path`` by this folder's conftest).

The layouts are written here from the original code, independently of the networks under test:
TinySAM ``tinysam/modeling/tiny_vit_sam.py`` (xinghaochen/TinySAM 11589bc, ``tvs:<line>``) and segment-anything
``segment_anything/modeling/image_encoder.py`` (``ie:<line>``) / ``common.py``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from nbsupport.prs_med.tinysam import TinyViTConfig

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





def write_tinysam_checkpoint(path: Path, config: TinyViTConfig = TINY_VIT, seed: int = 0) -> int:
    """A whole-SAM state dict as ``tinysam_42.3.pth`` holds one (``image_encoder.*`` in the TinyViT layout + SAM's
    prompt encoder / mask decoder tensors), random values, saved with ``torch.save``; returns the number of
    image-encoder tensors (what the load line must count)."""
    layout = tinysam_layout(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_tensors(layout, "image_encoder.", seed) | random_tensors(SAM_OTHER_PARTS, seed=seed + 1), path)
    return len(layout)
