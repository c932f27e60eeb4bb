"""LLMSeg (tvseg/MM-LLM-RO ``ContextUNETR``): a MONAI 3-D UNet whose five encoder scales are fused with report tokens.

Architecture, as the public code builds it (file:line at tvseg/MM-LLM-RO 00ab6f8):

* image encoder: 5 x ``UnetrBasicBlock(kernel 3, stride 2, residual, instance norm)`` with channels
  ``fs, fs, 2fs, 4fs, 8fs`` -> scales 1/2 ... 1/32 (volume sides must be divisible by 32), run one after the other
  on the *unfused* features (model/contextunet.py:259-263);
* text encoder (frozen): a causal LM whose output at a ``<SEG>`` token is the report feature, or (``demo``) a
  sentence encoder (MiniLM) mean-pooled; ``n_prompts`` learnable context prompts of ``context_length`` embeddings
  are put in front of the report tokens, so each prompt yields one feature: text tokens ``(B, n_prompts, hidden)``;
* fusion ("interactive alignment") per scale: ``Linear(hidden -> C_i)`` then a two-way transformer (SAM's, here
  MONAI's copy in ``monai.networks.nets.vista3d``; depth 2, mlp ``fs * 2**i``, attention downsample 2, zero
  positional encoding) with the text tokens as queries and the flattened voxels as keys, applied to every scale
  *after* the whole encoder has run (contextunet.py:272-273, ``interactive_alignment`` 221-247); the updated voxel
  features replace the skip (and bottleneck) features the decoders read (contextunet.py:276-279);
* decoder: 4 x ``UnetrUpBlock`` (transposed conv x2, concat skip, conv block): a residual block in the first
  (8fs -> 4fs, ``res_block=True``, contextunet.py:130-134), a plain ``UnetBasicBlock`` in the other three (no
  ``res_block`` argument, contextunet.py:136-152, whose default is False, model/modules.py:144 and 171-188); then a
  transposed conv x2 to 2 output channels (background, target) at full resolution (``UnetOutUpBlock``,
  contextunet.py:155-158, modules.py:198-219).

``wiring="fused_chain"`` is this package's first variant, kept so that its checkpoints (and the demo, where it is
chosen) rebuild as trained: each scale's fused output feeds the next encoder block, and all four decoders use
residual blocks. ``use_text=False`` gives the image-only ablation: the same UNet with the fusion skipped.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
from monai.networks.blocks import UnetrBasicBlock, UnetrUpBlock
from monai.networks.nets.vista3d import Attention, PositionEmbeddingRandom, TwoWayTransformer
from torch import nn

from nbsupport.spec import ModelSpec

SEG_TOKEN = "<SEG>"
TextEncoderKind = Literal["sentence", "causal", "tiny_sentence", "tiny_causal"]
Wiring = Literal["llmseg", "fused_chain"]
WIRINGS = ("llmseg", "fused_chain")


# ============================================================================================ spec
@dataclasses.dataclass(frozen=True)
class LLMSegSpec(ModelSpec):
    """Everything needed to rebuild a trained network (written as ``model_spec.json`` next to its checkpoints).

    The JSON and fingerprint are those of the specs the first release wrote (one line, sorted keys): the ``roi``
    only sets the inference window, so it is not fingerprinted; ``text_readout`` and ``wiring`` came later and are
    left out while they hold the value the earlier specs implied (``"mean"``, ``"fused_chain"``), and read back as it
    where a file lacks them (pinned by ``tests/test_spec_fingerprints.py``).
    """

    JSON_INDENT = None
    NOT_FINGERPRINTED = ("roi",)
    LATER_FIELDS = {"text_readout": "mean", "wiring": "fused_chain"}

    feature_size: int = 48
    n_prompts: int = 2
    context_length: int = 8
    num_heads: int = 8
    fusion_depth: int = 2
    use_text: bool = True
    text_encoder: TextEncoderKind = "causal"
    text_encoder_path: str = ""  # local folder / alias of the frozen encoder ("" for the tiny random-init ones)
    roi: tuple[int, int, int] = (64, 352, 352)  # (D, H, W) voxels of one sliding-window patch
    max_report_tokens: int = 120  # public code: 128 positions in all, context included
    # Our addition (not in the public code): subtract the empty report's text tokens, so that what differs between
    # reports (side, surgery, N) is not a few percent of a large shared component. Off in ``full``.
    center_text: bool = False
    # Positional encoding of the voxels in the fusion: "zeros" as the public code (image_pe = 0); "random" adds SAM's
    # random Fourier features (MONAI's PositionEmbeddingRandom), so a text token can attend to one side of the patch.
    image_pe: str = "zeros"
    # Which hidden state of a sentence encoder is the report feature: "mean" (attention-masked mean, the pooling the
    # sentence encoder was trained with) or "last_word" (the report's last token before [SEP], where the public
    # code's causal <SEG> feature sits; our addition). In "N0, cT2, breast conserving surgery, left side" the mean is
    # dominated by the three surgery tokens (the side is 3 % of its variance over reports, the last word's 55 %).
    text_readout: str = "mean"
    # "tokens" (our addition): no readout at all; the fusion's text tokens are the encoder's per-token hidden states of
    # the report (each prompt: report tokens + [SEP], as seen through that prompt's context), padding masked out of the
    # two-way attention, so the side word is a token of its own (92 % of its variance over reports is the side).
    # "llmseg": the public code's network (encode every scale, then fuse each; a residual block in the first decoder
    # only). "fused_chain": this package's first variant (each fused scale feeds the next encoder block; residual
    # blocks in all four decoders), what every spec written before this field rebuilds as.
    wiring: Wiring = "llmseg"


# ============================================================================================ text encoders
class ReportTokens(NamedTuple):
    """Per-token text input of the fusion: ``tokens (B, K, hidden)`` and ``mask (B, K)`` (True = a real token)."""

    tokens: torch.Tensor
    mask: torch.Tensor


class ReportEncoder(nn.Module):
    """Frozen text encoder with learnable context prompts: reports -> text tokens ``(B, n_prompts, hidden)``.

    For each prompt p the input embeddings are ``[first special token] + contexts[p] (context_length) + report
    tokens``; the frozen encoder runs on them and one feature per sequence is read out:

    * ``causal`` (Llama, SmolLM2, ...): the last hidden state at the ``<SEG>`` token appended to every report,
      as the public code does (causal mask, so ``<SEG>`` sees the context and the whole report);
    * ``sentence`` (BERT-style, e.g. all-MiniLM-L6-v2): ``readout="mean"``: attention-masked mean of the last
      hidden states, the pooling the sentence encoder was trained with (a bidirectional encoder has no natural
      ``<SEG>`` position); ``readout="last_word"``: the last hidden state of the report's last token (before
      ``[SEP]``), at the end of the report as the causal ``<SEG>`` feature is (it still sees the whole report).

    Gradients flow through the frozen encoder into ``contexts`` only. Nothing is cached: the contexts change at
    every step, so every forward pass runs the encoder (cheap for MiniLM; for a 7B LLM use a GPU).
    """

    def __init__(self, backbone: nn.Module, tokenizer: Any, kind: Literal["sentence", "causal"], n_prompts: int,
                 context_length: int, max_report_tokens: int = 120, readout: str = "mean"):
        super().__init__()
        if readout not in ("mean", "last_word", "tokens") or (kind == "causal" and readout != "mean"):
            raise ValueError(f"readout must be 'mean', 'last_word' or 'tokens' (sentence encoders only), got "
                             f"{readout!r} for a {kind} encoder")
        self.kind = kind
        self.readout = readout
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.max_report_tokens = max_report_tokens
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        hidden = self.embedding_layer().embedding_dim
        self.hidden_size = hidden
        # Public code: torch.randn(n_prompts, context_length, hidden); scaled to the embedding table's spread so a
        # small encoder is not swamped by unit-variance prompts.
        scale = float(self.embedding_layer().weight.detach().float().std())
        self.contexts = nn.Parameter(torch.randn(n_prompts, context_length, hidden) * scale)
        if kind == "causal":
            self.seg_token_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)

    def train(self, mode: bool = True) -> ReportEncoder:
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout, whatever the outer module's mode
        return self

    def embedding_layer(self) -> nn.Embedding:
        return self.backbone.get_input_embeddings()

    def _token_ids(self, reports: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Report token ids ``(B, T)`` right-padded and their mask, without the leading special token."""
        texts = [f"{r} {SEG_TOKEN}" if self.kind == "causal" else r for r in reports]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_report_tokens + 1,
                             return_tensors="pt", add_special_tokens=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        first = self._first_token_id()
        if first is not None and bool((ids[:, 0] == first).all()):
            ids, mask = ids[:, 1:], mask[:, 1:]  # the first special token is put back in front of the contexts
        if self.kind == "causal":
            for row, (r_ids, r_mask) in enumerate(zip(ids, mask)):
                # truncation may have cut <SEG>: the feature position must hold it
                last = int(r_mask.sum()) - 1
                r_ids[last] = self.seg_token_id
        return ids, mask

    def _first_token_id(self) -> int | None:
        tok = self.tokenizer
        return tok.cls_token_id if self.kind == "sentence" else tok.bos_token_id

    def forward(self, reports: Sequence[str]) -> torch.Tensor | ReportTokens:
        """Text tokens ``(B, n_prompts, hidden)`` for B report strings; ``readout="tokens"``: ``ReportTokens`` with
        ``(B, n_prompts * T, hidden)`` (prompt-major; T report tokens incl. [SEP], padding masked)."""
        device = self.contexts.device
        ids, mask = self._token_ids(reports)
        ids, mask = ids.to(device), mask.to(device)
        b, p, length = ids.shape[0], self.contexts.shape[0], self.contexts.shape[1]
        embed = self.embedding_layer()
        report_embeds = embed(ids)  # (B, T, H)
        first = self._first_token_id()
        parts_mask = [mask.new_ones(b, length), mask]
        if first is not None:
            first_embed = embed(torch.full((b, 1), first, device=device, dtype=torch.long))
            parts_mask.insert(0, mask.new_ones(b, 1))
        full_mask = torch.cat(parts_mask, dim=1)  # (B, 1 + L + T)
        # all B x P sequences in one encoder call, prompt-major: row k * B + i is report i with prompt k
        ctx = self.contexts.to(report_embeds.dtype).unsqueeze(1).expand(p, b, length, -1).reshape(p * b, length, -1)
        pieces = [ctx, report_embeds.repeat(p, 1, 1)]
        if first is not None:
            pieces.insert(0, first_embed.repeat(p, 1, 1))
        full_mask = full_mask.repeat(p, 1)
        out = self._backbone_hidden(torch.cat(pieces, dim=1), full_mask)  # (P*B, S, H)
        if self.kind == "causal":
            # right padding: <SEG> is the last unmasked position (public code: argmax(ids) + context_length)
            seg_pos = full_mask.sum(1) - 1
            feats = out[torch.arange(p * b, device=device), seg_pos]
        elif self.readout == "tokens":
            start = full_mask.shape[1] - ids.shape[1]  # report tokens follow [CLS] + context
            per_token = out[:, start:].reshape(p, b, ids.shape[1], -1).transpose(0, 1)  # (B, P, T, H)
            token_mask = mask.bool().unsqueeze(1).expand(b, p, ids.shape[1])
            return ReportTokens(per_token.reshape(b, p * ids.shape[1], -1).float(), token_mask.reshape(b, -1))
        elif self.readout == "last_word":
            # right padding: [SEP] is the last unmasked position, the report's last word just before it (an empty
            # report reads the last context embedding's state)
            word_pos = (full_mask.sum(1) - 2).clamp(min=0)
            feats = out[torch.arange(p * b, device=device), word_pos]
        else:
            m = full_mask.unsqueeze(-1).to(out.dtype)
            feats = (out * m).sum(1) / m.sum(1).clamp(min=1e-6)
        return feats.reshape(p, b, -1).transpose(0, 1).float()

    def _backbone_hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        body = self.backbone.model if self.kind == "causal" and hasattr(self.backbone, "model") else self.backbone
        return body(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state

    @torch.no_grad()
    def encoder_attentions(self, report: str) -> tuple[list[str], tuple[torch.Tensor, ...]]:
        """Self-attention of the frozen encoder over one report's own tokens (no contexts), for bertviz.

        Returns:
            (tokens, attentions) with attentions one ``(1, heads, T, T)`` tensor per layer.
        """
        text = f"{report} {SEG_TOKEN}" if self.kind == "causal" else report
        enc = self.tokenizer([text], return_tensors="pt").to(self.contexts.device)
        body = self.backbone.model if self.kind == "causal" and hasattr(self.backbone, "model") else self.backbone
        previous = body.config._attn_implementation
        body.config._attn_implementation = "eager"  # SDPA returns no attention weights
        try:
            out = body(**enc, output_attentions=True)
        finally:
            body.config._attn_implementation = previous
        tokens = self.tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
        return tokens, tuple(a.detach().cpu() for a in out.attentions)


def build_report_encoder(spec: LLMSegSpec, seed: int = 0) -> ReportEncoder:
    """The frozen text encoder named by ``spec`` (``sentence``/``causal`` load local weights; ``tiny_*`` are
    random-init models with a real tokenizer, for smoke tests)."""
    from nbsupport import models

    kind = spec.text_encoder
    if kind in ("sentence", "tiny_sentence"):
        if kind == "sentence":
            backbone, tokenizer = models.load_text_encoder(spec.text_encoder_path or models.MINILM_ALIAS)
        else:
            backbone, tokenizer = tiny_sentence_encoder(seed)
        return ReportEncoder(backbone, tokenizer, "sentence", spec.n_prompts, spec.context_length,
                             spec.max_report_tokens, readout=spec.text_readout)
    if kind == "causal":
        backbone, tokenizer = models.load_causal_lm(spec.text_encoder_path or models.SMOLLM2_ALIAS)
    else:
        backbone, tokenizer = models.tiny_causal_lm(seed=seed)
    add_seg_token(backbone, tokenizer)
    return ReportEncoder(backbone, tokenizer, "causal", spec.n_prompts, spec.context_length, spec.max_report_tokens,
                         readout=spec.text_readout)


def add_seg_token(model: Any, tokenizer: Any) -> int:
    """Add ``<SEG>`` as a special token (public code: embeddings resized to the new vocabulary); returns its id."""
    if SEG_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [SEG_TOKEN]})
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return int(tokenizer.convert_tokens_to_ids(SEG_TOKEN))


