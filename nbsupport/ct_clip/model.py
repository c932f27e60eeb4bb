"""CT-CLIP-style model: a 3-D image encoder, a text encoder loaded by path, projections, SigLIP or CLIP loss.

As in CT-Data (the seed): both towers end in ``LayerNorm + Linear`` projections to a shared space and the loss is
SigLIP's pairwise sigmoid loss with a learnable ``logit_scale`` (init 10, stored as its log) and ``logit_bias``
(init -10). CT-CLIP's softmax (InfoNCE) loss over both directions is the alternative (``loss="clip"``).

Image encoders (``image_arch``):

* ``resnet``: an I3ResNet-like 3-D CNN (basic residual blocks, four stages, stride 2 each) - Merlin's family;
* ``vit``: a 3-D ViT over ``vit_patch`` cubes (CT-ViT-like) with a [CLS] token.

Text encoders: any transformers ``AutoModel`` folder or hub id in the local cache (the packaged all-MiniLM-L6-v2
in ``demo``; an LLM such as LLM2Vec's Llama in ``full``), or ``"tiny"``: a random-init 2-layer BERT with
MiniLM's tokenizer for smoke runs. Pooling: ``mean`` over the report's tokens, ``sentence_mean`` (the mean of the
report's per-sentence mean-pooled embeddings, so a one-sentence zero-shot prompt lives in the same space as a
report), or ``latent_attention`` (LLM2Vec / NV-Embed: token states cross-attend to a trainable latent array, then
mean). ``text_tuning``: ``frozen`` (embeddings cached once), ``lora`` (peft, r/alpha/dropout as the seed's
32/32/0.1 by default) or ``full``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from nbsupport.spec import ModelSpec

ImageArch = Literal["resnet", "vit"]
TextPooling = Literal["mean", "sentence_mean", "latent_attention"]
TextTuning = Literal["frozen", "lora", "full"]
LossKind = Literal["siglip", "clip"]
TINY_TEXT_ENCODER = "tiny"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclasses.dataclass(frozen=True)
class CTClipSpec(ModelSpec):
    """Everything needed to rebuild the network; stored next to its checkpoints as ``model_spec.json`` (indented,
    sorted keys: ModelSpec's defaults, which are the JSON the first ct_clip checkpoints were written with)."""

    input_size: tuple[int, int, int] = (224, 224, 160)  # model input (R, A, S) voxels
    image_arch: str = "resnet"
    image_width: int = 64  # resnet: channels of the first stage (doubling per stage)
    image_blocks: tuple[int, ...] = (2, 2, 2, 2)  # resnet: residual blocks per stage
    vit_patch: tuple[int, int, int] = (16, 16, 16)
    vit_dim: int = 512
    vit_depth: int = 6
    vit_heads: int = 8
    text_encoder: str = "all-minilm-l6-v2"
    text_pooling: str = "mean"
    text_tuning: str = "frozen"
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    max_text_length: int = 256
    embed_dim: int = 512
    loss: str = "siglip"


# ============================================================================================ image encoders
class BasicBlock3D(nn.Module):
    """Two 3x3x3 convolutions with a residual connection (ResNet basic block, inflated to 3-D)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(c_out)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv3d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm3d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x), inplace=True)


class ResNet3DEncoder(nn.Module):
    """I3ResNet-like encoder: (B, 1, X, Y, Z) -> feature map (B, C, X/2^(1+stages), ...) -> pooled (B, 2C).

    Pooling concatenates the spatial mean and max: a finding of a few voxels (a nodule, a pacemaker) barely moves
    the mean of a whole chest but sets the max of the channels that detect it.
    """

    def __init__(self, width: int, blocks: Sequence[int]):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(1, width, 5, 2, 2, bias=False), nn.BatchNorm3d(width),
                                  nn.ReLU(inplace=True))
        stages, c_in = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2 ** i
            stages.append(nn.Sequential(*[BasicBlock3D(c_in if b == 0 else c_out, c_out, 2 if b == 0 else 1)
                                          for b in range(n)]))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.out_dim = 2 * c_in

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([features.mean(dim=(2, 3, 4)), features.amax(dim=(2, 3, 4))], dim=1)


class ViT3DEncoder(nn.Module):
    """CT-ViT-like encoder: non-overlapping 3-D patches, learned positions, [CLS] token, pre-norm transformer.

    ``feature_map`` returns the patch tokens as a grid (B, D, gx, gy, gz) with the [CLS] token kept in
    ``self.last_cls``; ``pool`` returns that [CLS] token after the final LayerNorm.
    """

    def __init__(self, input_size: Sequence[int], patch: Sequence[int], dim: int, depth: int, heads: int):
        super().__init__()
        if any(s % p for s, p in zip(input_size, patch)):
            raise ValueError(f"input_size {tuple(input_size)} must be a multiple of vit_patch {tuple(patch)}")
        self.grid = tuple(s // p for s, p in zip(input_size, patch))
        self.embed = nn.Conv3d(1, dim, kernel_size=tuple(patch), stride=tuple(patch))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + math.prod(self.grid), dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 4, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim
        self.last_cls: torch.Tensor | None = None

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos
        tokens = self.norm(self.blocks(tokens))
        self.last_cls = tokens[:, 0]
        return tokens[:, 1:].transpose(1, 2).reshape(len(x), -1, *self.grid)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        assert self.last_cls is not None, "feature_map must run first"
        return self.last_cls


# ============================================================================================ text encoder
def split_sentences(text: str) -> list[str]:
    """Report sentences (split after . ! ?); the whole text when it has no sentence end."""
    parts = [p.strip() for p in _SENTENCE_END.split(text.strip()) if p.strip()]
    return parts or [text.strip() or "."]


class LatentAttentionPooling(nn.Module):
    """NV-Embed / LLM2Vec latent-attention pooling: token states query a trainable latent array, MLP, mean."""

    def __init__(self, dim: int, num_latents: int = 64, heads: int = 8):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * dim ** -0.5)
        self.attention = nn.MultiheadAttention(dim, heads if dim % heads == 0 else 1, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        latents = self.latents.to(hidden.dtype).expand(len(hidden), -1, -1)
        out, _ = self.attention(hidden, latents, latents)  # tokens are the queries
        out = out + self.mlp(out)
        m = mask.unsqueeze(-1).to(out.dtype)
        return (out * m).sum(1) / m.sum(1).clamp(min=1e-9)


def build_text_backbone(name_or_path: str, seed: int = 0) -> tuple[nn.Module, Any]:
    """(transformers encoder, tokenizer): ``"tiny"`` = random-init 2-layer BERT with MiniLM's tokenizer."""
    from nbsupport.models import MINILM_ALIAS, load_text_encoder, resolve_pretrained

    if name_or_path == TINY_TEXT_ENCODER:
        from transformers import AutoTokenizer, BertConfig, BertModel

        tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(MINILM_ALIAS, "tokenizer"),
                                                  local_files_only=True)
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128, max_position_embeddings=512)
        torch.manual_seed(seed)
        return BertModel(config).eval(), tokenizer
    return load_text_encoder(name_or_path, device="cpu")


