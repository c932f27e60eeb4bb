"""PRS-Med's official prompted mask decoder, ported key for key (``mask_decoder.pth`` loads into it unchanged).

Source: huyquoctrinh/PRS-Med at commit fe89a70, ``segment_model/mask_decoder_v5.py`` (cited as ``v5:<line>``): the
decoder of ``segment_model/model_v7.py`` (``model_v7.py:10, 77``), the model ``train.py:5`` trains and whose state
dict ``LLMSeg.save_model`` writes as ``mask_decoder.pth`` (``model_v7.py:106``). seanhuvaya/prs_med_mmrs
``models/decoder/mask_decoder.py`` (``mmrs:<line>``) carries the same modules and tensor names (``mmrs:6-121``) and adds
NaN fallbacks and clamps to its forward (``mmrs:133-195``), which we leave out.

Data flow (``v5:316-359``): prompt tokens (B, T, 4096) -> MLP 4096 -> 512 -> 256 (LN + ReLU after each) -> LN;
image tokens (B, 64*64, 256) -> LN -> cross-attention to the prompt (8 heads) + residual -> LN ->
``TransformerEncoderLayer(256, 16 heads, ff 512, ReLU)`` -> :class:`FFN` -> back to (B, 256, 64, 64) + the image
embedding -> three residual :class:`BasicBlock` (256 -> 256 -> 128 -> 64) -> 1x1 conv -> bilinear x16
(``align_corners=True``) -> logits (B, 1, 1024, 1024).

Our additions, off by default so that the default call is the official one: ``prompt_mask`` (ignore padded prompt
tokens in the cross-attention; the official call attends to all of them, ``v5:335``), ``output_size`` (the side of
the logits when it is not 16 x the grid) and ``return_attention``.

:class:`SimpleMaskDecoder` is our simplified decoder (plain conv blocks and FFN, logits clamped to +-10), the one the
CPU profiles (``smoke``, ``demo``) were tuned with; :func:`build_mask_decoder` picks one of the two by name (the
``mask_decoder`` option, ``"official"`` in ``full``).
"""
from __future__ import annotations

import os
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from nbsupport.weights import Log, load_into, read_state_dict


class BasicBlock(nn.Module):
    """3x3 conv -> InstanceNorm (affine) -> ReLU -> + input -> 1x1 conv (padding 1) -> InstanceNorm -> 3x3 conv
    (no padding) (``v5:154-190``).

    The 1x1 convolution's padding grows the map by 2 and the unpadded 3x3 shrinks it back, so the size is kept; the
    second norm sees the zero border. Tensors: ``conv1`` (C, C, 3, 3), ``bn1`` (C), ``conv2`` (C', C, 1, 1), ``bn2``
    (C'), ``conv3`` (C', C', 3, 3), all convolutions with bias; the norms keep no running statistics.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)
        self.bn1 = nn.InstanceNorm2d(in_channels, affine=True)
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel_size=1, padding=1)
        self.bn2 = nn.InstanceNorm2d(out_channels, affine=True)
        self.conv3 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x))) + x
        return self.conv3(self.bn2(self.conv2(out)))


class FFN(nn.Module):
    """fc1 -> ReLU -> + input -> fc2 -> ReLU -> LayerNorm (``v5:232-254``).

    ``norm1`` is created but never used by the original (``v5:239``); it is kept because ``mask_decoder.pth`` holds
    it, and frozen: it would get no gradient, and DDP refuses a trainable parameter without one (PRS-Med's
    ``train_ddp.py:296`` passes ``find_unused_parameters=True`` instead, which walks the graph every step). Training
    is the same either way: the optimiser skips a parameter without a gradient.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, out_features)
        self.fc2 = nn.Linear(out_features, in_features)
        self.norm = nn.LayerNorm(in_features, eps=1e-5)
        self.norm1 = nn.LayerNorm(in_features, eps=1e-5)
        self.norm1.requires_grad_(False)
        for fc in (self.fc2, self.fc1):  # v5:240-243
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.relu(self.fc2(F.relu(self.fc1(x)) + x)))


