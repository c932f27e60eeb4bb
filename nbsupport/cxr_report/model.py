"""MedGen_AI's model: DenseNet-121 patches -> 14 disease tokens -> a QLoRA causal LM that writes the report.

* :class:`DiseaseAttention`: a learnable (14, P) weight, softmaxed over the P = (S/32)^2 patches (49 at 224 px),
  pools the (B, P, C) patch features into (B, 14, C) disease tokens (the seed's ``einsum('bpc,pdc->bdc')``).
  As in the seed the weight does not depend on the image: it is a learned spatial prior per disease.
* :class:`VisionModel`: DenseNet features (MONAI, ``spatial_dims=2``) + the attention + the auxiliary classifier
  ``Dropout(0.5) + Linear(14 * C -> 14)`` on the disease tokens (the seed's separately pre-trained head).
* :class:`ReportGenerator`: ``Linear(C -> LM hidden)`` of the 14 tokens, prepended to the embeddings of the prompt
  and the report; labels are -100 over the visual and prompt tokens, so only report tokens (and EOS) are learnt.
  The LM is loaded by path (4-bit NF4 through bitsandbytes unless switched off) and wrapped with LoRA
  (r=8, alpha=8, dropout 0.1 on q/k/v/o by default).

Encoders: ``densenet121`` (1024 channels, the seed), ``densenet_small`` (136 channels, 254 k parameters; the
``demo`` profile, CPU-sized) and ``densenet_tiny`` (``smoke``). No ImageNet weights ship offline: the seed's,
torchvision's published ``densenet121-a639ec97.pth``, is read as it is (:func:`load_encoder_weights`).
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from nbsupport.cxr_report.labeler import LABELS
from nbsupport.spec import ModelSpec, ParameterCount, count_parameters
from nbsupport.weights import LoadReport, Log, load_into, read_state_dict

NUM_DISEASES = len(LABELS)
ENCODERS = {
    # name: (init_features, growth_rate, block_config, output channels); stride 32 in all
    "densenet121": (64, 32, (6, 12, 24, 16), 1024),
    "densenet_small": (32, 16, (2, 4, 6, 4), 136),
    "densenet_tiny": (16, 8, (1, 1, 1, 1), 17),
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class CxrModelSpec(ModelSpec):
    """Everything needed to rebuild the trained model; stored as ``model_spec.json`` in the run folder.

    Its two checkpoints carry ``fingerprint("vision")`` and ``fingerprint("report")``. The JSON keeps the field
    order (not sorted) and leaves out the fields added later while they hold their defaults, as the first runs
    wrote it, so that their checkpoints keep loading.
    """

    JSON_SORT_KEYS = False
    LATER_FIELDS = {"findings_prompt": False, "findings_threshold": 0.5}

    encoder: Literal["densenet121", "densenet_small", "densenet_tiny"] = "densenet121"
    image_size: int = 224
    language_model: str = "meta-llama/Llama-2-7b-hf"  # local folder, hub id in the local cache, or alias
    quantization: Literal["nf4", "none"] = "nf4"
    lora_r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = LORA_TARGETS
    # Our additions (not in the seed), off by default and in `full`:
    # * the auxiliary classifier's positive labels appended to the diagnostic prompt (PromptMRG-style);
    findings_prompt: bool = False
    findings_threshold: float = 0.5

    @property
    def feature_dim(self) -> int:
        return ENCODERS[self.encoder][3]

    @property
    def num_patches(self) -> int:
        return (self.image_size // 32) ** 2


# ---------------------------------------------------------------------------------------------- vision
class DiseaseAttention(nn.Module):
    """(B, P, C) patch features -> (B, 14, C) disease tokens with a learnable (14, P) softmax weight."""

    def __init__(self, num_diseases: int, num_patches: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_diseases, num_patches))

    def attention(self) -> torch.Tensor:
        """(14, P) weights, each row summing to 1 over the patches."""
        return torch.softmax(self.weight, dim=1)

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.attention()
        return torch.einsum("bpc,dp->bdc", patches, weights), weights


def build_densenet_features(encoder: str) -> nn.Module:
    """MONAI DenseNet ``features`` (ending in its last BatchNorm) for a 3-channel 2-D input; stride 32."""
    from monai.networks.nets import DenseNet

    init_features, growth_rate, blocks, _ = ENCODERS[encoder]
    net = DenseNet(spatial_dims=2, in_channels=3, out_channels=NUM_DISEASES, init_features=init_features,
                   growth_rate=growth_rate, block_config=blocks)
    return net.features


# The ImageNet DenseNet-121 of torchvision (the seed's encoder), as published: densenet121-a639ec97.pth names a dense
# layer's parts "denselayerN.norm.1" (saved before PyTorch forbade dots in module names; torchvision's own loader
# renames them "norm1", torchvision/models/densenet.py _load_state_dict). MONAI's DenseNet nests them as
# "denselayerN.layers.norm1"; MONAI renames the published file for its own pretrained download with this pattern
# (monai/networks/nets/densenet.py, _load_state_dict, lines 276-286 in MONAI 1.6), widened here by an optional dot so
# that a file saved from torchvision's network ("norm1") maps too. tests/cxr_report/test_encoder_weights.py checks
# the result against MONAI's own loader on the same file.
_DENSE_LAYER_PART = re.compile(r"^(.*denselayer\d+)(\.(?:norm|relu|conv))\.?((?:[12])\.(?:weight|bias|running_mean|"
                               r"running_var|num_batches_tracked))$")
TORCHVISION_HEAD = ("classifier.weight", "classifier.bias")  # the 1000-class ImageNet head, not used here


def monai_feature_names(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A torchvision DenseNet state dict -> MONAI DenseNet ``features`` names (``features.`` prefix dropped, dense
    layers renamed), and the names it left out: the ImageNet head ``TORCHVISION_HEAD``."""
    renamed = {}
    for key, value in state.items():
        if key in TORCHVISION_HEAD:
            continue
        key = key.removeprefix("features.")
        match = _DENSE_LAYER_PART.match(key)
        renamed[match.group(1) + ".layers" + match.group(2) + match.group(3) if match else key] = value
    return renamed, [k for k in TORCHVISION_HEAD if k in state]


