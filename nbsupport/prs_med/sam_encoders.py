"""The SAM-family image encoders PRS-Med can use, loaded from their published files exactly as downloaded.

:func:`load_sam_image_encoder` (the seed's ``sam_ckpt``) recognises, by the tensor names it finds:

* TinySAM ``tinysam_42.3.pth`` -- a whole SAM state dict with a TinyViT encoder (``image_encoder.patch_embed.seq.*``),
  PRS-Med's default (huyquoctrinh/PRS-Med ``segment_model/model_v7.py:79-82``). Built as :class:`TinyViT`.
* the original SAM ViT checkpoints (``sam_vit_b_01ec64.pth`` / ``_l_`` / ``_h_``, facebookresearch/segment-anything
  README:112-114): a whole SAM state dict with ``image_encoder.patch_embed.proj.weight``,
  ``image_encoder.blocks.N.*``, ``image_encoder.neck.{0..3}.*``. Renamed into transformers' ``SamVisionModel`` by the
  image-encoder part of transformers' own conversion map (see :data:`SAM_TO_HF_RENAMES`).
* Hugging Face SAM folders (``facebook/sam-vit-base`` and the like: ``config.json`` with ``model_type`` ``sam`` or
  ``sam_vision_model``, tensors ``vision_encoder.*`` in ``model.safetensors`` or ``pytorch_model.bin``). Built as
  ``SamVisionModel`` from the folder's ``vision_config``.
* PRS-Med's own saved ``image_encoder.pth`` (``model_v7.py:105``: the state dict of its ``ImageEncoder`` wrapper,
  ``model_v7.py:24-32``, which holds the encoder both as ``image_encoder.*`` and inside ``sam.*``) loads like the
  TinySAM file it was trained from.

Only the image encoder's tensors are taken from a whole-SAM file; SAM's prompt encoder and mask decoder
(``prompt_encoder.*``, ``mask_decoder.*``) are not part of PRS-Med. Every load prints the one line of
:func:`nbsupport.weights.load_into` naming the path the user gave, and any missing, unexpected or reshaped encoder
tensor is an error naming it.

The encoders take (B, 3, S, S) ImageNet-normalised pixels (SAM's ``pixel_mean`` / ``pixel_std``, TinySAM
``build_sam.py:84-85``, are ImageNet's statistics x 255) and return (B, C, S/16, S/16): C = 256 and a 64 x 64 grid
at the 1024 px all of these checkpoints were trained at.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nbsupport.prs_med.tinysam import TinyViT, TinyViTConfig, tinyvit_config_from_state_dict
from nbsupport.weights import Log, load_into, read_state_dict

# The image-encoder entries of KEYS_TO_MODIFY_MAPPING in huggingface/transformers
# src/transformers/models/sam/convert_sam_to_hf.py (lines 83-105 at commit 09cb93d), applied in this order as plain
# substring replacements (replace_keys, lines 108-118). ".norm" turns blocks.N.norm1/norm2 into layer_norm1/2.
SAM_TO_HF_RENAMES: tuple[tuple[str, str], ...] = (
    ("image_encoder", "vision_encoder"),
    ("neck.0", "neck.conv1"),
    ("neck.1", "neck.layer_norm1"),
    ("neck.2", "neck.conv2"),
    ("neck.3", "neck.layer_norm2"),
    ("patch_embed.proj", "patch_embed.projection"),
    (".norm", ".layer_norm"),
    ("blocks", "layers"),
)
TINYSAM_KEY = "image_encoder.patch_embed.seq.0.c.weight"  # TinySAM tiny_vit_sam.py:67-68 + Conv2d_BN 'c' (:25)
SAM_VIT_KEY = "image_encoder.patch_embed.proj.weight"  # segment-anything image_encoder.py:58, 387
HF_SAM_KEY = "vision_encoder.patch_embed.projection.weight"  # transformers SamVisionModel / SamModel


class SamImageEncoder(nn.Module):
    """One SAM-family image encoder behind one call: pixels (B, 3, S, S) -> image embedding (B, C, S/16, S/16).

    TinyViT's classifier head (``norm_head``, ``head``) is part of ``tinysam_42.3.pth`` but not of the image
    embedding, so it is frozen: it would get no gradient, and DDP refuses a trainable parameter without one (PRS-Med's
    ``train_ddp.py:296`` sets ``find_unused_parameters=True`` instead; the optimiser skips it either way).

    Attributes:
        encoder: the network holding the published tensors (:class:`TinyViT` or transformers' ``SamVisionModel``).
        kind: ``"tinyvit"`` or ``"sam_vit"``.
        image_size: the only input side a SAM ViT accepts (its absolute position embedding is that size); None for
            TinyViT, which takes any side (1024 is the side its weights were trained at).
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.kind = "tinyvit" if isinstance(encoder, TinyViT) else "sam_vit"
        if self.kind == "sam_vit":
            size = encoder.config.image_size
            self.image_size: int | None = size if isinstance(size, int) else int(size[0])
        else:
            self.image_size = None
            encoder.norm_head.requires_grad_(False)
            encoder.head.requires_grad_(False)
        self.register_load_state_dict_pre_hook(_read_unwrapped_names)

    @classmethod
    def from_config(cls, config: TinyViTConfig | Any) -> SamImageEncoder:
        """A randomly initialised encoder: :class:`TinyViT` for a :class:`TinyViTConfig`, ``SamVisionModel`` for a
        transformers ``SamVisionConfig``."""
        if isinstance(config, TinyViTConfig):
            return cls(TinyViT(config))
        from transformers import SamVisionModel

        return cls(SamVisionModel(config))

    @property
    def out_channels(self) -> int:
        """C of the image embedding (256 for every published SAM / TinySAM encoder)."""
        return self.encoder.out_channels if self.kind == "tinyvit" else self.encoder.config.output_channels

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) ImageNet-normalised -> (B, C, S/16, S/16)."""
        if self.kind == "tinyvit":
            return self.encoder(pixels)
        return self.encoder(pixel_values=pixels).last_hidden_state


def _read_unwrapped_names(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load hook: a SAM ViT's tensors named as the bare ``SamVisionModel`` names them (``vision_encoder.*``, without
    ``encoder.``) are read as this wrapper's. prs_med checkpoints written before the wrapper existed hold the
    random-init SAM ViT of the smoke / demo profiles under those names, and keep loading."""
    legacy = prefix + "vision_encoder."
    for key in [k for k in state if k.startswith(legacy)]:
        state[prefix + "encoder." + key[len(prefix):]] = state.pop(key)


