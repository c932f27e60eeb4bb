"""LLaVA-Med v1.5 as a transformers ``LlavaForConditionalGeneration``, from the folder exactly as downloaded.

PRS-Med's VLM is ``microsoft/llava-med-v1.5-mistral-7b``, published in the original LLaVA repository's format, which
transformers does not read: ``config.json`` says ``model_type: "llava_mistral"`` (a class registered only by LLaVA's
own code, microsoft/LLaVA-Med llava/model/language_model/llava_mistral.py:16) and the tensors are named after
LLaVA's modules, not transformers' Llava. :func:`load_llava_med` accepts that folder and an HF-converted LLaVA folder
(``model_type: "llava"``) alike:

* **original layout** (``llava_mistral``): converted once into an HF LLaVA folder cached under
  ``nbsupport.paths.model_cache_dir()`` (keyed by the sizes and modification times of the source files, the vision
  tower's files when it comes from elsewhere, and the transformers version; written under a temporary name and
  renamed into place, see :func:`nbsupport.cache.cached_folder`), then loaded from there;
* **HF layout** (``llava``): loaded directly.

The conversion keeps every tensor: the text model stays Mistral (``MistralConfig`` from the source config's own
fields: grouped-query attention with its ``num_key_value_heads``, ``intermediate_size``, ``sliding_window``,
``rope_theta``), the two-layer projector becomes ``multi_modal_projector``, and the CLIP vision tower comes from
(in this order) the copy stored in the checkpoint, the local folder ``vision_tower_path``, or the config's
``mm_vision_tower`` found in the local Hugging Face cache; nothing is downloaded. LLaVA's ``mm_vision_select_layer``
(-2) and ``mm_vision_select_feature`` (``patch``: CLS dropped) become ``vision_feature_layer`` and
``vision_feature_select_strategy`` (``default``). The original loader itself builds the tower with
``delay_load=True`` and then loads ``mm_vision_tower`` from the hub (haotian-liu/LLaVA llava/model/llava_arch.py:35,
builder.py:156), so a stored copy is the frozen CLIP it was trained with (``unfreeze_mm_vision_tower: false``).

One vocabulary entry is added: ``<image>`` (id = the source vocabulary size, 32000 for LLaVA-Med), the placeholder
transformers' Llava replaces with image features. LLaVA's own code splices features in at the sentinel id -200
instead (llava/constants.py:8) and has no such row. The new embedding row is never read (it is overwritten by the
image features); the new LM-head row is the mean of the others (transformers' converter samples around that mean,
convert_llava_weights_to_hf.py), so its logit is the mean logit and greedy decoding does not pick it.

Every load prints one line per source through :mod:`nbsupport.weights`, naming the folder the user gave, e.g.::

    weights/llava-med-v1.5-mistral-7b: loaded 686 of 686 tensors (0 missing, 0 unexpected)

Weights are read from safetensors or with ``torch.load(weights_only=True)``; no code from a checkpoint runs.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nbsupport.models import ModelNotAvailableError, resolve_pretrained
from nbsupport.weights import LoadReport, WeightsMismatchError, load_into, read_state_dict, report_hf_load

Log = Callable[[str], None]
IMAGE_TOKEN = "<image>"
CONVERSION_VERSION = "1"  # bump when the converted folder's content changes
REPORT_FILE = "nbsupport-load-report.json"  # in the converted folder: what each source supplied
ORIGINAL_MODEL_TYPES = ("llava_mistral",)
# LLaVA-only fields of the original config.json (llava_arch.py initialize_vision_modules, train.py ModelArguments);
# the rest of the file is the MistralConfig of the language model.
_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
                "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
                "rope_theta", "rope_scaling", "rope_parameters", "sliding_window", "attention_dropout")
# Tensors that are recomputed, not loaded: rotary frequencies and CLIP's position-id index (non-persistent buffers
# in transformers; convert_llava_weights_to_hf.py skips ".inv_freq" too). Listed in the load line when present.
_RECOMPUTED = ("*.rotary_emb.inv_freq", "*.embeddings.position_ids")
# The text half of a CLIPModel folder (openai/clip-vit-large-patch14-336 holds both towers); LLaVA loads only
# CLIPVisionModel from it (llava/model/multimodal_encoder/clip_encoder.py:30).
_CLIP_TEXT_HALF = ("text_model.*", "text_projection.*", "visual_projection.*", "logit_scale")
_CLIP_VISION_PARTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
_STORED_TOWER = "model.vision_tower.vision_tower."
# What shapes the network in microsoft/llava-med-v1.5-mistral-7b's config.json (Hugging Face model page, files at
# commit f2f7230): Mistral-7B-Instruct-v0.2 as the LLM (model card), so vocab_size 32000 -- its last shard,
# model-00004-of-00004.safetensors (262 MB), is the 32000 x 4096 bf16 lm_head -- GQA with 8 KV heads, MLP 14336,
# rope_theta 1e6, no sliding window; LLaVA's mlp2x_gelu projector from the 1024-wide CLIP tower's layer -2.
LLAVA_MED_V15_CONFIG = {
    "architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral", "vocab_size": 32000,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "image_aspect_ratio": "pad",
    "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
    "mm_use_im_start_end": False, "mm_patch_merge_type": "flat"}
# openai/clip-vit-large-patch14-336's vision half (its config.json): ViT-L/14 at 336 px, QuickGELU.
CLIP_VIT_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                  "image_size": 336, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"}


# ============================================================================================== public
def load_llava_med(vlm_path: str | os.PathLike, vision_tower_path: str | os.PathLike | None = None,
                   dtype: torch.dtype | str | None = None, device_map: Any = None,
                   cache_dir: str | os.PathLike | None = None, log: Log | None = print) -> tuple[Any, Any]:
    """(``LlavaForConditionalGeneration`` in eval mode, tokenizer with an ``<image>`` token) from a LLaVA folder.

    Args:
        vlm_path: the published LLaVA-Med v1.5 folder as downloaded (``model_type: llava_mistral``), or an
            HF-converted LLaVA folder (``model_type: llava``); a hub id is looked up in the local HF cache only.
        vision_tower_path: a local CLIP folder (``CLIPModel`` or ``CLIPVisionModel``; ``config.json`` plus
            ``model.safetensors`` or ``pytorch_model.bin``), whose weights are used when the checkpoint holds no
            copy of the tower (with a stored copy only its config.json is read). None: the config's
            ``mm_vision_tower`` from the local HF cache.
        dtype: dtype of the loaded weights (``torch.bfloat16``, ``"float32"``, ...); None: as the checkpoint's
            config says (``torch_dtype``).
        device_map: passed to ``from_pretrained`` (``"auto"``, ``{"": 0}``, ...); None: CPU.
        cache_dir: where converted folders go (default ``nbsupport.paths.model_cache_dir()``).
        log: where the load lines go (``print``; None: nowhere).

    Raises:
        ModelNotAvailableError: ``vlm_path`` or the vision tower is not on this machine (says what to download).
        WeightsMismatchError: a tensor is missing, unexpected or of another shape (all of them named).
        ValueError: a config field this loader cannot honour (named, with the file).
    """
    label = str(vlm_path)
    folder = Path(resolve_pretrained(vlm_path, "vlm_path"))
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelNotAvailableError(f"vlm_path: {folder} has no config.json (expected a LLaVA model folder)")
    source = json.loads(config_file.read_text(encoding="utf-8"))
    model_type = source.get("model_type")
    if model_type == "llava" and "text_config" in source:
        return _load_hf_llava(folder, label, dtype, device_map, log, vision_tower_path)
    if model_type not in ORIGINAL_MODEL_TYPES or "mm_vision_tower" not in source:
        raise ValueError(f"{config_file}: model_type {model_type!r} is neither an original LLaVA-Mistral checkpoint "
                         f"({', '.join(ORIGINAL_MODEL_TYPES)} with mm_vision_tower) nor an HF LLaVA folder "
                         "('llava' with text_config)")
    _check_llava_options(source, config_file)
    tower = _tower_source(folder, source, vision_tower_path, label, log)
    converted = _converted_folder(folder, source, tower, cache_dir)
    if log is not None:
        log(f"{label}: original LLaVA layout ({model_type}); using its converted copy in {converted}")
    return _load_converted(converted, label, tower, dtype, device_map, log)


def llava_config_from_original(source: Mapping[str, Any], vision_config: Any, vocab_size: int | None = None) -> Any:
    """The ``LlavaConfig`` equivalent to an original LLaVA-Mistral ``config.json``.

    Args:
        source: the parsed ``config.json`` (``llava_mistral``).
        vision_config: the tower's ``CLIPVisionConfig``.
        vocab_size: the language model's vocabulary; default: the source's plus one row for ``<image>``, whose id
            is the source's vocabulary size (the conversion checks the source tensors with the source's size).
    """
    from transformers import LlavaConfig, MistralConfig

    text = MistralConfig(**{k: source[k] for k in _TEXT_FIELDS if k in source})
    image_token = int(source["vocab_size"])
    text.vocab_size = image_token + 1 if vocab_size is None else vocab_size
    if source.get("torch_dtype"):
        text.dtype = source["torch_dtype"]
    feature = source.get("mm_vision_select_feature", "patch")  # clip_encoder.py:15 default
    side = vision_config.image_size // vision_config.patch_size
    config = LlavaConfig(vision_config=vision_config, text_config=text, image_token_index=image_token,
                         image_seq_length=side * side, projector_hidden_act="gelu",
                         vision_feature_layer=int(source.get("mm_vision_select_layer", -2)),
                         vision_feature_select_strategy="default" if feature == "patch" else "full",
                         tie_word_embeddings=bool(source.get("tie_word_embeddings", False)))
    config.image_aspect_ratio = source.get("image_aspect_ratio", "square")  # 'pad': pad to square (mm_utils.py:169)
    if source.get("torch_dtype"):
        config.dtype = source["torch_dtype"]
    return config


# ============================================================================================== original layout
def _check_llava_options(source: Mapping[str, Any], config_file: Path) -> None:
    """Refuse the LLaVA options transformers' Llava has no equivalent for, naming the field."""
    problems = []
    projector = source.get("mm_projector_type", "linear")  # multimodal_projector/builder.py:34 default
    if projector != "mlp2x_gelu":  # Linear, GELU, Linear (builder.py:39-45) = LlavaMultiModalProjector
        problems.append(f"mm_projector_type {projector!r} (only 'mlp2x_gelu' maps to LlavaMultiModalProjector)")
    if source.get("mm_vision_select_feature", "patch") not in ("patch", "cls_patch"):
        problems.append(f"mm_vision_select_feature {source['mm_vision_select_feature']!r}")
    if source.get("mm_use_im_start_end"):
        problems.append("mm_use_im_start_end true (image start/end tokens)")
    if source.get("mm_patch_merge_type", "flat") != "flat":
        problems.append(f"mm_patch_merge_type {source['mm_patch_merge_type']!r} (only 'flat')")
    if source.get("s2"):
        problems.append("s2 true (multi-scale CLIP)")
    if "vocab_size" not in source or "hidden_size" not in source:
        problems.append("no vocab_size / hidden_size")
    if problems:
        raise ValueError(f"{config_file}: not supported: " + "; ".join(problems))


