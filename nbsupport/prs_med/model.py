"""PRS-Med: SAM-style image encoder + LLaVA-style VLM with LoRA + prompted mask decoder (+ modality classifier).

The parts follow the official ``LLMSeg`` (huyquoctrinh/PRS-Med) as summarised in the project's reference:

* image encoder (:class:`nbsupport.prs_med.sam_encoders.SamImageEncoder`): TinySAM's ``vit_t`` from
  ``tinysam_42.3.pth`` in ``full`` (``model_v7.py:79-82``; any SAM-family checkpoint ``load_sam_image_encoder``
  reads), a small random-init SAM ViT in ``demo``/``smoke``; ImageNet-normalised input, output (B, C, g, g), C = 256
  and g = S/16 for the published encoders; trained (``model_v7.py:87``).
* VLM: ``transformers.LlavaForConditionalGeneration`` (a converted LLaVA-Med folder in ``full``; in ``demo`` a tiny
  random CLIP tower + projector in front of the packaged SmolLM2-135M; a tiny random Llama in ``smoke``), LoRA
  ``r=16`` on ``q/k/v/o_proj`` of the language model. Prompt: ``"<image>\\n### User: {question} \\n### Assistant:
  \\n{answer}"``, teacher-forced in training; the last hidden state of every token (B, T, H) prompts the decoder.
* mask decoder (``spec.mask_decoder``): the official :class:`~nbsupport.prs_med.decoder.PromptedMaskDecoder` in
  ``full``, our :class:`~nbsupport.prs_med.decoder.SimpleMaskDecoder` in ``demo``/``smoke`` (see
  :mod:`nbsupport.prs_med.decoder`). Both are given the prompt's attention mask, so padded prompt tokens are not
  attended to (our addition: the official call attends to every token, ``mask_decoder_v5.py:335``, which makes a
  sample's mask depend on the longest question in its batch).
* modality classifier: AdaptiveAvgPool -> Linear(C -> 6) on the image embedding.
* loss: :func:`structure_loss` (weighted BCE + weighted IoU) + lambda_txt * LM loss + 0.5 * modality CE early on.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nbsupport.metrics import POSITIONS
from nbsupport.prs_med.data import IMAGENET_MEAN, IMAGENET_STD, N_MODALITY_CLASSES
from nbsupport.prs_med.decoder import build_mask_decoder
from nbsupport.prs_med.sam_encoders import SamImageEncoder, encoder_parameter_counts, load_sam_image_encoder
from nbsupport.spec import ModelSpec, lora_spec

IMAGE_TOKEN = "<image>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)$"


def prompt_text(question: str) -> str:
    """The official conversation format up to the answer (``<image>`` is expanded to the image tokens)."""
    return f"\n### User: {question} \n### Assistant: \n"


# ============================================================================================== spec
@dataclasses.dataclass(frozen=True)
class PRSMedSpec(lora_spec(rank=16, alpha=16, dropout=0.05), ModelSpec):
    """Everything needed to rebuild the network; stored next to its checkpoints as ``model_spec.json``.

    JSON and fingerprint as :class:`nbsupport.spec.ModelSpec`'s defaults (indent 2, sorted keys, every field), which
    is what the checkpoints written so far record; ``mask_decoder`` is written only when it is not ``"simple"``, the
    decoder every earlier spec had, so their fingerprints stay.
    """

    LATER_FIELDS = {"mask_decoder": "simple", "decoder_dropout": 0.1}

    image_size: int = 1024  # model input (pixels); SAM's 1024 in full
    # The config's sam_ckpt (a TinySAM / SAM checkpoint file or Hugging Face SAM folder, load_sam_image_encoder);
    # '' = the random-init SAM ViT below. Named sam_path since the first specs: the name is in every fingerprint.
    sam_path: str = ""
    sam_hidden: int = 64
    sam_layers: int = 2
    sam_heads: int = 4
    sam_patch: int = 8
    sam_out_channels: int = 64
    sam_window: int = 4
    vlm: str = "tiny"  # 'tiny' (random Llama), 'smollm2-135m' (packaged), or a local HF LLaVA folder
    vlm_num_layers: int = 0  # keep only the first N decoder layers of the language model (0 = all)
    vision_size: int = 128  # the VLM's vision tower input (pixels); demo/smoke towers only
    vision_patch: int = 32
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_stem: str = "patch"  # assembled towers: 'patch' (CLIP's one linear patch conv) or 'conv' (ConvPatchStem)
    projector: str = "mlp"  # assembled VLMs: 'mlp' (LLaVA's per-token 2-layer MLP) or 'spatial' (SpatialProjector)
    image_tokens_at: str = "start"  # 'start' (LLaVA/official: right after BOS) or 'before_answer' (after the prompt)
    position_head: bool = False  # our addition: a 5-way position classifier on the projected image tokens
    answer_loss_to_vision: bool = True  # False (our addition): the answer loss stops at the image tokens
    decoder_hidden: int = 128
    modality_classes: int = N_MODALITY_CLASSES
    seed: int = 0
    mask_decoder: str = "simple"  # 'official' (PromptedMaskDecoder, PRS-Med's) or 'simple' (SimpleMaskDecoder, ours)
    decoder_dropout: float = 0.1  # the mask decoder's transformer layer (PyTorch's default, as the official code)


# ============================================================================================== losses
def neighbourhood_mean(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """``F.avg_pool2d(mask, kernel, stride=1, padding=kernel // 2)`` (zero padding counted), bit for bit, for a mask
    of whole numbers, at 2 * kernel instead of kernel^2 additions per pixel: the window sum is taken as a column sum
    then a row sum (``divisor_override=1``), both exact in float32 for integer sums below 2^24, and divided once by
    kernel^2 as avg_pool2d does. On a 128 px batch of 8 this is ~20x faster than the 31x31 pool (issue 23)."""
    pad = kernel // 2
    columns = F.avg_pool2d(mask, kernel_size=(kernel, 1), stride=1, padding=(pad, 0), divisor_override=1)
    window = F.avg_pool2d(columns, kernel_size=(1, kernel), stride=1, padding=(0, pad), divisor_override=1)
    return window / (kernel * kernel)


def structure_loss(logits: torch.Tensor, mask: torch.Tensor, kernel: int = 31) -> torch.Tensor:
    """Weighted BCE + weighted IoU (PraNet's structure loss, used by PRS-Med).

    Pixels whose 31x31 neighbourhood mean differs from their own label (boundaries) weigh up to 6x.

    Args:
        logits: (B, 1, H, W) mask logits. mask: (B, 1, H, W) in {0, 1}.
    Returns:
        scalar, mean over the batch.
    """
    weit = 1 + 5 * torch.abs(neighbourhood_mean(mask, kernel) - mask)
    wbce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
    wbce = (weit * wbce).sum(dim=(2, 3)) / weit.sum(dim=(2, 3))
    pred = torch.sigmoid(logits)
    inter = ((pred * mask) * weit).sum(dim=(2, 3))
    union = ((pred + mask) * weit).sum(dim=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wbce + wiou).mean()


# ============================================================================================== parts
TINYSAM_URL = "https://github.com/xinghaochen/TinySAM/releases/download/3.0/tinysam_42.3.pth"  # TinySAM README.md:77


def resolve_sam_ckpt(sam_ckpt: str) -> str:
    """A local path for ``sam_ckpt``: a checkpoint file (relative paths from the project root), or a Hugging Face SAM
    folder or hub id in the local HF cache (``facebook/sam-vit-base``).

    Raises:
        FileNotFoundError: a missing checkpoint file, naming it and where TinySAM's is published.
    """
    from nbsupport.models import resolve_pretrained
    from nbsupport.paths import resolve_path

    path = resolve_path(sam_ckpt)
    if path.suffix in (".pth", ".pt", ".bin", ".safetensors"):
        if not path.is_file():
            raise FileNotFoundError(f"sam_ckpt: {path} does not exist. PRS-Med's image encoder is TinySAM's "
                                    f"tinysam_42.3.pth ({TINYSAM_URL}); put it at {path} or pass its path as sam_ckpt")
        return str(path)
    return resolve_pretrained(sam_ckpt, "sam_ckpt (SAM image encoder)")


def build_image_encoder(spec: PRSMedSpec) -> SamImageEncoder:
    """The image encoder: every tensor of the checkpoint ``spec.sam_path`` (the config's ``sam_ckpt``; prints the
    load line), or with no checkpoint a random-init SAM ViT of the spec's ``sam_*`` sizes (smoke / demo).

    Raises:
        ValueError: a SAM ViT checkpoint whose input size (its position embedding's) is not ``spec.image_size``.
    """
    from transformers import SamVisionConfig

    if spec.sam_path:
        encoder = load_sam_image_encoder(resolve_sam_ckpt(spec.sam_path))
        if encoder.image_size is not None and encoder.image_size != spec.image_size:
            raise ValueError(f"sam_ckpt {spec.sam_path}: a SAM ViT takes {encoder.image_size} px images only (its "
                             f"position embedding is that size), but image_size={spec.image_size}; set "
                             f"image_size={encoder.image_size}")
        return encoder
    grid = spec.image_size // spec.sam_patch
    config = SamVisionConfig(hidden_size=spec.sam_hidden, num_hidden_layers=spec.sam_layers,
                             num_attention_heads=spec.sam_heads, image_size=spec.image_size, patch_size=spec.sam_patch,
                             output_channels=spec.sam_out_channels, window_size=min(spec.sam_window, grid),
                             global_attn_indexes=[spec.sam_layers - 1], mlp_dim=4 * spec.sam_hidden)
    return SamImageEncoder.from_config(config)


def _tiny_vision_config(spec: PRSMedSpec) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden,
                            num_hidden_layers=spec.vision_layers, num_attention_heads=4, image_size=spec.vision_size,
                            patch_size=spec.vision_patch)


class ConvPatchStem(nn.Module):
    """Drop-in for CLIP's linear patch embedding: (x, y) coordinate channels appended to the pixels (CoordConv),
    two stride-2 3x3 conv + ReLU layers, then a patch/4 conv to the tower width.
    (B, 3, S, S) -> (B, hidden, S/patch, S/patch).

    A random tower reads *where* a finding is only as well as its patch features say *that* the patch holds one
    and *where* the patch is; one linear map of a 32x32 patch cannot tell a blob from texture or vignetting, and
    CLIP's learned position embeddings start near zero next to the patch features. The coordinate channels let
    the first ReLU layers form "finding here" features directly.
    """

    def __init__(self, hidden: int, patch: int, width: int = 32):
        super().__init__()
        if patch % 4:
            raise ValueError(f"vision_patch must be a multiple of 4 for the conv stem, got {patch}")
        self.layers = nn.Sequential(nn.Conv2d(5, width // 2, 3, stride=2, padding=1), nn.ReLU(),
                                    nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.ReLU(),
                                    nn.Conv2d(width, hidden, patch // 4, stride=patch // 4))

    @property
    def weight(self) -> torch.Tensor:
        """CLIPVisionEmbeddings reads the input dtype from ``patch_embedding.weight``."""
        return self.layers[0].weight

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixels.shape
        ys = torch.linspace(-1, 1, h, device=pixels.device, dtype=pixels.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=pixels.device, dtype=pixels.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        return self.layers(torch.cat([pixels, ys, xs], dim=1))


class SpatialProjector(nn.Module):
    """LLaVA's per-token MLP plus a branch that sees the whole patch grid at once: the flattened (N * C) image
    features -> Linear -> GELU -> Linear -> N tokens of the LM width, added to the per-token output.
    (B, N, C) -> (B, N, H).

    Why: a language model reads image tokens through attention, whose values carry a token's content but not its
    place in the sequence (RoPE only touches queries and keys), so "where" must be written into the content. A
    per-token projector of a small random tower leaves it in CLIP's near-zero position embeddings; the grid branch
    has one weight per (patch, feature) and so states where a finding is in every token it writes.
    """

    def __init__(self, n_tokens: int, vision_hidden: int, text_hidden: int, width: int = 256):
        super().__init__()
        self.n_tokens, self.text_hidden = n_tokens, text_hidden
        self.linear_1 = nn.Linear(vision_hidden, text_hidden)
        self.linear_2 = nn.Linear(text_hidden, text_hidden)
        self.grid = nn.Sequential(nn.Linear(n_tokens * vision_hidden, width), nn.GELU(),
                                  nn.Linear(width, n_tokens * text_hidden))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        b, n, _ = image_features.shape
        if n != self.n_tokens:
            raise ValueError(f"SpatialProjector was built for {self.n_tokens} image tokens, got {n}")
        per_token = self.linear_2(F.gelu(self.linear_1(image_features)))
        return per_token + self.grid(image_features.flatten(1)).view(b, n, self.text_hidden)


def build_vlm(spec: PRSMedSpec) -> tuple[Any, Any]:
    """(LlavaForConditionalGeneration with LoRA on the language model, tokenizer with an ``<image>`` token).

    ``tiny`` / ``smollm2-135m``: a LLaVA model assembled from a random CLIP tower, a random projector and the
    causal LM's weights; otherwise ``spec.vlm`` is the published LLaVA-Med v1.5 folder as downloaded, or an HF-format
    LLaVA folder (:func:`nbsupport.prs_med.llava_med.load_llava_med`). The vision tower and projector train fully in the assembled case (they start random); the
    language model trains only through LoRA.
    """
    from peft import get_peft_model
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from nbsupport.models import keep_first_decoder_layers, load_causal_lm, resolve_pretrained, tiny_causal_lm

    torch.manual_seed(spec.seed)
    assembled = spec.vlm in ("tiny", "smollm2-135m")
    if assembled:
        if spec.vlm == "tiny":
            lm, tokenizer = tiny_causal_lm(seed=spec.seed)
        else:
            lm, tokenizer = load_causal_lm("smollm2-135m", torch_dtype=torch.float32)
        keep_first_decoder_layers(lm, spec.vlm_num_layers)
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        vision = _tiny_vision_config(spec)
        n_image_tokens = (spec.vision_size // spec.vision_patch) ** 2
        config = LlavaConfig(vision_config=vision, text_config=lm.config, image_token_index=image_token_id,
                             image_seq_length=n_image_tokens, vision_feature_select_strategy="default",
                             vision_feature_layer=-1, tie_word_embeddings=lm.config.tie_word_embeddings)
        vlm = LlavaForConditionalGeneration(config)
        if spec.vision_stem == "conv":
            vlm.model.vision_tower.embeddings.patch_embedding = ConvPatchStem(spec.vision_hidden, spec.vision_patch)
        elif spec.vision_stem != "patch":
            raise ValueError(f"vision_stem must be 'patch' or 'conv', got {spec.vision_stem!r}")
        if spec.projector == "spatial":
            vlm.model.multi_modal_projector = SpatialProjector(n_image_tokens, spec.vision_hidden,
                                                               lm.config.hidden_size)
        elif spec.projector != "mlp":
            raise ValueError(f"projector must be 'mlp' or 'spatial', got {spec.projector!r}")
        vlm.model.language_model.load_state_dict(lm.model.state_dict())
        vlm.lm_head.load_state_dict(lm.lm_head.state_dict())
        vlm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        del lm
    else:
        from nbsupport.prs_med.llava_med import load_llava_med

        # the published LLaVA-Med v1.5 folder as downloaded (converted once, cached) or an HF-format LLaVA folder
        vlm, tokenizer = load_llava_med(resolve_pretrained(spec.vlm, "LLaVA VLM"))
    for p in vlm.parameters():
        p.requires_grad_(False)
    lora = spec.lora_config(target_modules=LORA_TARGETS, bias="none")
    vlm = get_peft_model(vlm, lora)
    if assembled:
        inner = vlm.base_model.model.model
        for module in (inner.vision_tower, inner.multi_modal_projector):
            for p in module.parameters():
                p.requires_grad_(True)
        # CLIP applies post_layernorm to the pooled CLS output only (transformers models/clip/modeling_clip.py:642),
        # which LLaVA never reads: it takes hidden_states[vision_feature_layer] (models/llava/modeling_llava.py:
        # 146-190). Trainable, it would get no gradient, and DDP (find_unused_parameters=False) would stop at the
        # second step with more than one process; it stays at its initial value either way.
        for p in inner.vision_tower.post_layernorm.parameters():
            p.requires_grad_(False)
    return vlm, tokenizer


# ============================================================================================== the model
@dataclasses.dataclass
class PRSMedOutput:
    mask_logits: torch.Tensor  # (B, 1, S, S)
    lm_loss: torch.Tensor | None
    modality_logits: torch.Tensor  # (B, modality_classes)
    cross_attention: torch.Tensor | None  # (B, g*g, T)
    vlm_attentions: tuple[torch.Tensor, ...] | None  # per LM layer (B, heads, T, T)
    input_ids: torch.Tensor  # (B, T)
    position_logits: torch.Tensor | None = None  # (B, image tokens, 5) with spec.position_head, over POSITIONS


class PRSMedNet(nn.Module):
    """Image encoder + VLM (LoRA) + prompted mask decoder + modality classifier. The tokenizer is ``.tokenizer``."""

    def __init__(self, spec: PRSMedSpec):
        super().__init__()
        self.spec = spec
        torch.manual_seed(spec.seed)
        self.image_encoder = build_image_encoder(spec)
        self.vlm, self.tokenizer = build_vlm(spec)
        torch.manual_seed(spec.seed + 1)
        text_config = self.llava.config.text_config
        channels = self.image_encoder.out_channels
        self.mask_decoder = build_mask_decoder(spec.mask_decoder, text_config.hidden_size, channels,
                                               spec.decoder_hidden, spec.decoder_dropout)
        self.modality_classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                 nn.Linear(channels, spec.modality_classes))
        # Training batches this network has been trained on. A buffer, so it is saved in every checkpoint and comes
        # back with the trainer's step on resume: schedules keyed on it (the early modality loss) continue instead of
        # restarting at zero.
        self.register_buffer("trained_batches", torch.zeros((), dtype=torch.long))
        if spec.image_tokens_at not in ("start", "before_answer"):
            raise ValueError(f"image_tokens_at must be 'start' or 'before_answer', got {spec.image_tokens_at!r}")
        # Our addition (spec.position_head, off in the public code): every projected image token is classified into
        # the five positions, trained on the label position_of(mask) gives, so that the tokens the language model
        # attends to state the position explicitly and its answer only has to copy it.
        self.position_classifier = nn.Linear(text_config.hidden_size, len(POSITIONS)) if spec.position_head else None
        if not spec.answer_loss_to_vision and not spec.position_head and spec.vlm in ("tiny", "smollm2-135m"):
            raise ValueError("answer_loss_to_vision=False needs the position loss (lambda_position > 0): with neither, "
                             "no loss reaches the assembled VLM's vision tower and projector, which start random")
        self._projected: list[torch.Tensor] = []
        if spec.position_head or not spec.answer_loss_to_vision:
            self.llava.model.multi_modal_projector.register_forward_hook(self._keep_projected)

    def _keep_projected(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the projector: keeps its output for the position head; without
        ``answer_loss_to_vision`` the language model gets it detached, so the answer loss trains LoRA only."""
        self._projected.append(output)
        return output if self.spec.answer_loss_to_vision else output.detach()

    @property
    def llava(self) -> Any:
        """The LlavaForConditionalGeneration inside the peft wrapper."""
        return self.vlm.base_model.model

    @property
    def n_image_tokens(self) -> int:
        cfg = self.llava.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        return side * side

    @property
    def image_token_id(self) -> int:
        return int(self.llava.config.image_token_index)

    # ---------------------------------------------------------------- text
    def encode(self, questions: Sequence[str], answers: Sequence[str] | None = None,
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Token ids of ``<image>``-tokens + prompt (+ answer + EOS), padded; labels mask everything but answers.

        Without answers the batch is left-padded (for generation); with answers right-padded (for training).
        Returns ``input_ids``, ``attention_mask`` (B, T) and, with answers, ``labels`` (B, T; -100 = ignored).
        """
        tok = self.tokenizer
        image_ids = [self.image_token_id] * self.n_image_tokens
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        seqs, labels = [], []
        for i, q in enumerate(questions):
            text = tok(prompt_text(q), add_special_tokens=False)["input_ids"]
            prompt = bos + (image_ids + text if self.spec.image_tokens_at == "start" else text + image_ids)
            if answers is None:
                seqs.append(prompt)
                continue
            answer = tok(answers[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        width = max(len(s) for s in seqs)
        pad = tok.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        lab = torch.full((len(seqs), width), -100, dtype=torch.long)
        for i, s in enumerate(seqs):
            if answers is None:  # left padding
                ids[i, width - len(s):] = torch.tensor(s)
                mask[i, width - len(s):] = 1
            else:
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
                lab[i, :len(s)] = torch.tensor(labels[i])
        out = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if answers is not None:
            out["labels"] = lab.to(device)
        return out

    def vlm_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised (B, 3, S, S) -> CLIP-normalised input of the vision tower's size."""
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        raw = images * std + mean
        size = self.llava.config.vision_config.image_size
        if raw.shape[-1] != size:
            raw = F.interpolate(raw, size=(size, size), mode="bilinear", align_corners=False)
        cmean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
        cstd = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
        return (raw - cmean) / cstd

    # ---------------------------------------------------------------- forward
    @property
    def position_token_ids(self) -> torch.Tensor:
        """Vocabulary ids of the position words (' top', 'left', ' center', ...), with and without a leading space."""
        if not hasattr(self, "_position_token_ids"):
            ids = set()
            for word in ("top", "bottom", "left", "right", "center", "centre", "middle"):
                for form in (word, " " + word, word.capitalize(), " " + word.capitalize()):
                    pieces = self.tokenizer(form, add_special_tokens=False)["input_ids"]
                    if len(pieces) == 1:  # a word split into pieces is left at weight 1
                        ids.add(pieces[0])
            self._position_token_ids = torch.tensor(sorted(ids), dtype=torch.long)
        return self._position_token_ids

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None,
                return_attention: bool = False, position_weight: float = 1.0) -> PRSMedOutput:
        """One teacher-forced pass.

        Args:
            images: (B, 3, S, S) ImageNet-normalised. input_ids / attention_mask / labels: from :meth:`encode`.
            return_attention: also return the decoder's cross-attention and the LM's attentions (eager attention).
            position_weight: weight of the answer's position-word tokens in the answer loss (a weighted mean over
                answer tokens). At 1 every answer token counts the same, and the one or two tokens that depend on
                the image are a tenth of a template sentence whose other words do not.
        """
        image_embeddings = self.image_encoder(images)  # (B, C, g, g)
        # The LlavaModel under the LoRA wrapper (LoRA is injected in place): hidden states without the vocabulary
        # projection, which is then applied to the answer positions only -- on SmolLM2 the 49k-word head costs as
        # much as seven decoder layers per token, and most tokens are image or question tokens.
        self._projected.clear()
        out = self.llava.model(input_ids=input_ids, attention_mask=attention_mask,
                               pixel_values=self.vlm_pixels(images), output_attentions=return_attention)
        position_logits = None
        if self.position_classifier is not None:
            projected = self._projected[-1]
            position_logits = self.position_classifier(projected.view(images.shape[0], -1, projected.shape[-1]))
            self._projected.clear()
        prompt = out.last_hidden_state  # (B, T, H)
        lm_loss = None
        if labels is not None:
            targets = labels[:, 1:]
            scored = targets != -100
            logits = self.llava.lm_head(prompt[:, :-1][scored])
            wanted = targets[scored]
            token_loss = F.cross_entropy(logits.float(), wanted, reduction="none")
            if position_weight == 1.0:
                lm_loss = token_loss.mean()
            else:
                is_position = torch.isin(wanted, self.position_token_ids.to(wanted.device))
                weights = torch.where(is_position, position_weight, 1.0)
                lm_loss = (token_loss * weights).sum() / weights.sum()
        logits, cross = self.mask_decoder(image_embeddings, prompt, attention_mask, images.shape[-1],
                                          return_attention=return_attention)
        return PRSMedOutput(logits, lm_loss, self.modality_classifier(image_embeddings), cross,
                            out.attentions if return_attention else None, input_ids, position_logits)

    @torch.no_grad()
    def generate_answers(self, images: torch.Tensor, questions: Sequence[str], max_new_tokens: int = 24) -> list[str]:
        """Greedy answers to ``questions`` about ``images`` (B, 3, S, S)."""
        enc = self.encode(questions, device=images.device)
        out = self.vlm.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                pixel_values=self.vlm_pixels(images), max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    @torch.no_grad()
    def answer_and_segment(self, images: torch.Tensor, questions: Sequence[str],
                           max_new_tokens: int = 24) -> tuple[list[str], torch.Tensor]:
        """Inference as in the paper: generate the answer, then prompt the decoder with the hidden states of
        question + generated answer (the sequence the decoder saw, teacher-forced, in training).

        Returns:
            (answers, mask probabilities (B, 1, S, S)).
        """
        answers = self.generate_answers(images, questions, max_new_tokens)
        enc = self.encode(questions, answers, device=images.device)
        out = self(images, enc["input_ids"], enc["attention_mask"])
        return answers, out.mask_logits.sigmoid()


class ImageOnlySegmenter(nn.Module):
    """Baseline: the same image encoder and mask decoder with the question removed (one learned prompt token)."""

    def __init__(self, spec: PRSMedSpec, prompt_dim: int):
        super().__init__()
        self.spec = spec
        torch.manual_seed(spec.seed)
        self.image_encoder = build_image_encoder(spec)
        torch.manual_seed(spec.seed + 1)
        self.mask_decoder = build_mask_decoder(spec.mask_decoder, prompt_dim, self.image_encoder.out_channels,
                                               spec.decoder_hidden, spec.decoder_dropout)
        self.prompt = nn.Parameter(torch.zeros(1, 1, prompt_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> mask logits (B, 1, S, S)."""
        emb = self.image_encoder(images)
        logits, _ = self.mask_decoder(emb, self.prompt.expand(images.shape[0], -1, -1), None, images.shape[-1])
        return logits


# ============================================================================================== full-size counts
def full_parameter_counts(decoder_hidden: int = 512, lora_r: int = 16) -> dict[str, int]:
    """Parameters of each part in the ``full`` configuration, built on the meta device (no weights loaded).

    LLaVA-Med v1.5 as :func:`nbsupport.prs_med.llava_med.load_llava_med` builds it from the published folder
    (``LLAVA_MED_V15_CONFIG``: CLIP ViT-L/14 at 336 px + 2-layer MLP projector + Mistral-7B, vocabulary 32000 plus
    the ``<image>`` row the conversion adds);
    TinySAM ``vit_t`` image encoder (output 256 x 64 x 64 at 1024 px; its count includes the classifier head
    ``tinysam_42.3.pth`` holds, which is frozen); the official decoder (prompt 4096 -> 512 -> 256; its unused
    ``ffn.norm1`` frozen); LoRA r on q/k/v/o of the 32 Mistral layers (A: r x in, B: out x r per projection).
    ``trainable``: encoder without its head, LoRA, decoder without ``ffn.norm1``, modality classifier.
    """
    from transformers import CLIPVisionConfig, LlavaForConditionalGeneration

    from nbsupport.prs_med.llava_med import CLIP_VIT_L_336, LLAVA_MED_V15_CONFIG, llava_config_from_original

    config = llava_config_from_original(LLAVA_MED_V15_CONFIG, CLIPVisionConfig(**CLIP_VIT_L_336))
    text = config.text_config
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
        decoder = build_mask_decoder("official", text.hidden_size, 256, decoder_hidden)
        classifier = nn.Linear(256, N_MODALITY_CLASSES)
    encoder = encoder_parameter_counts()

    def count(m: nn.Module, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable_only)

    lm = llava.model.language_model
    lora = 0
    for name, module in lm.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lora += lora_r * (module.in_features + module.out_features)
    counts = {
        "sam_image_encoder": encoder["tinysam_vit_t"],
        "vlm_vision_tower": count(llava.model.vision_tower),
        "vlm_projector": count(llava.model.multi_modal_projector),
        "vlm_language_model": count(lm) + (0 if config.tie_word_embeddings else count(llava.lm_head)),
        "lora_adapters": lora,
        "mask_decoder": count(decoder),
        "modality_classifier": count(classifier),
    }
    counts["total"] = sum(counts.values())
    counts["trainable"] = (encoder["tinysam_vit_t_without_head"] + counts["lora_adapters"]
                           + count(decoder, trainable_only=True) + counts["modality_classifier"])
    return counts


def network_parts(model: PRSMedNet) -> dict[str, nn.Module]:
    """The parts of a built :class:`PRSMedNet` counted separately (``nbsupport.spec.count_parameters``): SAM image
    encoder, the whole VLM (LoRA included), mask decoder, modality classifier, and the LoRA adapters alone (the
    ``lora_*`` containers peft puts into the language model's q/k/v/o projections)."""
    lora = nn.ModuleList(m for name, m in model.vlm.named_modules() if name.rsplit(".", 1)[-1].startswith("lora_"))
    return {"sam_image_encoder": model.image_encoder, "vlm": model.vlm, "mask_decoder": model.mask_decoder,
            "modality_classifier": model.modality_classifier, "lora_adapters": lora}