def load_sam_image_encoder(sam_ckpt: str | os.PathLike, log: Log | None = print) -> SamImageEncoder:
    """The image encoder stored at ``sam_ckpt``, with every one of its tensors loaded.

    Args:
        sam_ckpt: ``tinysam_42.3.pth``, a SAM ViT ``sam_vit_*.pth``, PRS-Med's saved ``image_encoder.pth``, or a
            Hugging Face SAM folder (``facebook/sam-vit-base`` as downloaded); see the module docstring.
        log: where the load line goes (``<sam_ckpt>: loaded N of N tensors (0 missing, 0 unexpected)``).

    Raises:
        FileNotFoundError: nothing at ``sam_ckpt``.
        ValueError: a file whose tensor names match none of the layouts (the error lists a few it has).
        nbsupport.weights.WeightsMismatchError: a recognised layout with missing, unexpected or reshaped tensors.
    """
    path = Path(sam_ckpt)
    if path.is_dir():
        return _load_hf_sam(path, read_state_dict(path), sam_ckpt, log)
    state = read_state_dict(path)
    if TINYSAM_KEY in state:
        encoder_state = _strip(state, "image_encoder.")
        encoder = TinyViT(tinyvit_config_from_state_dict(encoder_state, sam_ckpt))
        load_into(encoder, encoder_state, sam_ckpt, log=log)
        return SamImageEncoder(encoder)
    if SAM_VIT_KEY in state:
        encoder_state = _strip(state, "image_encoder.")
        encoder = _sam_vision_model(sam_vit_config_from_state_dict(encoder_state, sam_ckpt))
        load_into(encoder, sam_vit_to_hf(state), sam_ckpt, log=log)
        return SamImageEncoder(encoder)
    if HF_SAM_KEY in state:  # one weight file of a Hugging Face folder: its config.json sits beside it
        return _load_hf_sam(path.parent, state, sam_ckpt, log)
    shown = ", ".join(sorted(state)[:5])
    raise ValueError(f"{sam_ckpt}: not a SAM image-encoder checkpoint: none of {TINYSAM_KEY!r} (TinySAM), "
                     f"{SAM_VIT_KEY!r} (SAM ViT) or {HF_SAM_KEY!r} (Hugging Face SAM); its tensors start {shown}")


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix``, named without it (the rest of the SAM file stays unread)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def sam_vit_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``image_encoder.*`` tensors of an original SAM checkpoint under transformers' ``SamVisionModel`` names
    (``image_encoder.blocks.3.norm1.weight`` -> ``vision_encoder.layers.3.layer_norm1.weight``)."""
    renamed = {}
    for key, value in state.items():
        if not key.startswith("image_encoder."):
            continue
        for old, new in SAM_TO_HF_RENAMES:
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


def sam_vit_config_from_state_dict(state: Mapping[str, torch.Tensor], source: str | os.PathLike) -> Any:
    """The ``SamVisionConfig`` of an original SAM ViT image encoder (names without ``image_encoder.``), from shapes.

    segment-anything's ``image_encoder.py``: patch conv (D, 3, p, p) (:58-63, 387), ``pos_embed`` (1, S/p, S/p, D)
    (:68-70), per block ``attn.rel_pos_h`` (2 * n - 1, D / heads) with n the window (14) or, in the global-attention
    blocks, the grid S/p (:158, 221-222), ``mlp.lin1`` (mlp_dim, D) (common.py:21), neck convs (C, D, 1, 1) and
    (C, C, 3, 3) (:88-104). LayerNorm eps 1e-6, relative positions on, qkv bias on (build_sam.py:72-78).
    """
    from transformers import SamVisionConfig

    def shape(name: str) -> tuple[int, ...]:
        if name not in state:
            raise ValueError(f"{source}: not a SAM ViT image encoder: no tensor 'image_encoder.{name}' "
                             "(segment-anything image_encoder.py)")
        return tuple(state[name].shape)

    hidden, in_chans, _, patch = shape("patch_embed.proj.weight")
    grid = shape("pos_embed")[1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    head_dim = shape("blocks.0.attn.rel_pos_h")[1]
    spans = [shape(f"blocks.{i}.attn.rel_pos_h")[0] for i in range(depth)]
    global_blocks = [i for i, n in enumerate(spans) if n == 2 * grid - 1]
    windows = {(n + 1) // 2 for n in spans if n != 2 * grid - 1}
    if len(windows) > 1:
        raise ValueError(f"{source}: window-attention blocks of different sizes {sorted(windows)}")
    return SamVisionConfig(
        hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=hidden // head_dim, num_channels=in_chans,
        image_size=grid * patch, patch_size=patch, mlp_dim=shape("blocks.0.mlp.lin1.weight")[0],
        output_channels=shape("neck.0.weight")[0], window_size=windows.pop() if windows else 14,
        global_attn_indexes=global_blocks, qkv_bias="blocks.0.attn.qkv.bias" in state, layer_norm_eps=1e-6)


def _sam_vision_model(config: Any) -> nn.Module:
    from transformers import SamVisionModel

    return SamVisionModel(config)


def _load_hf_sam(folder: Path, state: Mapping[str, torch.Tensor], source: str | os.PathLike,
                 log: Log | None) -> SamImageEncoder:
    """A Hugging Face SAM folder (``SamModel`` or ``SamVisionModel``): the ``vision_encoder.*`` tensors into a
    ``SamVisionModel`` built from the folder's vision config."""
    from transformers import SamVisionConfig

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{source}: a Hugging Face SAM checkpoint needs its config.json, not found in {folder}")
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    if model_type not in ("sam", "sam_vision_model"):
        raise ValueError(f"{config_file}: model_type {model_type!r}; a SAM folder has 'sam' or 'sam_vision_model'")
    config = SamVisionConfig.from_pretrained(folder, local_files_only=True)  # takes vision_config of a 'sam' config
    encoder = _sam_vision_model(config)
    load_into(encoder, {k: v for k, v in state.items() if k.startswith("vision_encoder.")}, source, log=log)
    return SamImageEncoder(encoder)


def encoder_parameter_counts() -> dict[str, int]:
    """Parameters of the full-size encoders, built on the meta device: TinySAM ``vit_t`` with and without its
    unused classifier head, and SAM ViT-B (convert_sam_to_hf.py:59-60 builds ``sam_vit_b`` as ``SamVisionConfig()``,
    transformers' defaults)."""
    from transformers import SamVisionConfig

    with torch.device("meta"):
        tiny = TinyViT()
        vit_b = _sam_vision_model(SamVisionConfig())
    head = sum(p.numel() for n, p in tiny.named_parameters() if n.startswith(("head.", "norm_head.")))
    total = sum(p.numel() for p in tiny.parameters())
    return {"tinysam_vit_t": total, "tinysam_vit_t_without_head": total - head,
            "sam_vit_b": sum(p.numel() for p in vit_b.parameters())}