def _source_files(folder: Path) -> tuple[list[Path], Path | None]:
    """(weight files of a checkpoint folder, its index file or None), for safetensors and pickled shards alike."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))], index
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name], None
    raise ModelNotAvailableError(f"vlm_path: {folder} holds no model.safetensors[.index.json] or "
                                 "pytorch_model.bin[.index.json]")


class _Tower:
    """Where the vision tower comes from: ``stored`` in the checkpoint, or a local CLIP ``folder``; and its config."""

    def __init__(self, stored: bool, folder: Path | None, label: str, config: Any):
        self.stored, self.folder, self.label, self.config = stored, folder, label, config


def _tower_source(folder: Path, source: Mapping[str, Any], vision_tower_path: str | os.PathLike | None,
                  label: str, log: Log | None) -> _Tower:
    """The stored copy if the checkpoint has one, else ``vision_tower_path``, else ``mm_vision_tower`` (HF cache)."""
    files, index = _source_files(folder)
    names = json.loads(index.read_text(encoding="utf-8"))["weight_map"] if index else _tensor_shapes(files)
    stored = [n for n in names if n.startswith(_STORED_TOWER)]
    hub_name = str(source["mm_vision_tower"])
    given = Path(resolve_pretrained(vision_tower_path, "vision_tower_path")) if vision_tower_path else None
    if stored:
        if given is not None and log is not None:
            log(f"{label}: holds its own copy of the vision tower ({len(stored)} tensors); of "
                f"vision_tower_path={str(vision_tower_path)!r} only config.json is read")
        local = given or _local_clip_folder(hub_name)  # for its config.json; without one the tower's shapes say
        config = _clip_vision_config(local) if local else _clip_config_from_shapes(folder, files, stored, hub_name)
        return _Tower(True, None, label, config)
    if given is not None:
        return _Tower(False, given, str(vision_tower_path), _clip_vision_config(given))
    tower = _local_clip_folder(hub_name)
    if tower is None:
        raise ModelNotAvailableError(
            f"{label}: the checkpoint holds no vision tower, and its mm_vision_tower {hub_name!r} is not in the local "
            f"Hugging Face cache (nothing is downloaded). On a machine with network access run\n"
            f"    hf download {hub_name} --local-dir weights/{hub_name.split('/')[-1]}\n"
            "and pass that folder as vision_tower_path (or point HF_HOME at a cache holding it).")
    return _Tower(False, tower, hub_name, _clip_vision_config(tower))


def _local_clip_folder(name: str) -> Path | None:
    try:
        return Path(resolve_pretrained(name, "mm_vision_tower"))
    except ModelNotAvailableError:
        return None


def _clip_vision_config(folder: Path) -> Any:
    """The ``CLIPVisionConfig`` of a CLIP folder (a ``clip`` config's vision half, or a ``clip_vision_model``)."""
    from transformers import CLIPVisionConfig

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelNotAvailableError(f"vision tower: {folder} has no config.json (expected a CLIP model folder)")
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    if raw.get("model_type") == "clip":
        raw = raw.get("vision_config") or {}
    elif raw.get("model_type") != "clip_vision_model":
        raise ValueError(f"{config_file}: model_type {raw.get('model_type')!r}; the vision tower must be a CLIP "
                         "model ('clip' or 'clip_vision_model')")
    return CLIPVisionConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures")})


def _clip_config_from_shapes(folder: Path, files: Sequence[Path], stored: Sequence[str], hub_name: str) -> Any:
    """The stored tower's ``CLIPVisionConfig`` from its tensor shapes, for OpenAI CLIP ViTs (no config file needed).

    Shapes give width, patch, resolution, depth and MLP width; the rest is OpenAI CLIP's design (openai/CLIP
    clip/model.py, ``CLIP.__init__``: ``vision_heads = vision_width // 64``; QuickGELU; LayerNorm eps 1e-5).
    """
    from transformers import CLIPVisionConfig

    if not hub_name.startswith("openai/clip-vit"):
        raise ModelNotAvailableError(f"vlm_path: {folder}: the stored vision tower is {hub_name!r}, whose attention "
                                     "heads its shapes do not tell; pass its folder (config.json is enough) as "
                                     "vision_tower_path")
    prefix = _STORED_TOWER + "vision_model."
    wanted = {f"{prefix}embeddings.class_embedding", f"{prefix}embeddings.patch_embedding.weight",
              f"{prefix}embeddings.position_embedding.weight", f"{prefix}encoder.layers.0.mlp.fc1.weight"}
    shapes = _tensor_shapes(files)
    missing = sorted(wanted - set(shapes))
    if missing:
        raise WeightsMismatchError(f"vlm_path: {folder}: the stored vision tower lacks {', '.join(missing)}")
    width = shapes[f"{prefix}embeddings.class_embedding"][0]
    patch = shapes[f"{prefix}embeddings.patch_embedding.weight"][-1]
    positions = shapes[f"{prefix}embeddings.position_embedding.weight"][0]
    layers = {int(m.group(1)) for n in stored if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", n))}
    return CLIPVisionConfig(hidden_size=width, intermediate_size=shapes[f"{prefix}encoder.layers.0.mlp.fc1.weight"][0],
                            num_hidden_layers=len(layers), num_attention_heads=width // 64, patch_size=patch,
                            image_size=math.isqrt(positions - 1) * patch, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5)


def _tensor_shapes(files: Sequence[Path]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of some weight files, without reading the tensors (safetensors headers;
    pickled files memory-mapped, ``weights_only=True``)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            shapes.update({k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)})
    return shapes


# ============================================================================================== renaming
def _llava_name(key: str) -> str:
    """transformers' Llava name of an original LLaVA-Mistral tensor (unknown names come back unchanged).

    The mapping of transformers' convert_llava_weights_to_hf.py (KEYS_TO_MODIFY_MAPPING), written for the module
    names of transformers 5 (``model.language_model``, a flat ``model.vision_tower``).
    """
    if key.startswith(_STORED_TOWER + "vision_model."):
        return "model.vision_tower." + key[len(_STORED_TOWER + "vision_model."):]
    projector = re.fullmatch(r"model\.mm_projector\.([02])\.(weight|bias)", key)
    if projector:  # nn.Sequential(Linear, GELU, Linear): indices 0 and 2 (projector builder.py:42-45)
        return f"model.multi_modal_projector.linear_{1 if projector.group(1) == '0' else 2}.{projector.group(2)}"
    if key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")):
        return "model.language_model." + key[len("model."):]
    return key  # lm_head.weight keeps its name; anything else is reported as unexpected


def _clip_name(key: str) -> str:
    """The Llava name of a tensor of a CLIP folder (``vision_model.*`` of CLIPModel/CLIPVisionModel, or flat)."""
    if key.startswith("vision_model."):
        return "model.vision_tower." + key[len("vision_model."):]
    if key.startswith(_CLIP_VISION_PARTS):
        return "model.vision_tower." + key
    return key


def _part(model: nn.Module, paths: Sequence[str]) -> nn.Module:
    """A module exposing only the submodules at ``paths`` under their full names (for per-source load checks)."""
    root = nn.Module()
    for path in paths:
        *parents, name = path.split(".")
        holder = root
        for parent in parents:
            if parent not in holder._modules:
                holder.add_module(parent, nn.Module())
            holder = holder._modules[parent]
        holder.add_module(name, model.get_submodule(path))
    return root


# ============================================================================================== conversion
def _converted_folder(folder: Path, source: Mapping[str, Any], tower: _Tower,
                      cache_dir: str | os.PathLike | None) -> Path:
    """The cached HF LLaVA folder converted from ``folder`` (built on first use)."""
    import transformers

    from nbsupport.cache import cached_folder
    from nbsupport.paths import model_cache_dir

    inputs = [p for p in folder.iterdir() if p.is_file()]
    if tower.folder is not None:
        inputs += [p for p in tower.folder.iterdir() if p.is_file()]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", folder.name).lstrip(".") or "llava"
    params = {"tower": "stored" if tower.stored else str(tower.folder), "transformers": transformers.__version__}
    return cached_folder(f"{name}-hf", params, lambda tmp: _convert(folder, source, tower, tmp), inputs=inputs,
                         version=CONVERSION_VERSION, root=Path(cache_dir) if cache_dir else model_cache_dir())


def _convert(folder: Path, source: Mapping[str, Any], tower: _Tower, out: Path) -> None:
    """Write the HF LLaVA folder: renamed tensors (shard by shard), config, tokenizer, and the per-source report.

    Names and shapes are checked against the network (built on the meta device) before any tensor is written.
    """
    import safetensors.torch
    from transformers import LlavaForConditionalGeneration

    files, _ = _source_files(folder)
    shards = [(path, _llava_name) for path in files]
    if tower.folder is not None:
        shards += [(path, _clip_name) for path in _source_files(tower.folder)[0]]
    shapes = [{_llava_name(k): s for k, s in _tensor_shapes(files).items()},
              {_clip_name(k): s for k, s in _tensor_shapes(_source_files(tower.folder)[0]).items()}
              if tower.folder is not None else {}]
    with torch.device("meta"):
        network = LlavaForConditionalGeneration(llava_config_from_original(source, tower.config,
                                                                           vocab_size=int(source["vocab_size"])))
    reports = _check_sources(network, shapes, tower, str(folder))
    tokenizer = _tokenizer_with_image_token(folder, int(source["vocab_size"]))
    weight_map: dict[str, str] = {}
    total = 0
    for i, (path, rename) in enumerate(shards):
        state = {rename(k): v for k, v in read_state_dict(path).items()}
        state = _with_image_token_rows({k: v.contiguous() for k, v in state.items() if not _not_kept(k)})
        shard_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors.torch.save_file(state, str(out / shard_name), metadata={"format": "pt"})
        weight_map.update({k: shard_name for k in state})
        total += sum(v.numel() * v.element_size() for v in state.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    llava_config_from_original(source, tower.config).save_pretrained(out)
    if (folder / "generation_config.json").is_file():
        (out / "generation_config.json").write_text((folder / "generation_config.json").read_text(encoding="utf-8"))
    tokenizer.save_pretrained(out)
    (out / REPORT_FILE).write_text(json.dumps(reports, indent=2))


def _not_kept(name: str) -> bool:
    """Recomputed buffers and CLIP's text half: allowed in a source (and listed), not written."""
    import fnmatch

    return any(fnmatch.fnmatchcase(name, p) for p in (*_RECOMPUTED, *_CLIP_TEXT_HALF))


def _check_sources(model: nn.Module, shapes: Sequence[Mapping[str, tuple[int, ...]]], tower: _Tower,
                   folder: str) -> list[dict[str, Any]]:
    """Every tensor of the network comes from exactly one source, with its shape; the report of each source.

    Raises:
        WeightsMismatchError: naming missing, unexpected or wrongly shaped tensors, per source.
    """
    everything = ["model.language_model", "model.multi_modal_projector", "lm_head", "model.vision_tower"]
    parts = [("vlm", everything if tower.stored else everything[:3], _RECOMPUTED, folder)]
    if not tower.stored:
        parts.append(("vision_tower", everything[3:], (*_RECOMPUTED, *_CLIP_TEXT_HALF), str(tower.folder)))
    reports = []
    for i, (what, paths, allowed, where) in enumerate(parts):
        meta = {k: torch.empty(s, device="meta") for k, s in shapes[i].items()}
        report = load_into(_part(model, paths), meta, where, allow_unexpected=allowed, log=None)
        reports.append({"source": what, "loaded": report.loaded, "expected": report.expected,
                        "unexpected": list(report.unexpected)})
    return reports


def _with_image_token_rows(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Embedding and LM head with one more row for ``<image>``: the mean of the others (see the module docstring)."""
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if name in state:
            weight = state[name]
            state[name] = torch.cat([weight, weight.float().mean(0, keepdim=True).to(weight.dtype)])
    return state


def _tokenizer_with_image_token(folder: Path, vocab_size: int) -> Any:
    """The checkpoint's tokenizer plus ``<image>`` at id ``vocab_size``; pad = unk as LLaVA trains
    (haotian-liu/LLaVA llava/train/train.py:902)."""
    from transformers import AddedToken, AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoTokenizer warns that it does not know model_type 'llava_mistral'
    try:  # tokenizer_config.json names the class (LlamaTokenizer), so the unknown model type does not matter
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    finally:
        hf_logging.set_verbosity(level)
    if len(tokenizer) != vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {len(tokenizer)} tokens but config.json says vocab_size "
                         f"{vocab_size}; <image> would not get id {vocab_size}")
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


# ============================================================================================== loading
def _load_converted(converted: Path, label: str, tower: _Tower, dtype: torch.dtype | str | None, device_map: Any,
                    log: Log | None) -> tuple[Any, Any]:
    """Load the converted folder and print one line per source (the folders the user named, not the cache)."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(
        converted, output_loading_info=True, local_files_only=True, dtype=_dtype(dtype), device_map=device_map)
    report_hf_load(converted, model, info, log=None)  # the converted copy itself must be complete
    reports = json.loads((converted / REPORT_FILE).read_text(encoding="utf-8"))
    for entry in reports:
        source = label if entry["source"] == "vlm" else tower.label
        line = LoadReport(source, entry["loaded"], entry["expected"], unexpected=tuple(entry["unexpected"])).line()
        if log is not None:
            log(line)
    tokenizer = AutoTokenizer.from_pretrained(converted, local_files_only=True)
    return model.eval(), tokenizer


def _load_hf_llava(folder: Path, label: str, dtype: torch.dtype | str | None, device_map: Any, log: Log | None,
                   vision_tower_path: str | os.PathLike | None) -> tuple[Any, Any]:
    """An HF LLaVA folder: ``from_pretrained`` with the load line; the tokenizer must know the image token."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    if vision_tower_path is not None and log is not None:
        log(f"{label}: an HF LLaVA folder holds its vision tower; vision_tower_path={str(vision_tower_path)!r} "
            "is not used")
    model, info = LlavaForConditionalGeneration.from_pretrained(
        folder, output_loading_info=True, local_files_only=True, dtype=_dtype(dtype), device_map=device_map)
    report_hf_load(label, model, info, log=log)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id != model.config.image_token_index:
        raise ValueError(f"{folder}: config.json's image_token_index is {model.config.image_token_index} but the "
                         f"tokenizer's {IMAGE_TOKEN} is {image_id}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return model.eval(), tokenizer


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype
