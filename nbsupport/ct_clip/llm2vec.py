"""LLM2Vec as CT-Data trains it: a bidirectional Llama with latent-attention pooling, ported to transformers 5.

The seed (lukeingawesome/CT-Data ``training/main.py:192-202``) builds its text tower as::

    LLM2Vec.from_pretrained("microsoft/LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned", enable_bidirectional=True,
                            pooling_mode="latent_attention", max_length=512)
    text_model.load_state_dict(torch.load(args.model_pth), strict=False)   # llm2vec4cxr's pytorch_model.bin

The ``llm2vec`` package pins ``transformers>=4.43.1,<=4.44.2`` (McGill-NLP/llm2vec ``setup.py:25``) and its
``LlamaBiModel`` imports ``LlamaFlashAttention2`` / ``LlamaSdpaAttention`` (``llm2vec/models/bidirectional_llama.py:
4-12``), both gone from transformers 5; so this is a port, fact for fact:

* **Bidirectional.** llm2vec subclasses every attention class with ``is_causal = False``
  (``bidirectional_llama.py:26-41``) and builds a mask of zeros instead of the causal triangle, keeping only the
  padding (``bidirectional_llama.py:138-143``). In transformers 5 ``config.is_causal = False`` does both:
  ``masking_utils.create_causal_mask`` then builds a padding-only mask, and the forward passes ``is_causal=False``
  on to SDPA / flash attention for the unpadded case (``utils/generic.py``, ``merge_with_config_defaults``); each
  attention module's own ``is_causal`` is switched off as well, as llm2vec does (:func:`make_bidirectional`).
* **Tokenizer.** ``pad_token = eos_token``, ``padding_side = "left"`` (llm2vec4cxr ``llm2vec/llm2vec.py:150-152``).
  An instruction is separated from the text by ``!@#$%^&*()``: the model reads both (the separator removed), the
  pooling only the text's tokens, the last ones of the row (``embed_mask``, ``llm2vec.py:237-278``; pooling with
  ``skip_instruction=True``, ``llm2vec.py:280-302``).
* **Latent-attention pooling** (llm2vec4cxr's fork, ``llm2vec/llm2vec.py:37-80, 113-116, 324-332``): 512 trainable
  latents (hidden-size wide) are keys and values of an 8-head ``nn.MultiheadAttention`` whose queries are the text's
  token states; then ``Linear -> GELU -> Linear`` (no residual) and the mean over the text's tokens. Each token's
  output depends on that token alone, so the batched masked mean here equals the seed's per-sample loop.
* **Tensor names.** The module is ``LLM2Vec`` with ``.model`` (the Llama) and ``.latent_attn``
  (``latents``, ``multihead_attn.{in_proj_weight,in_proj_bias,out_proj.weight,out_proj.bias}``,
  ``mlp.{0,2}.{weight,bias}``), so ``state_dict()`` has llm2vec4cxr's names: ``model.layers.0.self_attn.q_proj
  .weight`` ... and ``latent_attn.latents`` ... (its loader reads ``latent_attn.*`` from ``pytorch_model.bin``,
  llm2vec4cxr ``llm2vec_wrapper.py:271-272``; its HF model class wraps the Llama in ``self.model`` "to match the
  checkpoint", HF lukeingawesome/llm2vec4cxr commit 6f83848). CT-Data loads that file with ``strict=False``; here
  every tensor must fit (:func:`nbsupport.weights.load_into`), and the load prints ``loaded N of N tensors``.

One deliberate difference: CT-Data's captions carry no separator, so their ``embed_mask`` is all zeros and the
seed's pooling slices ``hidden[i, -0:]`` - the whole row, left padding included (``training/data.py:386-425``,
``llm2vec.py:302, 329``), which makes a report's embedding depend on its batch mates. A text without separator is
pooled here over its own tokens (its attention mask), as llm2vec4cxr's own evaluation does
(``eval/eval_error_exp.py:452-455``).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from nbsupport.weights import Log, load_into, read_state_dict, report_hf_load

SEPARATOR = "!@#$%^&*()"  # llm2vec.py:241
# llm2vec4cxr README "Download the Model": Google Drive file id 1JB8hTgmVC1yJts8tmQamBij6LDcDfk0l -> pytorch_model.bin
LLM2VEC4CXR_DOWNLOAD = ("https://drive.google.com/file/d/1JB8hTgmVC1yJts8tmQamBij6LDcDfk0l (llm2vec4cxr's README), "
                        "saved as weights/llm2vec4cxr/pytorch_model.bin")
NUM_LATENTS = 512  # llm2vec.py:115
LATENT_HEADS = 8  # llm2vec.py:115
MAX_LENGTH = 512  # CT-Data training/main.py:196
# CT-Data training/main.py:206-213: LoRA r=32, alpha=32, dropout 0.1 on these names inside the Llama. Llama's output
# projection is `o_proj`, so the seed's LoRA lands on q, k and v only.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
BIDIRECTIONAL_MODEL_TYPES = ("llama",)  # llm2vec's _get_model_class: LlamaConfig -> LlamaBiModel (llm2vec.py:122-125)
PoolingMode = Literal["mean", "latent_attention"]


class LatentAttentionPooling(nn.Module):
    """Token states (queries) attend to trainable latents (keys = values); MLP; mean over the masked tokens."""

    def __init__(self, hidden_size: int, num_latents: int = NUM_LATENTS, num_heads: int = LATENT_HEADS):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_size))  # llm2vec.py:43
        self.multihead_attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, d) token states, (B, L) 0/1 mask of the tokens to pool -> (B, d)."""
        latents = self.latents.to(hidden.dtype).expand(len(hidden), -1, -1)
        attended, _ = self.multihead_attn(hidden, latents, latents, need_weights=False)
        out = self.mlp(attended)
        m = mask.unsqueeze(-1).to(out.dtype)
        return (out * m).sum(1) / m.sum(1).clamp(min=1)


