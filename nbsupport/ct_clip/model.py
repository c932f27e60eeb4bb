"""CT-CLIP-style model: a 3-D image encoder, a text encoder loaded by path, projections, SigLIP or CLIP loss.

As in CT-Data (the seed): both towers end in ``LayerNorm + Linear`` projections to a shared space and the loss is
SigLIP's pairwise sigmoid loss with a learnable ``logit_scale`` (init 10, stored as its log) and ``logit_bias``
(init -10). CT-CLIP's softmax (InfoNCE) loss over both directions is the alternative (``loss="clip"``). With several
training processes both losses see every process's features (gathered with their gradient), as the seed's do.

Image encoders (``image_arch``):

* ``i3resnet``: Merlin's I3ResNet (inflated ResNet-152, 2048-d), the seed's, optionally with Merlin's published
  weights (``image_weights``; :mod:`nbsupport.ct_clip.i3resnet`);
* ``resnet``: a small I3ResNet-like 3-D CNN (basic residual blocks, four stages, stride 2 each) for CPU profiles;
* ``vit``: a 3-D ViT over ``vit_patch`` cubes (CT-ViT-like) with a [CLS] token.

Text encoders: a Llama folder (the seed's ``LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned``) becomes LLM2Vec -
bidirectional, pooled over the report's tokens, optionally with llm2vec4cxr's weights (``text_encoder_weights``;
:mod:`nbsupport.ct_clip.llm2vec`); any other transformers ``AutoModel`` folder or cached hub id (the packaged
all-MiniLM-L6-v2 in ``demo``), or ``"tiny"``: a random-init 2-layer BERT with MiniLM's tokenizer for smoke runs.
Pooling: ``mean`` over the report's tokens, ``sentence_mean`` (the mean of the report's per-sentence mean-pooled
embeddings, so a one-sentence zero-shot prompt lives in the same space as a report), or ``latent_attention``
(LLM2Vec's: token states attend to 512 trainable latents, MLP, mean). ``text_tuning``: ``frozen`` (embeddings
cached once), ``lora`` (peft, r/alpha/dropout as the seed's 32/32/0.1 by default; on an LLM2Vec tower the seed's
q/k/v projections, the pooling frozen) or ``full``.
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

from nbsupport.ct_clip.i3resnet import MERLIN_DOWNLOAD, I3ResNet, load_merlin_weights
from nbsupport.ct_clip.llm2vec import (LLM2VEC4CXR_DOWNLOAD, LORA_TARGETS, LatentAttentionPooling,
                                       is_bidirectional_folder, load_llm2vec)
from nbsupport.spec import ModelSpec, lora_spec

ImageArch = Literal["i3resnet", "resnet", "vit"]
TextPooling = Literal["mean", "sentence_mean", "latent_attention"]
TextTuning = Literal["frozen", "lora", "full"]
LossKind = Literal["siglip", "clip"]
TINY_TEXT_ENCODER = "tiny"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# sentence_mean encodes a batch's distinct sentences sorted by token count in chunks of this many: the demo's report
# sentences are 5-27 tokens, so chunks of 64 in report order were half padding (1,590 token positions for 810 tokens
# in a batch of 16 reports, 960 sorted in chunks of 16: benchmarks/RESULTS.md, ct_clip issue 23)
SENTENCE_CHUNK = 16


@dataclasses.dataclass(frozen=True)
class CTClipSpec(lora_spec(rank=32, alpha=32, dropout=0.1), ModelSpec):
    """Everything needed to rebuild the network; stored next to its checkpoints as ``model_spec.json`` (indented,
    sorted keys: ModelSpec's defaults, which are the JSON the first ct_clip checkpoints were written with)."""

    LATER_FIELDS = {"text_encoder_weights": "", "image_weights": ""}

    input_size: tuple[int, int, int] = (224, 224, 160)  # model input (R, A, S) voxels
    image_arch: str = "resnet"
    image_width: int = 64  # resnet / i3resnet: channels of the first stage (doubling per stage)
    image_blocks: tuple[int, ...] = (2, 2, 2, 2)  # resnet / i3resnet: residual blocks per stage
    vit_patch: tuple[int, int, int] = (16, 16, 16)
    vit_dim: int = 512
    vit_depth: int = 6
    vit_heads: int = 8
    text_encoder: str = "all-minilm-l6-v2"
    text_encoder_weights: str = ""  # an LLM2Vec tower's fine-tuned weights (llm2vec4cxr's pytorch_model.bin)
    image_weights: str = ""  # i3resnet: Merlin's published checkpoint
    text_pooling: str = "mean"
    text_tuning: str = "frozen"  # 'lora': the LoRA fields (first in the dataclass, from lora_spec) apply
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


def _is_llm2vec(name_or_path: str) -> bool:
    """Whether ``text_encoder`` names a Llama folder (or cached hub id), which the seed runs as LLM2Vec."""
    from nbsupport.models import MINILM_ALIAS, resolve_pretrained

    if name_or_path.lower() in (TINY_TEXT_ENCODER, MINILM_ALIAS):
        return False
    return is_bidirectional_folder(resolve_pretrained(name_or_path, "text_encoder"))


def _resolve_file(path: str, what: str, download: str) -> str | None:
    """The existing weight file a spec field names ('' = none), relative paths from the project root."""
    from nbsupport.paths import resolve_path

    if not path:
        return None
    resolved = resolve_path(path)
    if not resolved.is_file():
        raise FileNotFoundError(f"{what}: {resolved} does not exist. Download it on a machine with network access: "
                                f"{download}; or set {what}='' to train without it")
    return str(resolved)


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


def build_llm2vec_backbone(spec: CTClipSpec) -> nn.Module:
    """The seed's LLM2Vec tower from ``text_encoder`` (the base folder) and ``text_encoder_weights``; pooling
    ``latent_attention`` (the seed's) or ``mean`` (for ``mean`` and ``sentence_mean``)."""
    from nbsupport.models import resolve_pretrained
    from nbsupport.weights import WeightsMismatchError

    weights = _resolve_file(spec.text_encoder_weights, "text_encoder_weights", LLM2VEC4CXR_DOWNLOAD)
    pooling = "latent_attention" if spec.text_pooling == "latent_attention" else "mean"
    try:
        return load_llm2vec(resolve_pretrained(spec.text_encoder, "text_encoder"), weights, pooling,
                            spec.max_text_length, source=spec.text_encoder)
    except WeightsMismatchError as err:
        raise WeightsMismatchError(f"{err}\n(text_pooling={spec.text_pooling!r} builds LLM2Vec with "
                                   f"pooling_mode={pooling!r})") from err


class TextEncoder(nn.Module):
    """Report text -> pooled embedding (B, hidden), by the spec's pooling and tuning; a Llama ``text_encoder`` is the
    seed's LLM2Vec (pooling inside it), anything else a transformers encoder pooled here."""

    def __init__(self, spec: CTClipSpec, seed: int = 0):
        super().__init__()
        self.pooling = spec.text_pooling
        self.max_length = spec.max_text_length
        self.llm2vec = _is_llm2vec(spec.text_encoder)
        if spec.text_encoder_weights and not self.llm2vec:
            raise ValueError(f"text_encoder_weights={spec.text_encoder_weights!r} needs an LLM2Vec text_encoder (a "
                             f"Llama folder such as LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned); "
                             f"{spec.text_encoder!r} is not one")
        if self.llm2vec:
            backbone: nn.Module = build_llm2vec_backbone(spec)
            self.tokenizer = backbone.tokenizer
            self.hidden = int(backbone.config.hidden_size)
        else:
            backbone, self.tokenizer = build_text_backbone(spec.text_encoder, seed)
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.hidden = int(backbone.config.hidden_size)
        if spec.text_tuning == "lora":
            backbone = self._add_lora(backbone, spec)
        elif spec.text_tuning == "frozen":
            backbone.requires_grad_(False)
        self.backbone = backbone
        self.latent = LatentAttentionPooling(self.hidden) if spec.text_pooling == "latent_attention" \
            and not self.llm2vec else None
        self.frozen = spec.text_tuning == "frozen" and self.latent is None

    def _add_lora(self, backbone: nn.Module, spec: CTClipSpec) -> nn.Module:
        """LoRA on the attention projections (peft). An LLM2Vec tower as the seed: the seed's target names inside the
        Llama, everything else (the latent-attention pooling too) frozen (CT-Data ``training/main.py:206-253``)."""
        from peft import get_peft_model

        inner = backbone.model if self.llm2vec else backbone
        names = {n.rsplit(".", 1)[-1] for n, m in inner.named_modules() if isinstance(m, nn.Linear)}
        wanted = LORA_TARGETS if self.llm2vec else ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "query",
                                                    "key", "value")
        config = spec.lora_config(target_modules=sorted(names & set(wanted)))
        if not self.llm2vec:
            return get_peft_model(backbone, config)
        backbone.requires_grad_(False)
        backbone.model = get_peft_model(backbone.model, config)
        return backbone

    def _token_states(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.backbone.parameters()).device
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(device)
        hidden = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return hidden, batch["attention_mask"]

    def _mean(self, texts: Sequence[str]) -> torch.Tensor:
        if self.llm2vec:
            return self.backbone.embed(texts)
        hidden, mask = self._token_states(texts)
        if self.latent is not None:
            return self.latent(hidden, mask)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def _sentence_chunks(self, sentences: list[str], batch_size: int) -> list[list[str]]:
        """``sentences`` in the chunks they are encoded in: sorted by token count (stable) in chunks of
        :data:`SENTENCE_CHUNK`, so that little of each chunk is padding; LLM2Vec (which tokenizes inside its
        ``embed``) in the given order, ``batch_size`` at a time."""
        if self.llm2vec:
            return [sentences[i:i + batch_size] for i in range(0, len(sentences), batch_size)]
        tokens = self.tokenizer(sentences, truncation=True, max_length=self.max_length)["input_ids"]
        ordered = [s for _, s in sorted(zip(map(len, tokens), sentences), key=lambda pair: pair[0])]
        return [ordered[i:i + SENTENCE_CHUNK] for i in range(0, len(ordered), SENTENCE_CHUNK)]

    def forward(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(B, hidden) float32 embeddings of ``texts`` (no gradient into a frozen backbone)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.pooling != "sentence_mean":
                return torch.cat([self._mean(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])
            sentences = [split_sentences(t) for t in texts]
            # Reports repeat sentences ("No pleural effusion.", the normal findings): each distinct one is encoded
            # once (padding is masked, so a sentence's embedding does not depend on its batch mates).
            chunks = self._sentence_chunks(list(dict.fromkeys(s for group in sentences for s in group)), batch_size)
            position = {s: i for i, s in enumerate(s for chunk in chunks for s in chunk)}
            encoded = torch.cat([self._mean(chunk) for chunk in chunks])
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
        if spec.image_weights and spec.image_arch != "i3resnet":
            raise ValueError(f"image_weights (Merlin's checkpoint) needs image_arch='i3resnet', got {spec.image_arch!r}")
        if spec.image_arch == "i3resnet":
            self.image_encoder: nn.Module = I3ResNet(spec.image_width, spec.image_blocks)
            weights = _resolve_file(spec.image_weights, "image_weights", MERLIN_DOWNLOAD)
            if weights:
                load_merlin_weights(self.image_encoder, weights)
        elif spec.image_arch == "resnet":
            self.image_encoder = ResNet3DEncoder(spec.image_width, spec.image_blocks)
        elif spec.image_arch == "vit":
            self.image_encoder = ViT3DEncoder(spec.input_size, spec.vit_patch, spec.vit_dim, spec.vit_depth,
                                              spec.vit_heads)
        else:
            raise ValueError(f"image_arch must be 'i3resnet', 'resnet' or 'vit', got {spec.image_arch!r}")
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


def gather_with_grad(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(every training process's ``features`` in rank order, the row where this process's start).

    The gather carries the gradient back to each process's own features, as the seed's ``--gather-with-grad``
    (CT-Data ``training/loss.py:48-50``, ``torch.distributed.nn.all_gather``; torch 2.13 deprecates that for the
    functional collective used here, whose backward sums every process's gradient). One process (or no process
    group): ``features`` and 0.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, 0
    from torch.distributed._functional_collectives import all_gather_single

    gathered = all_gather_single(features.contiguous(), 0, dist.group.WORLD)
    return gathered, dist.get_rank() * len(features)


def siglip_loss(logits: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """SigLIP: every (image, text) pair is a binary problem, matched vs not; sum over texts, mean over images
    (Zhai et al. 2023, the seed's loss, CT-Data ``training/loss.py:337-358``).

    Args:
        logits: (B images, N texts); image ``i``'s own text is column ``offset + i`` (0 on one process; with
            several, the texts are every process's, and ``offset`` is where this process's start).
    """
    labels = -torch.ones_like(logits)
    rows = torch.arange(len(logits), device=logits.device)
    labels[rows, rows + offset] = 1
    return -F.logsigmoid(labels * logits).sum() / len(logits)


def clip_loss(logits: torch.Tensor, logits_per_text: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """CLIP / CT-CLIP: softmax cross-entropy image->text and text->image, averaged.

    Args:
        logits: (B images, N texts) scaled similarities; matched pairs at column ``offset + i``.
        logits_per_text: (B texts, N images); default ``logits.T`` (one process, a square batch). With several
            processes each side's local rows against every process's other side, as open_clip's ``local_loss``
            (CT-Data ``training/loss.py:89-129``).
    """
    target = torch.arange(len(logits), device=logits.device) + offset
    per_text = logits.T if logits_per_text is None else logits_per_text
    return (F.cross_entropy(logits, target) + F.cross_entropy(per_text, target)) / 2


def contrastive_loss(model: CTClip, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """The spec's loss on a batch of matched (image, text) embeddings, against every training process's batch.

    Averaged over processes (as data-parallel gradients are) it is the one-process loss of the whole global batch:
    SigLIP's sum over this process's images of every process's texts (the seed exchanges texts between
    neighbours with their gradient, CT-Data ``training/loss.py:360-414``); CLIP with open_clip's local loss.
    """
    all_text, offset = gather_with_grad(text_emb)
    if model.spec.loss == "siglip":
        return siglip_loss(model.logits(image_emb, all_text), offset)
    all_image, _ = gather_with_grad(image_emb)
    per_text = None if all_image is image_emb else model.logits(text_emb, all_image)
    return clip_loss(model.logits(image_emb, all_text), per_text, offset)


def report_features(model: CTClip, reports: list[str]) -> torch.Tensor:
    """(N, hidden) pooled text features of ``reports``, computed once per unique text (no gradient)."""
    unique = list(dict.fromkeys(reports))
    with torch.no_grad():
        feats = model.text_encoder(unique)
    index = {t: i for i, t in enumerate(unique)}
    return feats[torch.tensor([index[t] for t in reports])]