def _init_attention(attn: nn.MultiheadAttention) -> None:
    """Xavier in/out projections with biases of one (``v5:281-284, 293-296``)."""
    nn.init.xavier_uniform_(attn.in_proj_weight)
    nn.init.xavier_uniform_(attn.out_proj.weight)
    nn.init.ones_(attn.in_proj_bias)
    nn.init.ones_(attn.out_proj.bias)


class PromptedMaskDecoder(nn.Module):
    """Mask logits from an image embedding prompted by the VLM's last hidden states (``v5:256-359``).

    Args:
        prompt_dim: VLM hidden size (4096 for LLaVA-Med's Mistral-7B). image_dim: encoder channels (256).
        hidden_dim: width of the prompt MLP's first layer (512).
        cross_heads / transformer_heads: heads of the cross-attention (8, ``v5:279``) and of the encoder layer (16,
            ``v5:292``).
    The encoder layer's width and feed-forward size are hard-coded 256 and 512 in the original (``v5:292``); here
    they are ``image_dim`` and ``2 * image_dim``, the same at the official sizes.
    """

    def __init__(self, prompt_dim: int = 4096, image_dim: int = 256, hidden_dim: int = 512, cross_heads: int = 8,
                 transformer_heads: int = 16, dropout: float = 0.1):
        super().__init__()
        # Built and initialised in the original's order (v5:260-313), so a seeded decoder draws the same numbers:
        # Xavier weights with biases of ONE (not zero) in the prompt MLP, both attentions, ffn.fc1 and the encoder
        # layer's MLP; unit LayerNorm weights and biases in the prompt MLP; Xavier out_dec with zero bias.
        # BasicBlock keeps PyTorch's default init: its weight_init (v5:164-177) is never called.
        self.prompt_projection = nn.Sequential(
            nn.Linear(prompt_dim, hidden_dim), nn.LayerNorm(hidden_dim, eps=1e-5), nn.ReLU(),
            nn.Linear(hidden_dim, image_dim), nn.LayerNorm(image_dim, eps=1e-5), nn.ReLU())
        for layer in self.prompt_projection:  # v5:269-276
            if isinstance(layer, (nn.Linear, nn.LayerNorm)):
                (nn.init.xavier_uniform_ if isinstance(layer, nn.Linear) else nn.init.ones_)(layer.weight)
                nn.init.ones_(layer.bias)
        self.attn = nn.MultiheadAttention(embed_dim=image_dim, num_heads=cross_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(image_dim, eps=1e-5)
        _init_attention(self.attn)  # v5:281-284
        self.ffn = FFN(image_dim, image_dim)
        nn.init.xavier_uniform_(self.ffn.fc1.weight)  # v5:289-290, a second draw after FFN's own
        nn.init.ones_(self.ffn.fc1.bias)
        self.encoder_layer = nn.TransformerEncoderLayer(d_model=image_dim, nhead=transformer_heads, batch_first=True,
                                                        activation="relu", dim_feedforward=2 * image_dim,
                                                        dropout=dropout)  # v5:292 leaves PyTorch's 0.1
        _init_attention(self.encoder_layer.self_attn)  # v5:293-300
        for linear in (self.encoder_layer.linear1, self.encoder_layer.linear2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.ones_(linear.bias)
        self.mask_generation = nn.Sequential(BasicBlock(image_dim, image_dim), BasicBlock(image_dim, image_dim // 2),
                                             BasicBlock(image_dim // 2, image_dim // 4))
        self.out_dec = nn.Conv2d(image_dim // 4, 1, 1)
        self.image_norm = nn.LayerNorm(image_dim, eps=1e-5)
        self.prompt_norm = nn.LayerNorm(image_dim, eps=1e-5)
        nn.init.xavier_uniform_(self.out_dec.weight)  # v5:312-313
        nn.init.zeros_(self.out_dec.bias)

    def forward(self, image_embeddings: torch.Tensor, prompt: torch.Tensor, prompt_mask: torch.Tensor | None = None,
                output_size: int | None = None,
                return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            image_embeddings: (B, C, g, g) from the image encoder (C = 256, g = 64 in PRS-Med).
            prompt: (B, T, prompt_dim) last hidden states of the VLM (any float dtype; cast to the decoder's, as the
                original casts to float32, ``v5:323-325``).
            prompt_mask: (B, T), 1 for real tokens; None attends to every token, as the original.
            output_size: side of the returned logits; None: 16 g, the original's x16 (``v5:356``).
            return_attention: also return the cross-attention weights, averaged over heads.
        Returns:
            (logits (B, 1, S, S), cross-attention (B, g*g, T) or None).
        """
        dtype = self.out_dec.weight.dtype
        image = image_embeddings.to(dtype)
        b, _, h, w = image.shape
        prompt_proj = self.prompt_norm(self.prompt_projection(prompt.to(dtype)))
        image_flat = self.image_norm(image.flatten(2).transpose(1, 2))
        padding = None if prompt_mask is None else ~prompt_mask.bool()
        attended, weights = self.attn(image_flat, prompt_proj, prompt_proj, key_padding_mask=padding,
                                      need_weights=return_attention, average_attn_weights=True)
        x = self.ffn(self.encoder_layer(self.norm1(attended + image_flat)))
        x = x.transpose(1, 2).reshape(b, -1, h, w) + image
        mask = self.out_dec(self.mask_generation(x))
        size = (output_size, output_size) if output_size is not None else (16 * h, 16 * w)
        return F.interpolate(mask, size=size, mode="bilinear", align_corners=True), weights


def load_prompted_mask_decoder(path: str | os.PathLike, log: Log | None = print) -> PromptedMaskDecoder:
    """A decoder with every tensor of PRS-Med's ``mask_decoder.pth`` (or our safetensors copy of it).

    The sizes are read off the file: ``prompt_projection.0.weight`` is (hidden_dim, prompt_dim) and
    ``prompt_projection.3.weight`` (image_dim, hidden_dim) (``v5:260-267``). Head counts cannot be read off weights;
    the official 8 and 16 are used.

    Raises:
        ValueError: a file without the prompt projection's tensors. WeightsMismatchError: any other tensor missing,
            unexpected or of another shape.
    """
    state = read_state_dict(path)
    if "prompt_projection.0.weight" not in state or "prompt_projection.3.weight" not in state:
        shown = ", ".join(sorted(state)[:5])
        raise ValueError(f"{path}: not a PRS-Med mask_decoder.pth: no 'prompt_projection.0.weight' / "
                         f"'prompt_projection.3.weight' (mask_decoder_v5.py:260-267); its tensors start {shown}")
    hidden_dim, prompt_dim = state["prompt_projection.0.weight"].shape
    image_dim = state["prompt_projection.3.weight"].shape[0]
    decoder = PromptedMaskDecoder(int(prompt_dim), int(image_dim), int(hidden_dim))
    load_into(decoder, state, path, log=log)
    return decoder


# ---------------------------------------------------------------------------------------------- the simple option
class _ConvBlock(nn.Module):
    """conv3x3 -> InstanceNorm (no affine) -> ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.InstanceNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class SimpleMaskDecoder(nn.Module):
    """Our simplified prompted mask decoder (the ``"simple"`` option): the official data flow with plain blocks.

    Prompt MLP H -> hidden -> C (LN + ReLU); image tokens (LN) cross-attend to the prompt tokens (8 heads) + residual
    -> LN -> TransformerEncoderLayer(C, 16 heads, ff 2 * hidden) -> + a plain FFN -> + image residual -> three
    conv3x3/InstanceNorm/ReLU blocks (C -> C -> C/2 -> C/4) -> 1x1 conv -> bilinear to the input size -> logits clamped
    to +-10. Where the official :class:`PromptedMaskDecoder` differs: residual BasicBlocks, an FFN with residual + LN,
    a LayerNorm after the prompt MLP, the encoder layer's feed-forward 2 * C, Xavier / ones initialisation,
    ``align_corners=True`` and no clamp.

    Args:
        prompt_dim: VLM hidden size H (4096 for LLaVA-Med). image_dim: encoder channels C (256 for SAM).
        hidden_dim: prompt-MLP width (512 in the official code).
    """

    def __init__(self, prompt_dim: int, image_dim: int, hidden_dim: int, cross_heads: int = 8,
                 transformer_heads: int = 16, dropout: float = 0.1):
        super().__init__()
        self.prompt_mlp = nn.Sequential(nn.Linear(prompt_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.ReLU(),
                                        nn.Linear(hidden_dim, image_dim), nn.LayerNorm(image_dim), nn.ReLU())
        self.image_norm = nn.LayerNorm(image_dim)
        self.cross_attn = nn.MultiheadAttention(image_dim, cross_heads, batch_first=True)
        self.post_norm = nn.LayerNorm(image_dim)
        self.transformer = nn.TransformerEncoderLayer(image_dim, transformer_heads, dim_feedforward=2 * hidden_dim,
                                                      dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(image_dim, image_dim), nn.ReLU(), nn.Linear(image_dim, image_dim))
        self.blocks = nn.Sequential(_ConvBlock(image_dim, image_dim), _ConvBlock(image_dim, image_dim // 2),
                                    _ConvBlock(image_dim // 2, image_dim // 4))
        self.head = nn.Conv2d(image_dim // 4, 1, 1)

    def forward(self, image_embeddings: torch.Tensor, prompt: torch.Tensor, prompt_mask: torch.Tensor | None,
                output_size: int, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            image_embeddings: (B, C, g, g). prompt: (B, T, H). prompt_mask: (B, T), 1 for real tokens.
            output_size: side of the returned logits (the model input size).
        Returns:
            (logits (B, 1, S, S) clamped to +-10, cross-attention (B, g*g, T) averaged over heads or None).
        """
        b, c, gh, gw = image_embeddings.shape
        tokens = image_embeddings.flatten(2).transpose(1, 2)  # (B, g*g, C)
        keys = self.prompt_mlp(prompt)
        padding = None if prompt_mask is None else ~prompt_mask.bool()
        attended, weights = self.cross_attn(self.image_norm(tokens), keys, keys, key_padding_mask=padding,
                                            need_weights=return_attention, average_attn_weights=True)
        x = self.post_norm(tokens + attended)
        x = self.transformer(x)
        x = x + self.ffn(x)
        x = x.transpose(1, 2).reshape(b, c, gh, gw) + image_embeddings
        x = self.head(self.blocks(x))
        logits = F.interpolate(x, size=(output_size, output_size), mode="bilinear", align_corners=False)
        return logits.clamp(-10, 10), weights


# The decoders build_mask_decoder builds: the choices of the 02_train parameter mask_decoder.
MaskDecoderKind = Literal["official", "simple"]
MASK_DECODERS: tuple[str, ...] = get_args(MaskDecoderKind)


def build_mask_decoder(kind: str, prompt_dim: int, image_dim: int, hidden_dim: int, dropout: float = 0.1) -> nn.Module:
    """The mask decoder named by ``kind``: ``"official"`` (:class:`PromptedMaskDecoder`) or ``"simple"``
    (:class:`SimpleMaskDecoder`). Both take ``(image_embeddings, prompt, prompt_mask, output_size,
    return_attention=...)`` and return ``(logits, cross-attention or None)``. ``dropout``: of the transformer
    encoder layer (PyTorch's 0.1 in the official code).

    Raises:
        ValueError: another ``kind``, or (official) encoder channels the decoder's heads and blocks cannot split:
            ``image_dim`` must be divisible by 16 (16 heads in the encoder layer, ``v5:292``; C/4 in the last block).
    """
    if kind == "simple":
        return SimpleMaskDecoder(prompt_dim, image_dim, hidden_dim, dropout=dropout)
    if kind != "official":
        raise ValueError(f"mask_decoder must be one of {list(MASK_DECODERS)}, got {kind!r}")
    if image_dim % 16:
        raise ValueError(f"mask_decoder='official' needs image-encoder channels divisible by 16 (16 attention heads, "
                         f"mask_decoder_v5.py:292), got {image_dim}")
    return PromptedMaskDecoder(prompt_dim, image_dim, hidden_dim, dropout=dropout)