def tiny_sentence_encoder(seed: int = 0, hidden_size: int = 64) -> tuple[nn.Module, Any]:
    """A random-init 2-layer BERT with MiniLM's tokenizer: same code path as MiniLM, ~2 M parameters."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from nbsupport.models import MINILM_ALIAS, resolve_pretrained

    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(MINILM_ALIAS, "tokenizer"), local_files_only=True)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=hidden_size * 2, max_position_embeddings=256)
    torch.manual_seed(seed)
    return BertModel(config, add_pooling_layer=False).eval(), tokenizer


# ============================================================================================ segmentation net
class FusedAttention(Attention):
    """MONAI's (SAM's) attention computed by torch's fused ``scaled_dot_product_attention`` (the same function of the
    same parameters, so checkpoints are interchangeable, without materialising the scaled score matrix of every
    voxel), with an optional key padding mask set by ``LLMSeg.fuse`` for one call: ``key_mask`` ``(B, N_keys)``,
    True = attend."""

    key_mask: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        mask = None if self.key_mask is None else self.key_mask[:, None, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(self._recombine_heads(out))


def _fused_attentions(block: TwoWayTransformer) -> list[FusedAttention]:
    """Turn every attention of ``block`` into a ``FusedAttention``; returns those whose keys are text tokens (token
    self-attention, voxel->token), the ones a text padding mask applies to."""
    text_keyed = []
    for layer in block.layers:
        for attn in (layer.self_attn, layer.cross_attn_token_to_image, layer.cross_attn_image_to_token):
            attn.__class__ = FusedAttention
        text_keyed += [layer.self_attn, layer.cross_attn_image_to_token]
    block.final_attn_token_to_image.__class__ = FusedAttention
    return text_keyed


def _heads_for(channels: int, wanted: int, downsample: int = 2) -> int:
    """Largest head count <= ``wanted`` dividing the attention's internal width (channels / downsample)."""
    inner = max(1, channels // downsample)
    return max(h for h in range(1, wanted + 1) if inner % h == 0)


class LLMSeg(nn.Module):
    """Text-guided 3-D UNet. ``forward(image (B, 1, D, H, W), reports: list[str]) -> logits (B, 2, D, H, W)``.

    D, H and W must be multiples of 32 (five stride-2 stages).
    """

    def __init__(self, spec: LLMSegSpec, text_encoder: ReportEncoder | None):
        super().__init__()
        self.spec = spec
        fs = spec.feature_size
        chans = [fs, fs, 2 * fs, 4 * fs, 8 * fs]
        self.channels = chans
        ins = [1] + chans[:-1]
        self.encoders = nn.ModuleList(
            UnetrBasicBlock(3, ins[i], chans[i], kernel_size=3, stride=2, norm_name="instance", res_block=True)
            for i in range(5))
        self.text_encoder = text_encoder if spec.use_text else None
        if self.text_encoder is not None:
            hidden = self.text_encoder.hidden_size
            self.text_proj = nn.ModuleList(nn.Linear(hidden, c) for c in chans)
            self.fusion = nn.ModuleList(
                TwoWayTransformer(depth=spec.fusion_depth, embedding_dim=c, mlp_dim=fs * 2 ** i,
                                  num_heads=_heads_for(c, spec.num_heads), attention_downsample_rate=2)
                for i, c in enumerate(chans))
            self._masked = [_fused_attentions(block) for block in self.fusion]
            if spec.text_readout == "tokens" and spec.center_text:
                raise ValueError("center_text needs one token per prompt; it does not apply to text_readout='tokens'")
            if spec.image_pe == "random":
                self.position = nn.ModuleList(PositionEmbeddingRandom(c // 2) for c in chans)
            elif spec.image_pe != "zeros":
                raise ValueError(f"image_pe must be 'zeros' or 'random', got {spec.image_pe!r}")
        if spec.wiring not in WIRINGS:
            raise ValueError(f"wiring must be one of {WIRINGS}, got {spec.wiring!r}")
        # decoder: 8fs->4fs (+skip 4fs), 4fs->2fs (+2fs), 2fs->fs (+fs), fs->fs (+fs), then x2 to 2 classes; the
        # public code's first decoder alone has a residual block (contextunet.py:130-152)
        residual = (True, True, True, True) if spec.wiring == "fused_chain" else (True, False, False, False)
        self.decoders = nn.ModuleList(
            UnetrUpBlock(3, chans[i], chans[i - 1], kernel_size=3, upsample_kernel_size=2, norm_name="instance",
                         res_block=res) for i, res in zip(range(4, 0, -1), residual))
        self.out = nn.ConvTranspose3d(fs, 2, kernel_size=2, stride=2)

    def encode_reports(self, reports: Sequence[str]) -> torch.Tensor | ReportTokens | None:
        """Text tokens ``(B, n_prompts, hidden)`` (``ReportTokens`` for ``text_readout="tokens"``), or None for the
        image-only model."""
        if self.text_encoder is None:
            return None
        if not self.spec.center_text:
            return self.text_encoder(reports)
        tokens = self.text_encoder(list(reports) + [""])
        return tokens[:-1] - tokens[-1:]

    def fuse(self, scale: int, features: torch.Tensor, text: torch.Tensor | ReportTokens) -> torch.Tensor:
        """Two-way attention between text tokens and the voxels of one scale; returns updated voxel features."""
        mask = None
        if isinstance(text, ReportTokens):
            text, mask = text
        tokens = self.text_proj[scale](text)  # (B, P, C)
        if self.spec.image_pe == "random":
            pe = self.position[scale](tuple(features.shape[2:])).to(features.dtype).unsqueeze(0).expand_as(features)
        else:
            pe = torch.zeros_like(features)
        if mask is None:
            _, keys = self.fusion[scale](features, pe, tokens)  # keys: (B, N, C)
        else:
            for attn in self._masked[scale]:
                attn.key_mask = mask
            try:
                _, keys = self.fusion[scale](features, pe, tokens)
            finally:
                for attn in self._masked[scale]:
                    attn.key_mask = None
        return keys.transpose(1, 2).reshape(features.shape)

    def segment(self, image: torch.Tensor, text: torch.Tensor | ReportTokens | None) -> torch.Tensor:
        """Logits ``(B, 2, D, H, W)`` given precomputed text tokens (broadcast over a sliding-window batch)."""
        if isinstance(text, ReportTokens):
            if text.tokens.shape[0] != image.shape[0] and text.tokens.shape[0] == 1:
                text = ReportTokens(text.tokens.expand(image.shape[0], -1, -1), text.mask.expand(image.shape[0], -1))
        elif text is not None and text.shape[0] != image.shape[0]:
            text = text.expand(image.shape[0], -1, -1) if text.shape[0] == 1 else text
        chained = text is not None and self.spec.wiring == "fused_chain"
        skips = []
        x = image
        for i, enc in enumerate(self.encoders):
            x = self.fuse(i, enc(x), text) if chained else enc(x)
            skips.append(x)
        if text is not None and not chained:  # LLMSeg: the encoder ran on unfused features; now fuse every scale
            skips = [self.fuse(i, features, text) for i, features in enumerate(skips)]
        x = skips[-1]
        for dec, skip in zip(self.decoders, reversed(skips[:-1])):
            x = dec(x, skip)
        return self.out(x)

    def forward(self, image: torch.Tensor, reports: Sequence[str] | None = None) -> torch.Tensor:
        text = None if self.text_encoder is None else self.encode_reports(list(reports or [""] * image.shape[0]))
        return self.segment(image, text)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def build_llmseg(spec: LLMSegSpec, seed: int = 0) -> LLMSeg:
    """The network of ``spec`` with its frozen text encoder loaded (nothing is downloaded)."""
    if any(r % 32 for r in spec.roi):
        raise ValueError(f"roi {spec.roi} must be divisible by 32 in every dimension (five stride-2 stages)")
    if max(spec.roi) < 64:
        # instance norm at 1/32 needs more than one voxel
        raise ValueError(f"roi {spec.roi}: at least one side must be >= 64 (the 1/32 scale needs > 1 voxel)")
    encoder = build_report_encoder(spec, seed) if spec.use_text else None
    torch.manual_seed(seed)
    return LLMSeg(spec, encoder)


def voxels_per_scale(shape: Sequence[int]) -> list[int]:
    """Number of voxels the fusion attends over at each of the 5 scales of an input of ``shape`` (D, H, W)."""
    return [math.prod(s // 2 ** (i + 1) for s in shape) for i in range(5)]