def load_encoder_weights(features: nn.Module, path: str | Path, log: Log | None = print) -> LoadReport:
    """Load pretrained encoder weights into the MONAI DenseNet ``features`` strictly, with one report line
    (``<path>: loaded N of N tensors (0 missing, 0 unexpected)``).

    ``path``: torchvision's published DenseNet file as it is (``densenet121-a639ec97.pth``, read with
    ``weights_only``: its ImageNet head is left out by name, its names are mapped to MONAI's, and the BatchNorm
    step counters that files saved before PyTorch 0.4.1 lack are set to 0, as BatchNorm's own loader does for such
    files, torch/nn/modules/batchnorm.py ``_NormBase._load_from_state_dict``); or a state dict of ``features`` in
    MONAI's names (safetensors). Both say what was changed before the report line.

    Raises:
        WeightsMismatchError: a tensor missing, unexpected or of another shape (e.g. a DenseNet-169 file).
    """
    state = read_state_dict(path)
    if any(k.startswith("features.") for k in state):
        state, head = monai_feature_names(state)
        counters = [k for k in features.state_dict() if k.endswith("num_batches_tracked")]
        added = [k for k in counters if k not in state] if not any(k in state for k in counters) else []
        state.update({k: torch.zeros((), dtype=torch.long) for k in added})
        if log is not None:
            log(f"{path}: torchvision DenseNet layout: left out {', '.join(head) or 'no head'} (ImageNet head); names "
                "mapped to MONAI's DenseNet (denselayerN.norm.1 / norm1 -> denselayerN.layers.norm1)"
                + (f"; {len(added)} BatchNorm num_batches_tracked set to 0 (not in the file)" if added else ""))
    return load_into(features, state, path, log=log)


