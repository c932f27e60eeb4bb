"""LLM2Vec as CT-Data builds it: bidirectional, pooled over the text's tokens, LLM2CLIP's folder and llm2vec4cxr's
weights loaded tensor for tensor through the path a download takes, and the full size on the meta device."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from nbsupport import ct_clip
from nbsupport.ct_clip.llm2vec import SEPARATOR, LLM2Vec, is_bidirectional_folder, llm2vec_on_meta, load_llm2vec
from nbsupport.ct_clip.model import CTClip, CTClipSpec
from nbsupport.runs import RunFolder
from nbsupport.weights import WeightsMismatchError, read_state_dict

from ct_clip_checkpoints import TINY_LLAMA, llm2clip_config

LOAD_LINE = "loaded {n} of {n} tensors (0 missing, 0 unexpected)"


def test_the_published_folder_and_weights_load_every_tensor(llm2vec_checkpoint, capsys):
    base, weights = llm2vec_checkpoint
    encoder = load_llm2vec(base, weights, "latent_attention", max_length=512)
    out = capsys.readouterr().out
    n_base = len(LlamaModel(LlamaConfig.from_pretrained(base)).state_dict())
    assert f"{base}: {LOAD_LINE.format(n=n_base)}" in out
    assert f"{weights}: {LOAD_LINE.format(n=n_base + 9)}" in out  # + latents, attention (4), MLP (4)
    saved = read_state_dict(weights)
    assert set(saved) == set(encoder.state_dict())  # llm2vec4cxr's names: model.*, latent_attn.*
    for name in ("model.layers.1.self_attn.q_proj.weight", "latent_attn.latents", "latent_attn.mlp.2.bias"):
        torch.testing.assert_close(encoder.state_dict()[name], saved[name].float(), msg=name)
    assert encoder.tokenizer.pad_token == encoder.tokenizer.eos_token and encoder.tokenizer.padding_side == "left"


def test_the_model_is_bidirectional_and_pools_only_the_text(llm2vec_checkpoint):
    base, weights = llm2vec_checkpoint
    encoder = load_llm2vec(base, weights, log=None).eval()
    batch = encoder.tokenize(["Cardiomegaly is present."])
    changed = batch["input_ids"].clone()
    changed[0, -1] = encoder.tokenizer.convert_tokens_to_ids("<|start_header_id|>")

    def first_token_state(model, ids):
        return model(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state[0, 0]

    with torch.no_grad():
        moved = (first_token_state(encoder.model, batch["input_ids"])
                 - first_token_state(encoder.model, changed)).abs().max()
        causal = LlamaModel(encoder.config.__class__.from_pretrained(base)).eval()  # what AutoModel would give
        causal.load_state_dict(encoder.model.state_dict())
        still = (first_token_state(causal, batch["input_ids"]) - first_token_state(causal, changed)).abs().max()
        assert getattr(causal.config, "is_causal", True) and still == 0  # a causal model's first token never sees the last
        assert moved > 1e-3

        alone = encoder.embed(["Cardiomegaly is present."])
        padded = encoder.embed(["Cardiomegaly is present.", "Pleural effusion is not present. " * 3])
        torch.testing.assert_close(alone[0], padded[0], atol=1e-5, rtol=1e-4)  # padding neither seen nor pooled

        features = encoder.tokenize([f"Find the effusion.{SEPARATOR}Pleural effusion is present."])
        text_tokens = len(encoder.tokenizer("Pleural effusion is present.", add_special_tokens=False).input_ids)
        assert features["embed_mask"][0].tolist() == [0] * (features["embed_mask"].shape[1] - text_tokens) + \
            [1] * text_tokens
        hidden = encoder.model(input_ids=features["input_ids"],
                               attention_mask=features["attention_mask"]).last_hidden_state[0, -text_tokens:]
        per_token = encoder.latent_attn.mlp(encoder.latent_attn.multihead_attn(
            hidden[None], encoder.latent_attn.latents[None], encoder.latent_attn.latents[None])[0])
        torch.testing.assert_close(encoder(features)[0], per_token[0].mean(0))  # the seed's per-sample pooling


def test_a_weights_file_that_does_not_fit_is_an_error_naming_tensors(llm2vec_checkpoint, tmp_path):
    base, weights = llm2vec_checkpoint
    state = read_state_dict(weights)
    unprefixed = tmp_path / "unprefixed.bin"  # a Llama saved on its own: loads nothing under strict=False
    torch.save({k.removeprefix("model."): v for k, v in state.items()}, unprefixed)
    with pytest.raises(WeightsMismatchError, match=r"missing: .*model\.embed_tokens\.weight.*unexpected: "):
        load_llm2vec(base, unprefixed, log=None)
    with pytest.raises(WeightsMismatchError, match=r"unexpected: latent_attn\."):
        load_llm2vec(base, weights, "mean", log=None)  # no latent attention to put them in
    pickled = tmp_path / "pickled.bin"
    torch.save({"pooling": LLM2Vec}, pickled)
    with pytest.raises(ValueError, match="weights_only"):
        load_llm2vec(base, pickled, log=None)


def test_ct_clip_builds_the_llm2vec_tower_with_the_seeds_lora(llm2vec_checkpoint, capsys):
    base, weights = llm2vec_checkpoint
    assert is_bidirectional_folder(base)
    spec = CTClipSpec(input_size=(16, 16, 16), image_width=4, image_blocks=(1, 1), text_encoder=str(base),
                      text_encoder_weights=str(weights), text_pooling="latent_attention", text_tuning="lora",
                      lora_r=4, lora_alpha=4, max_text_length=512, embed_dim=16)
    model = CTClip(spec)
    assert LOAD_LINE.format(n=29) in capsys.readouterr().out
    trained = {n for n, p in model.text_encoder.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)  # the pooling and the Llama frozen (CT-Data main.py:249)
    assert {n.split(".")[-4] for n in trained} == {"q_proj", "k_proj", "v_proj"}  # Llama has no out_proj
    assert model.text_encoder.backbone.model.config.is_causal is False
    features = model.text_encoder(["Cardiomegaly is present.", "Lung nodule is not present."])
    assert features.shape == (2, TINY_LLAMA["hidden_size"]) and features.requires_grad


def test_the_full_size_text_tower_has_llama_3_2_1b_parameters():
    config = LlamaConfig(**llm2clip_config(128256))
    encoder = llm2vec_on_meta(config)
    llama = sum(p.numel() for p in encoder.model.parameters())
    pooling = sum(p.numel() for p in encoder.latent_attn.parameters())
    assert llama == 1_235_814_400  # Llama-3.2-1B, tied embeddings: "1.23B" (Meta's model card)
    d = 2048
    assert pooling == 512 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * (d * d + d)  # latents, attention, MLP
    assert {p.device.type for p in encoder.parameters()} == {"meta"}


def test_02_train_smoke_on_the_published_layouts_prints_complete_loads(tiny_manifest, llm2vec_checkpoint,
                                                                       merlin_checkpoint, tmp_path, capfd):
    _, manifest = tiny_manifest
    base, weights = llm2vec_checkpoint
    cfg = ct_clip.TrainConfig.from_params({
        "profile": "smoke", "manifest": str(manifest), "run_dir": str(tmp_path / "run" / "ct_clip"),
        "text_encoder": str(base), "text_encoder_weights": str(weights), "text_pooling": "latent_attention",
        "max_text_length": 512, "image_arch": "i3resnet", "image_width": 4, "image_blocks": [1, 1, 1, 1],
        "image_weights": str(merlin_checkpoint), "input_size": [32, 32, 16], "max_steps": 2, "batch_size": 2})
    outcome = ct_clip.train(cfg, RunFolder.for_stage(cfg))
    out = capfd.readouterr().out
    for source in (base, weights, merlin_checkpoint):
        lines = [line for line in out.splitlines() if line.startswith(f"{source}: loaded ")]
        assert lines and all(line.endswith("(0 missing, 0 unexpected)") for line in lines), (source, lines)
    assert outcome.parameters.trainable < outcome.parameters.total and (outcome.checkpoint / "model.safetensors").is_file()