class TextEncoder(nn.Module):
    """Report text -> pooled embedding (B, hidden), by the spec's pooling and tuning."""

    def __init__(self, spec: CTClipSpec, seed: int = 0):
        super().__init__()
        backbone, self.tokenizer = build_text_backbone(spec.text_encoder, seed)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.hidden = int(backbone.config.hidden_size)
        self.pooling = spec.text_pooling
        self.max_length = spec.max_text_length
        if spec.text_tuning == "lora":
            from peft import LoraConfig, get_peft_model

            names = {n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, nn.Linear)}
            targets = sorted(names & {"q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "query", "key", "value"})
            backbone = get_peft_model(backbone, LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha,
                                                           lora_dropout=spec.lora_dropout, target_modules=targets))
        elif spec.text_tuning == "frozen":
            backbone.requires_grad_(False)
        self.backbone = backbone
        self.latent = LatentAttentionPooling(self.hidden) if spec.text_pooling == "latent_attention" else None
        self.frozen = spec.text_tuning == "frozen" and self.latent is None

    def _token_states(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.backbone.parameters()).device
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(device)
        hidden = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return hidden, batch["attention_mask"]

    def _mean(self, texts: Sequence[str]) -> torch.Tensor:
        hidden, mask = self._token_states(texts)
        if self.latent is not None:
            return self.latent(hidden, mask)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def forward(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(B, hidden) float32 embeddings of ``texts`` (no gradient into a frozen backbone)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.pooling != "sentence_mean":
                return torch.cat([self._mean(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])
            sentences = [split_sentences(t) for t in texts]
            # Reports repeat sentences ("No pleural effusion.", the normal findings): each distinct one is encoded
            # once (padding is masked, so a sentence's embedding does not depend on its batch mates).
            unique = list(dict.fromkeys(s for group in sentences for s in group))
            position = {s: i for i, s in enumerate(unique)}
            encoded = torch.cat([self._mean(unique[i:i + batch_size]) for i in range(0, len(unique), batch_size)])
            index = torch.tensor([position[s] for group in sentences for s in group], device=encoded.device)
            embedded = encoded[index]
            counts = torch.tensor([len(g) for g in sentences], device=embedded.device)
            owner = torch.repeat_interleave(torch.arange(len(texts), device=embedded.device), counts)
            summed = torch.zeros(len(texts), embedded.shape[1], dtype=embedded.dtype,
                                 device=embedded.device).index_add_(0, owner, embedded)
            return summed / counts.to(embedded.dtype)[:, None]


# ============================================================================================ the model
class CTClip(nn.Module):
    """Image tower + text tower + projections + the loss's temperature (and bias).

    ``forward(image, text_features)`` takes text embeddings already pooled by :class:`TextEncoder` (cached for a
    frozen text tower) and returns L2-normalised (image, text) embeddings of size ``spec.embed_dim``.
    """

    def __init__(self, spec: CTClipSpec, seed: int = 0):
        super().__init__()
        self.spec = spec
        if spec.image_arch == "resnet":
            self.image_encoder: nn.Module = ResNet3DEncoder(spec.image_width, spec.image_blocks)
        elif spec.image_arch == "vit":
            self.image_encoder = ViT3DEncoder(spec.input_size, spec.vit_patch, spec.vit_dim, spec.vit_depth,
                                              spec.vit_heads)
        else:
            raise ValueError(f"image_arch must be 'resnet' or 'vit', got {spec.image_arch!r}")
        self.text_encoder = TextEncoder(spec, seed)
        self.image_projection = nn.Sequential(nn.LayerNorm(self.image_encoder.out_dim),
                                              nn.Linear(self.image_encoder.out_dim, spec.embed_dim))
        self.text_projection = nn.Sequential(nn.LayerNorm(self.text_encoder.hidden),
                                             nn.Linear(self.text_encoder.hidden, spec.embed_dim))
        if spec.loss == "siglip":
            self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        elif spec.loss == "clip":
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            self.register_buffer("logit_bias", torch.tensor(0.0))
        else:
            raise ValueError(f"loss must be 'siglip' or 'clip', got {spec.loss!r}")

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) in 0..1 -> (B, embed_dim), unit length."""
        encoder = self.image_encoder
        return F.normalize(self.image_projection(encoder.pool(encoder.feature_map(image))), dim=-1)

    def project_text(self, text_features: torch.Tensor) -> torch.Tensor:
        """(B, hidden) pooled text -> (B, embed_dim), unit length."""
        return F.normalize(self.text_projection(text_features.float()), dim=-1)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.project_text(self.text_encoder(texts))

    def forward(self, image: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(image), self.project_text(text_features)

    def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """(B_img, B_txt) scaled cosine similarities (+ bias for SigLIP)."""
        return self.logit_scale.exp().clamp(max=100) * image_emb @ text_emb.T + self.logit_bias


def siglip_loss(logits: torch.Tensor) -> torch.Tensor:
    """SigLIP: every (image, text) pair is a binary problem, matched (diagonal) vs not; sum over texts, mean
    over images (Zhai et al. 2023, the seed's loss)."""
    labels = 2 * torch.eye(len(logits), device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / len(logits)


def clip_loss(logits: torch.Tensor) -> torch.Tensor:
    """CLIP / CT-CLIP: softmax cross-entropy image->text and text->image, averaged."""
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def contrastive_loss(model: CTClip, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """The spec's loss on a batch of matched (image, text) embeddings."""
    logits = model.logits(image_emb, text_emb)
    return siglip_loss(logits) if model.spec.loss == "siglip" else clip_loss(logits)


def report_features(model: CTClip, reports: list[str]) -> torch.Tensor:
    """(N, hidden) pooled text features of ``reports``, computed once per unique text (no gradient)."""
    unique = list(dict.fromkeys(reports))
    with torch.no_grad():
        feats = model.text_encoder(unique)
    index = {t: i for i, t in enumerate(unique)}
    return feats[torch.tensor([index[t] for t in reports])]