class VisionModel(nn.Module):
    """Image (B, 3, S, S) -> disease tokens (B, 14, C), auxiliary logits (B, 14), attention (14, P)."""

    def __init__(self, spec: CxrModelSpec):
        super().__init__()
        self.spec = spec
        self.features = build_densenet_features(spec.encoder)
        self.attention = DiseaseAttention(NUM_DISEASES, spec.num_patches)
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(NUM_DISEASES * spec.feature_dim, NUM_DISEASES))

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, P, C) post-ReLU patch features (torchvision's densenet applies the same ReLU)."""
        fmap = torch.relu(self.features(images))  # (B, C, S/32, S/32)
        return fmap.flatten(2).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, weights = self.attention(self.patches(images))
        return tokens, self.classifier(tokens.flatten(1)), weights

    def patch_evidence(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 14, P): each patch's exact additive share of each disease logit (bias excluded).

        The classifier is linear in the tokens and the tokens are attention-weighted sums of patches, so
        ``logit_k - b_k = sum_p sum_d a[d, p] * W[k, d] . f_p``: an image-specific map per disease, where the
        attention weight alone is the same for every image.
        """
        patches = self.patches(images)  # (B, P, C)
        weights = self.attention.attention()  # (D, P)
        linear = self.classifier[1].weight.view(NUM_DISEASES, NUM_DISEASES, -1)  # (K, D, C)
        return torch.einsum("bpc,kdc,dp->bkp", patches, linear, weights)


# ---------------------------------------------------------------------------------------------- report LM
def lora_config(spec: CxrModelSpec) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules=list(spec.lora_targets))


def load_language_model(spec: CxrModelSpec, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """The causal LM of ``spec`` (NF4 unless ``quantization == "none"``) wrapped with LoRA, and its tokenizer.

    Where it lands: on a CUDA ``device`` a 4-bit LM is quantized there (``device_map``); everything else is loaded
    on the CPU (bitsandbytes quantizes on the CPU too), from where :func:`place_on` moves the whole report
    generator, 4-bit weights included, to a CPU, CUDA or meta device. So the LM, the projection and every input
    built from them end up on one device.
    """
    from peft import get_peft_model

    from nbsupport.models import load_causal_lm

    place = torch.device(device)
    quantization = None if spec.quantization == "none" else spec.quantization
    device_map = None
    if quantization is not None:
        device_map = {"": place.index if place.index is not None else torch.cuda.current_device()} \
            if place.type == "cuda" else {"": "cpu"}
    lm, tokenizer = load_causal_lm(spec.language_model, quantization=quantization, torch_dtype=torch.float32,
                                   device_map=device_map)
    return get_peft_model(lm, lora_config(spec)), tokenizer


def place_on(module: nn.Module, device: str | torch.device) -> nn.Module:
    """``module.to(device)``, 4-bit weights included: ``Module.to`` re-wraps a moved parameter as a plain
    ``Parameter`` where the tensor type changes (to the meta device), which a bitsandbytes ``Params4bit`` refuses;
    its own ``.to`` moves the packed weight and its quantization state together."""
    import bitsandbytes as bnb

    place = torch.device(device)
    for layer in module.modules():
        for name, param in list(layer._parameters.items()):
            if isinstance(param, bnb.nn.Params4bit) and param.device != place:
                layer._parameters[name] = param.to(place)
    return module.to(place)


def keep_4bit_weights_trainable(module: nn.Module) -> int:
    """Stop bitsandbytes (0.50, CPU with AVX512-BF16) from repacking NF4 weights for inference in an eval-mode,
    no-grad forward: the weights stay repacked, and the gradient through them in the next training backward is
    wrong (zero at the visual projection; the report loss jumped from 0.7 to 12-16 right after the first
    mid-training validation). Returns the number of 4-bit layers changed. Models used only for inference keep the
    faster packed path."""
    import bitsandbytes as bnb

    changed = 0
    for layer in module.modules():
        if isinstance(layer, bnb.nn.Linear4bit) and getattr(layer, "support_avx512bf16_for_cpu", False):
            layer.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


class ReportGenerator(nn.Module):
    """Projection of the disease tokens + the LoRA-wrapped causal LM."""

    def __init__(self, spec: CxrModelSpec, lm: Any, tokenizer: Any, labelled_logits_only: bool = True,
                 pack_sequences: bool = False):
        """``labelled_logits_only``: the training loss computes the LM head only at the positions that predict a
        report token (the same loss as the LM's own, without the vocabulary-sized logits of the visual, prompt
        and padding positions); ``False`` calls the LM with ``labels`` as the seed does. ``pack_sequences`` (with
        ``labelled_logits_only``): the batch's examples run as one padding-free row (see :meth:`forward`)."""
        super().__init__()
        self.spec = spec
        self.lm = lm
        self.tokenizer = tokenizer
        self.labelled_logits_only = labelled_logits_only
        self.pack_sequences = pack_sequences
        embedding = lm.get_input_embeddings().weight
        # initialised on the CPU (the same values on any device), then kept on the LM's device
        self.projection = nn.Linear(spec.feature_dim, embedding.shape[1]).to(embedding.device)

    @property
    def device(self) -> torch.device:
        """Where the LM's embeddings, the projection and every generation input live."""
        return self.lm.get_input_embeddings().weight.device

    def visual_embeddings(self, disease_tokens: torch.Tensor) -> torch.Tensor:
        """(B, 14, C) disease tokens from anywhere (the vision model's device, the CPU cache) -> (B, 14, hidden) on
        the LM's device, in its embedding dtype."""
        embedding = self.lm.get_input_embeddings().weight
        return self.projection(disease_tokens.to(self.projection.weight)).to(embedding)

    def forward(self, disease_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> Any:
        """Causal-LM loss over the report tokens (mean over the labelled tokens).

        Args:
            disease_tokens: (B, 14, C). input_ids / attention_mask / labels: (B, T) prompt + report + EOS,
                right-padded; labels -100 over the prompt and padding.

        Returns the LM's output (``loss``, ``logits``); with ``labels`` and ``labelled_logits_only`` an output
        whose ``logits`` are None. With ``pack_sequences`` too, the examples are concatenated without their padding
        into one row whose positions restart at 0 for each, and transformers' masks keep them apart (a
        block-diagonal causal mask from the restarting ``position_ids``): the same loss up to float rounding, at the
        cost of the real tokens only (the demo's batches of 4 are 17 % padding).
        """
        visual = self.visual_embeddings(disease_tokens)
        text = self.lm.get_input_embeddings()(input_ids)
        embeds = torch.cat([visual, text], dim=1)
        ones = torch.ones(visual.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        mask = torch.cat([ones, attention_mask], dim=1)
        if labels is None:
            return self.lm(inputs_embeds=embeds, attention_mask=mask)
        ignore = torch.full(visual.shape[:2], -100, dtype=labels.dtype, device=labels.device)
        full_labels = torch.cat([ignore, labels], dim=1)
        if not self.labelled_logits_only:
            return self.lm(inputs_embeds=embeds, attention_mask=mask, labels=full_labels)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        base = self.lm.get_base_model()
        targets = full_labels[:, 1:]
        keep = targets != -100  # position t predicts token t + 1
        if self.pack_sequences:
            real = mask.bool()  # right-padded: each row's real tokens come first
            lengths = real.sum(dim=1).tolist()
            positions = torch.cat([torch.arange(n, device=embeds.device) for n in lengths])[None]
            hidden = base.model(inputs_embeds=embeds[real][None], position_ids=positions,
                                use_cache=False).last_hidden_state[0]  # (real tokens, hidden)
            packed_index = (real.flatten().cumsum(0) - 1).view_as(real)  # (B, L): row of each real token in `hidden`
            predicting = hidden[packed_index[:, :-1][keep]]
        else:
            hidden = base.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
            predicting = hidden[:, :-1][keep]  # (labelled positions, hidden)
        logits = base.lm_head(predicting).float()
        loss = torch.nn.functional.cross_entropy(logits, targets[keep])
        return CausalLMOutputWithPast(loss=loss, logits=None)

    def prompt_embeddings(self, disease_tokens: torch.Tensor, prompt_ids: Sequence[Sequence[int]]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``[14 visual | prompt]`` embeddings (B, L, hidden) and attention mask (B, L)."""
        visual = self.visual_embeddings(disease_tokens)
        embed = self.lm.get_input_embeddings()
        device = self.device  # prompt ids and mask are made where the embeddings they look up are
        length = max(len(p) for p in prompt_ids)
        rows, masks = [], []
        pad_id = self.tokenizer.pad_token_id
        for v, ids in zip(visual, prompt_ids):
            pad = length - len(ids)
            ids_t = torch.tensor([pad_id] * pad + list(ids), device=device)
            rows.append(torch.cat([embed(ids_t[:pad]), v, embed(ids_t[pad:])], dim=0))
            masks.append(torch.tensor([0] * pad + [1] * (v.shape[0] + len(ids)), device=device))
        return torch.stack(rows), torch.stack(masks)

    @torch.no_grad()
    def generate(self, disease_tokens: torch.Tensor, prompt_ids: Sequence[Sequence[int]], num_beams: int = 5,
                 no_repeat_ngram_size: int = 2, max_new_tokens: int = 96, num_return_sequences: int = 1
                 ) -> list[str]:
        """Beam-search reports (the seed: 5 beams, early stopping, no repeated bigram) for a batch of images:
        ``num_return_sequences`` finished beams per image (at most ``num_beams``), image by image, each image's
        best beam score first."""
        embeds, mask = self.prompt_embeddings(disease_tokens, prompt_ids)
        with warnings.catch_warnings():
            # transformers says that with inputs_embeds the n-gram rule covers only the generated tokens: what is meant
            # here (the prompt's own words may be repeated in the report), so the warning tells a reader nothing.
            warnings.filterwarnings("ignore", message=r"Passing `no_repeat_ngram_size` with `inputs_embeds`",
                                    category=UserWarning)
            out = self.lm.generate(inputs_embeds=embeds, attention_mask=mask, num_beams=num_beams,
                                   num_return_sequences=num_return_sequences,
                                   no_repeat_ngram_size=no_repeat_ngram_size, max_new_tokens=max_new_tokens,
                                   early_stopping=num_beams > 1, do_sample=False,
                                   pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


# The order in which a radiologist reads a frontal film and writes its findings: tubes and lines, the lungs, the
# pleura, the heart and mediastinum, the bones. The findings prompt names labels in this order, so the report states
# them in the order the prompt lists them.
REPORTING_ORDER = ("Support Devices", "Consolidation", "Lung Opacity", "Pneumonia", "Atelectasis", "Edema",
                   "Lung Lesion", "Pneumothorax", "Pleural Other", "Pleural Effusion", "Cardiomegaly",
                   "Enlarged Cardiomediastinum", "Fracture")


def classifier_findings_prompt(prompt: str, probabilities: Sequence[float], threshold: float = 0.5) -> str:
    """The diagnostic prompt followed by the labels the auxiliary classifier calls positive (probability >=
    ``threshold``) in ``REPORTING_ORDER``, e.g. ``"Describe ... Classifier findings: pleural effusion,
    cardiomegaly."``; ``none`` when it calls no label but No Finding.

    A diagnosis-driven prompt in the manner of PromptMRG (Jin et al., AAAI 2024): the LM is told in words what the
    image classifier found, so a report states each finding the classifier sees, in any combination. At inference
    it is built from the image alone; in training from the report's own labels (``task.prompt_findings``).
    """
    if len(probabilities) != NUM_DISEASES:
        raise ValueError(f"expected {NUM_DISEASES} label probabilities (in LABELS order), got {len(probabilities)}")
    called = {label for label, p in zip(LABELS, probabilities) if p >= threshold}
    names = [label.lower() for label in REPORTING_ORDER if label in called]
    return f"{prompt.strip()} Classifier findings: {', '.join(names) if names else 'none'}."


def lm_prompts(spec: CxrModelSpec, prompts: Sequence[str], probabilities: torch.Tensor) -> list[str]:
    """The prompts the LM reads: ``prompts`` as they are (the seed), or with the classifier's findings appended
    when ``spec.findings_prompt``; ``probabilities``: (N, 14) classifier outputs in [0, 1]."""
    if not spec.findings_prompt:
        return [str(p) for p in prompts]
    return [classifier_findings_prompt(str(p), row.tolist(), spec.findings_threshold)
            for p, row in zip(prompts, probabilities)]


def encode_example(tokenizer: Any, prompt: str, report: str, max_report_tokens: int) -> dict[str, list[int]]:
    """Token ids of ``prompt`` + newline and of ``report`` + EOS, with labels -100 over the prompt."""
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    report_ids = tokenizer(report, add_special_tokens=False)["input_ids"][:max_report_tokens]
    report_ids = report_ids + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + report_ids, "labels": [-100] * len(prompt_ids) + report_ids}


def pad_examples(examples: Sequence[dict[str, list[int]]], pad_id: int, length: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``encode_example`` outputs to ``length`` (None: the longest): ``(input_ids, attention_mask,
    labels)``, each ``(N, length)`` long, ids ``pad_id`` and labels -100 over the padding."""
    length = max(len(e["input_ids"]) for e in examples) if length is None else length
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for k, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[k, :n] = torch.tensor(e["input_ids"])
        labels[k, :n] = torch.tensor(e["labels"])
        mask[k, :n] = 1
    return ids, mask, labels


def prompt_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt as the model sees it before the report: text plus a newline."""
    return tokenizer(prompt.strip() + "\n", add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------- sizes
LLAMA2_7B_CONFIG = {  # meta-llama/Llama-2-7b-hf config.json; vocab + the seed's added "<PAD>" token
    "vocab_size": 32001, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
}


def report_generator_parameters(lm_config: dict[str, Any], spec: CxrModelSpec) -> ParameterCount:
    """Parameters of the report generator (LoRA-wrapped Llama + projection) for a Llama config, on the meta device.

    Nothing is allocated or downloaded: the LM is built from its config values on ``torch.device("meta")``.
    ``trainable`` = LoRA + projection (the seed prints 12,587,008 for Llama-2-7b), ``frozen`` = the LM's own
    weights; parts ``lora`` and ``projection``.
    """
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        lm = get_peft_model(LlamaForCausalLM(LlamaConfig(**lm_config)), lora_config(spec))
        projection = nn.Linear(spec.feature_dim, lm_config["hidden_size"])
    adapters = nn.ModuleList(m for name, m in lm.named_modules() if name.endswith((".lora_A", ".lora_B")))
    return count_parameters(nn.ModuleDict({"lm": lm, "projection": projection}),
                            {"lora": adapters, "projection": projection})
