"""TinySAM's image encoder: the TinyViT ``vit_t`` backbone with SAM's neck, ported key for key without timm.

PRS-Med's image encoder is TinySAM's ``vit_t`` (huyquoctrinh/PRS-Med ``segment_model/model_v7.py:79-82``, the model
``train.py:5`` trains; seanhuvaya/prs_med_mmrs ``models/vision_backbone/__init__.py:26-29``), loaded from
``tinysam_42.3.pth``: a whole SAM state dict (``torch.load`` + strict ``load_state_dict`` into ``Sam``, TinySAM
``tinysam/build_sam.py:89-92``) whose ``image_encoder.*`` tensors are this network's.

Every module, tensor name and shape below comes from xinghaochen/TinySAM at commit 11589bc,
``tinysam/modeling/tiny_vit_sam.py`` (cited as ``tvs:<line>``) and ``tinysam/build_sam.py`` (``bs:<line>``). What we
changed, none of which touches a tensor name or shape:

* the feature-map sizes are taken from the input instead of being fixed at construction for 1024 px (the original
  reshapes the last stage to a hard-coded 64 x 64, ``tvs:611``), so the same weights run on a small test image; at
  1024 px every stage sees exactly the sizes the original computes (``tvs:500-501``);
* the merge into the last stage keeps the resolution (stride 1). The original decides this by the merged width
  (``out_dim in (320, 448, 576)``, ``tvs:127-129``), which in every TinyViT / TinySAM / MobileSAM configuration is the
  last stage's width; we state the rule by position so a test encoder with small widths has the same structure;
* window attention adds the learned bias through ``scaled_dot_product_attention`` (same scale ``key_dim ** -0.5``,
  ``tvs:221``; same sum, ``tvs:275-281``) instead of a materialised score matrix;
* no stochastic depth (``vit_t`` is built with ``drop_path_rate=0.0``, ``bs:60``, so the original has none either),
  no gradient checkpointing and no per-layer learning-rate attributes (``tvs:553-585``, used by TinyViT's own
  trainer only).
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class TinyViTConfig:
    """The widths and depths of a TinyViT image encoder. Defaults: TinySAM's ``vit_t`` (``bs:53-65``).

    ``num_heads[0]`` and ``window_sizes[0]`` belong to the convolutional first stage, which has no attention; they
    are kept so the tuples read as in ``bs:54-57``.
    """

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    in_chans: int = 3
    num_classes: int = 1000  # the unused classifier head is part of the checkpoint (bs:53, tvs:529-531)
    out_chans: int = 256  # SAM neck width (tvs:536-552, hard-coded 256 there)

    def __post_init__(self) -> None:
        n = len(self.embed_dims)
        if n < 2 or not len(self.depths) == len(self.num_heads) == len(self.window_sizes) == n:
            raise ValueError(f"TinyViTConfig: embed_dims, depths, num_heads and window_sizes need one entry per "
                             f"stage (at least 2), got {self}")
        for dim, heads in zip(self.embed_dims[1:], self.num_heads[1:]):
            if dim % heads:
                raise ValueError(f"TinyViTConfig: width {dim} is not divisible by {heads} heads (tvs:319)")


VIT_T = TinyViTConfig()


# ---------------------------------------------------------------------------------------------- building blocks
class Conv2d_BN(nn.Sequential):  # noqa: N801 -- the original's name; its children are the tensor names
    """Convolution without bias (``c``) then batch norm (``bn``) (``tvs:21-30``)."""

    def __init__(self, cin: int, cout: int, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1,
                 bn_weight_init: float = 1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, ks, stride, pad, groups=groups, bias=False))
        bn = nn.BatchNorm2d(cout)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0)
        self.add_module("bn", bn)


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 conv-BN layers with GELU between: (B, 3, S, S) -> (B, D0, S/4, S/4) (``tvs:57-74``)."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.seq = nn.Sequential(Conv2d_BN(in_chans, embed_dim // 2, 3, 2, 1), nn.GELU(),
                                 Conv2d_BN(embed_dim // 2, embed_dim, 3, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project (BN weight 0), residual, GELU (``tvs:77-115``)."""

    def __init__(self, dim: int, expand_ratio: float):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2d_BN(dim, hidden, ks=1)
        self.conv2 = Conv2d_BN(hidden, hidden, ks=3, stride=1, pad=1, groups=hidden)
        self.conv3 = Conv2d_BN(hidden, dim, ks=1, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """1x1 conv, GELU, 3x3 depthwise conv (stride 2, or 1 into the last stage), GELU, 1x1 conv (``tvs:118-147``).

    Takes a feature map (B, C, H, W) or tokens (B, H*W, C) with their ``hw``; returns tokens and their new size.
    """

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv1 = Conv2d_BN(dim, out_dim, 1, 1, 0)
        self.conv2 = Conv2d_BN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2d_BN(out_dim, out_dim, 1, 1, 0)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        if x.ndim == 3:
            x = x.view(x.shape[0], hw[0], hw[1], -1).permute(0, 3, 1, 2)
        x = self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class ConvLayer(nn.Module):
    """Stage 0: ``depth`` MBConv blocks on the feature map, then the merge (``tvs:150-186``)."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: PatchMerging | None):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x, hw) if self.downsample is not None else (x, hw)


class Mlp(nn.Module):
    """LayerNorm, fc1, GELU, fc2 (``tvs:189-209``; dropout 0 in ``vit_t``, ``bs:59``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class Attention(nn.Module):
    """Window self-attention with a learned bias per head and relative offset (``tvs:212-284``).

    ``attention_biases`` (heads, window^2) holds one bias per |dy|, |dx| offset, numbered row-major
    (|dy| * window + |dx|): the order in which ``tvs:238-243`` first meets them, starting from point (0, 0).
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads, self.key_dim = num_heads, key_dim
        self.dh = key_dim * num_heads  # attn_ratio = 1 in TinyViTBlock (tvs:323-324), so d = key_dim
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, self.dh + 2 * key_dim * num_heads)
        self.proj = nn.Linear(self.dh, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        idxs = (ys[:, None] - ys[None, :]).abs() * window + (xs[:, None] - xs[None, :]).abs()
        self.register_buffer("attention_bias_idxs", idxs, persistent=False)  # tvs:246-248

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.key_dim], dim=3)  # tvs:268-269
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # softmax(q k^T / sqrt(key_dim) + bias) v
        return self.proj(out.transpose(1, 2).reshape(b, n, self.dh))


class TinyViTBlock(nn.Module):
    """Window attention + residual, 3x3 depthwise conv-BN, MLP + residual (``tvs:287-376``)."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float, local_conv_size: int):
        super().__init__()
        self.window = window
        self.attn = Attention(dim, dim // num_heads, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2d_BN(dim, dim, ks=local_conv_size, stride=1, pad=local_conv_size // 2, groups=dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        (h, w), (b, length, c), ws = hw, x.shape, self.window
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws  # zero-pad to whole windows (tvs:344-351)
        y = F.pad(x.view(b, h, w, c), (0, 0, 0, pad_r, 0, pad_b))
        nh, nw = (h + pad_b) // ws, (w + pad_r) // ws
        y = y.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        y = self.attn(y).view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, h + pad_b, w + pad_r, c)
        x = x + y[:, :h, :w].reshape(b, length, c)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).view(b, c, length).transpose(1, 2)
        return x + self.mlp(x)


class BasicLayer(nn.Module):
    """Stages 1-3: ``depth`` TinyViT blocks on tokens, then the merge if any (``tvs:383-444``)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float, local_conv_size: int,
                 downsample: PatchMerging | None):
        super().__init__()
        self.blocks = nn.ModuleList(TinyViTBlock(dim, num_heads, window, mlp_ratio, local_conv_size)
                                    for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        for block in self.blocks:
            x = block(x, hw)
        return self.downsample(x, hw) if self.downsample is not None else (x, hw)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map, eps 1e-6 (``tvs:449-461``)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + self.eps)) + self.bias[:, None, None]


# ---------------------------------------------------------------------------------------------- the encoder
class TinyViT(nn.Module):
    """TinySAM's image encoder: (B, 3, S, S) ImageNet-normalised -> (B, out_chans, S/16, S/16) (``tvs:462-620``).

    Tensor names are those under ``image_encoder.`` in ``tinysam_42.3.pth``: ``patch_embed.seq.*``,
    ``layers.{0..3}.blocks.*`` / ``.downsample.*``, ``norm_head.*`` and ``head.*`` (a classifier the SAM encoder
    never runs, ``tvs:528-531, 616-620``, kept so the checkpoint loads whole) and ``neck.{0..3}.*``.
    """

    def __init__(self, config: TinyViTConfig = VIT_T):
        super().__init__()
        self.config = c = config
        self.patch_embed = PatchEmbed(c.in_chans, c.embed_dims[0])
        last = len(c.embed_dims) - 1
        self.layers = nn.ModuleList()
        for i, dim in enumerate(c.embed_dims):  # tvs:497-526
            merge = (PatchMerging(dim, c.embed_dims[i + 1], stride=1 if i + 1 == last else 2)
                     if i < last else None)
            self.layers.append(ConvLayer(dim, c.depths[0], c.mbconv_expand_ratio, merge) if i == 0 else
                               BasicLayer(dim, c.depths[i], c.num_heads[i], c.window_sizes[i], c.mlp_ratio,
                                          c.local_conv_size, merge))
        self.norm_head = nn.LayerNorm(c.embed_dims[-1])
        self.head = nn.Linear(c.embed_dims[-1], c.num_classes) if c.num_classes > 0 else nn.Identity()
        self.apply(_init_weights)  # tvs:534, before the neck exists: the neck keeps PyTorch's default init
        self.neck = nn.Sequential(nn.Conv2d(c.embed_dims[-1], c.out_chans, kernel_size=1, bias=False),
                                  LayerNorm2d(c.out_chans),
                                  nn.Conv2d(c.out_chans, c.out_chans, kernel_size=3, padding=1, bias=False),
                                  LayerNorm2d(c.out_chans))

    @property
    def out_channels(self) -> int:
        return self.config.out_chans

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> image embedding (B, out_chans, g, g), g = S/16 (64 at TinySAM's 1024 px)."""
        x = self.patch_embed(pixels)
        hw = (x.shape[2], x.shape[3])
        for layer in self.layers:
            x, hw = layer(x, hw)
        x = x.view(x.shape[0], hw[0], hw[1], -1).permute(0, 3, 1, 2)  # tvs:610-612
        return self.neck(x)


def _init_weights(m: nn.Module) -> None:
    """Truncated-normal (std 0.02) Linear weights, zero biases, unit LayerNorms (``tvs:587-594``)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------- from a checkpoint
def tinyvit_config_from_state_dict(state: Mapping[str, torch.Tensor], source: str | os.PathLike) -> TinyViTConfig:
    """The configuration a TinyViT state dict (names without ``image_encoder.``) was saved from, read off its shapes.

    Heads and window of each attention stage come from ``attention_biases`` (heads, window^2), widths from the
    convolutions, depths from the block numbers, the MLP and MBConv ratios from their first layers.

    Raises:
        ValueError: naming ``source`` and the tensor that a TinyViT encoder must have.
    """
    def shape(name: str) -> tuple[int, ...]:
        if name not in state:
            raise ValueError(f"{source}: not a TinyViT image encoder: no tensor 'image_encoder.{name}' "
                             "(TinySAM tiny_vit_sam.py)")
        return tuple(state[name].shape)

    n_stages = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    depths = tuple(1 + max(int(k.split(".")[3]) for k in state if k.startswith(f"layers.{i}.blocks."))
                   for i in range(n_stages))
    dims = (shape("patch_embed.seq.2.c.weight")[0],) + tuple(
        shape(f"layers.{i}.blocks.0.attn.norm.weight")[0] for i in range(1, n_stages))
    biases = [shape(f"layers.{i}.blocks.0.attn.attention_biases") for i in range(1, n_stages)]
    windows = tuple(math.isqrt(n) for _, n in biases)
    if any(w * w != n for w, (_, n) in zip(windows, biases)):
        raise ValueError(f"{source}: attention_biases of shapes {biases} are not (heads, window^2)")
    return TinyViTConfig(
        embed_dims=dims, depths=depths,
        num_heads=(VIT_T.num_heads[0],) + tuple(h for h, _ in biases),
        window_sizes=(VIT_T.window_sizes[0],) + windows,
        mlp_ratio=shape("layers.1.blocks.0.mlp.fc1.weight")[0] / dims[1],
        mbconv_expand_ratio=shape("layers.0.blocks.0.conv1.c.weight")[0] / dims[0],
        local_conv_size=shape("layers.1.blocks.0.local_conv.c.weight")[-1],
        in_chans=shape("patch_embed.seq.0.c.weight")[1],
        num_classes=shape("head.weight")[0] if "head.weight" in state else 0,
        out_chans=shape("neck.0.weight")[0])