def make_bidirectional(model: nn.Module) -> nn.Module:
    """Turn a transformers decoder (``LlamaModel``) into an encoder: every token attends to every other (padding
    masked): ``config.is_causal = False`` (a padding-only mask, and ``is_causal=False`` for SDPA / flash attention
    when there is no padding), and each attention module's ``is_causal = False``."""
    model.config.is_causal = False
    flagged = 0
    for module in model.modules():
        if hasattr(module, "is_causal") and hasattr(module, "q_proj"):
            module.is_causal = False
            flagged += 1
    if flagged != model.config.num_hidden_layers:
        raise RuntimeError(f"{type(model).__name__}: found {flagged} attention modules for "
                           f"{model.config.num_hidden_layers} layers; cannot make it bidirectional")
    return model


class LLM2Vec(nn.Module):
    """A bidirectional decoder and its pooling: texts -> (B, hidden) embeddings.

    Args:
        model: a transformers ``LlamaModel`` (made bidirectional here).
        tokenizer: its tokenizer (given ``pad = eos`` and left padding here); None on the meta device.
        pooling_mode: ``latent_attention`` (the seed's) or ``mean`` over the text's tokens.
        max_length: tokens kept per text (the seed's 512).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, pooling_mode: PoolingMode = "latent_attention",
                 max_length: int = MAX_LENGTH):
        super().__init__()
        if pooling_mode not in ("mean", "latent_attention"):
            raise ValueError(f"pooling_mode must be 'mean' or 'latent_attention', got {pooling_mode!r}")
        self.model = make_bidirectional(model)
        self.config = model.config
        self.pooling_mode = pooling_mode
        self.max_length = max_length
        if tokenizer is not None:
            tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "left"
        self.tokenizer = tokenizer
        if pooling_mode == "latent_attention":
            self.latent_attn = LatentAttentionPooling(model.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``embed_mask`` (the tokens after ``SEPARATOR``, the last ones of each
        left-padded row; a text without separator: all its tokens)."""
        parts = [text.split(SEPARATOR) for text in texts]
        batch = self.tokenizer(["".join(p) for p in parts], return_tensors="pt", padding=True, truncation=True,
                               max_length=self.max_length)
        embed_mask = batch["attention_mask"].clone()
        for row, p in enumerate(parts):
            if len(p) > 1:
                n = len(self.tokenizer(p[1], truncation=True, max_length=self.max_length,
                                       add_special_tokens=False)["input_ids"])
                embed_mask[row] = 0
                if n:
                    embed_mask[row, -n:] = 1
        batch["embed_mask"] = embed_mask
        return dict(batch)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, hidden) pooled embeddings of tokenized texts (see :meth:`tokenize`)."""
        hidden = self.model(input_ids=features["input_ids"],
                            attention_mask=features["attention_mask"]).last_hidden_state
        mask = features["embed_mask"]
        if self.pooling_mode == "latent_attention":
            return self.latent_attn(hidden, mask)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokenize ``texts`` onto the model's device and pool them."""
        device = next(self.parameters()).device
        return self({k: v.to(device) for k, v in self.tokenize(texts).items()})


# ---------------------------------------------------------------------------------------------- loading
def is_bidirectional_folder(path: str | os.PathLike) -> bool:
    """Whether the model folder's ``config.json`` names a decoder LLM2Vec turns bidirectional (Llama)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return json.loads(config.read_text(encoding="utf-8")).get("model_type") in BIDIRECTIONAL_MODEL_TYPES


def load_llm2vec(base: str | os.PathLike, weights: str | os.PathLike | None = None,
                 pooling_mode: PoolingMode = "latent_attention", max_length: int = MAX_LENGTH,
                 log: Log | None = print, source: str | None = None) -> LLM2Vec:
    """LLM2Vec from the base model's folder as downloaded, then (optionally) fine-tuned weights, as CT-Data does.

    Args:
        base: the base model's folder (``LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned``: ``config.json``,
            ``model.safetensors``, tokenizer files); its ``modeling_*.py`` is never run.
        weights: llm2vec4cxr's ``pytorch_model.bin`` (read with ``weights_only=True``), or a ``.safetensors`` with
            the same names: every tensor of :class:`LLM2Vec` (``model.*``, ``latent_attn.*``), nothing else.
        source: how ``base`` is named in the load line (the user's hub id or path); default ``base``.

    Raises:
        nbsupport.weights.WeightsMismatchError: a tensor is missing, unexpected or of another shape.
    """
    from transformers import AutoTokenizer, LlamaModel

    base = Path(base)
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model, info = LlamaModel.from_pretrained(base, local_files_only=True, dtype=torch.float32,
                                             output_loading_info=True)
    report_hf_load(source or base, model, info, log=log)
    encoder = LLM2Vec(model, tokenizer, pooling_mode, max_length)
    if weights:
        load_into(encoder, read_state_dict(weights), weights, log=log)
    elif pooling_mode == "latent_attention" and log is not None:
        log(f"{source or base}: no fine-tuned weights given; the latent-attention pooling starts random")
    return encoder


def llm2vec_on_meta(config: Any, pooling_mode: PoolingMode = "latent_attention") -> LLM2Vec:
    """The full-size network on the meta device (no memory, no weights): for parameter counts and shape checks."""
    from transformers import LlamaModel

    with torch.device("meta"):
        return LLM2Vec(LlamaModel(config), None, pooling_mode)
