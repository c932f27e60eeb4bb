"""LLaVA-Med v1.5 loading: a tiny checkpoint in the published original-LLaVA layout, loaded the way a download is.

The tiny folder has the published file names (config.json with the llava_mistral fields, generation_config.json,
a sentencepiece tokenizer.model with its tokenizer_config.json / special_tokens_map.json, two
model-0000X-of-00002.safetensors shards and model.safetensors.index.json) and the original tensor names
(``model.layers.*``, ``model.mm_projector.0/2.*``, ``model.vision_tower.vision_tower.vision_model.*``, ``lm_head``).
Its tensors come from reference modules built here directly: a MistralForCausalLM (LlavaMistralForCausalLM is one,
with the same names), LLaVA's mlp2x_gelu projector (Sequential(Linear, GELU, Linear)) and a CLIPVisionModel; the
converted model must reproduce their outputs.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from nbsupport.models import ModelNotAvailableError
from nbsupport.prs_med.llava_med import IMAGE_TOKEN, llava_config_from_original, load_llava_med
from nbsupport.weights import WeightsMismatchError

TOWER_NAME = "openai/clip-vit-large-patch14-336"
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, hidden_act="silu")
# an OpenAI-CLIP-shaped tower: 64-wide heads, QuickGELU (so its config can be read off the stored shapes)
TOWER = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2, image_size=28,
             patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
CORPUS = ["the lesion is in the top left of the image", "where is the tumour in this scan",
          "### User: where is it ### Assistant: bottom right", "center of the brain, near the top right"]


# ============================================================================================== the tiny checkpoint
def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (norm weights too), so that any tensor loaded into the wrong place shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return module.eval()


def _tokenizer_files(folder: Path) -> int:
    """A sentencepiece tokenizer.model with Mistral's special-token ids (unk 0, bos 1, eos 2); its vocabulary size."""
    import sentencepiece as spm

    prefix = folder / "sp"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_prefix=str(prefix), vocab_size=60,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (folder / "sp.model").rename(folder / "tokenizer.model")
    (folder / "sp.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 2048,
        "padding_side": "right"}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return 60


def _original_config(vocab: int) -> dict:
    """config.json as LLaVA-Med's training writes it (LlavaMistralConfig = MistralConfig + LLaVA's mm_* fields)."""
    return {"architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral", "attention_dropout": 0.0,
            "initializer_range": 0.02, "use_cache": False, "vocab_size": vocab, **TEXT,
            "image_aspect_ratio": "pad", "mm_hidden_size": TOWER["hidden_size"], "mm_patch_merge_type": "flat",
            "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
            "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "mm_vision_tower": TOWER_NAME,
            "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False, "unfreeze_mm_vision_tower": False,
            "use_mm_proj": True, "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
            "torch_dtype": "bfloat16", "transformers_version": "4.36.2"}


class Reference:
    """The modules the tiny checkpoint is made of: Mistral text model, LLaVA projector, CLIP tower."""

    def __init__(self, vocab: int):
        from transformers import CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM

        self.text = _randomize(MistralForCausalLM(MistralConfig(vocab_size=vocab, **TEXT)), 1)
        self.projector = _randomize(nn.Sequential(nn.Linear(TOWER["hidden_size"], TEXT["hidden_size"]), nn.GELU(),
                                                  nn.Linear(TEXT["hidden_size"], TEXT["hidden_size"])), 2)
        self.tower = _randomize(CLIPVisionModel(CLIPVisionConfig(**TOWER)), 3)
        with torch.no_grad():  # the values as stored (bfloat16); buffers such as rotary frequencies stay exact
            for module in (self.text, self.projector, self.tower):
                for p in module.parameters():
                    p.copy_(p.to(torch.bfloat16))

    def original_state(self, with_tower: bool = True) -> dict[str, torch.Tensor]:
        state = dict(self.text.state_dict())
        state.update({f"model.mm_projector.{k}": v for k, v in self.projector.state_dict().items()})
        if with_tower:  # transformers 4.36's CLIPVisionModel kept its modules under .vision_model
            state.update({f"model.vision_tower.vision_tower.vision_model.{k}": v
                          for k, v in self.tower.state_dict().items()})
        return {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        return self.projector(hidden[:, 1:])  # select layer -2, feature 'patch' (CLS dropped)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, image_token: int | None = None, pixels: torch.Tensor | None = None):
        """Text logits; with ``pixels``, the image features replace the embeddings at ``image_token`` positions."""
        safe = ids.clamp(max=self.text.config.vocab_size - 1)
        embeds = self.text.model.embed_tokens(safe)
        if pixels is not None:
            embeds[ids == image_token] = self.image_features(pixels).reshape(-1, embeds.shape[-1])
        return self.text(inputs_embeds=embeds).logits


def write_original_folder(folder: Path, reference: Reference, vocab: int, with_tower: bool = True,
                          edit=None) -> Path:
    """The published llava_mistral layout, tensors split over two shards with an index."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    _tokenizer_files(folder)
    (folder / "config.json").write_text(json.dumps(_original_config(vocab), indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    state = reference.original_state(with_tower)
    if edit is not None:
        edit(state)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": [n for n in names if n.startswith("model.layers.")],
              "model-00002-of-00002.safetensors": [n for n in names if not n.startswith("model.layers.")]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(v.numel() * 2 for v in state.values())},
             "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_clip_folder(folder: Path, reference: Reference) -> Path:
    """An openai/clip-vit-* style folder: CLIPModel config.json and pytorch_model.bin with both towers."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=50), vision_config=TOWER,
                        projection_dim=16)
    clip = CLIPModel(config)
    clip.vision_model.load_state_dict(reference.tower.state_dict())
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    torch.save({k: v.contiguous() for k, v in clip.state_dict().items()}, folder / "pytorch_model.bin")
    return folder


@pytest.fixture(autouse=True)
def _empty_hf_cache(tmp_path, monkeypatch):
    """No test sees a real Hugging Face cache (the tower lookup would find it)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava-med")
    vocab = 60
    reference = Reference(vocab)
    folder = write_original_folder(root / "llava-med-v1.5-mistral-7b", reference, vocab)
    return folder, reference, vocab


def _load(folder, lines, cache, dtype=torch.float32, **kwargs):
    return load_llava_med(folder, dtype=dtype, cache_dir=cache, log=lines.append, **kwargs)


def _converted_path(lines: list[str]) -> Path:
    return Path(next(re.search(r"converted copy in (.+)$", line).group(1) for line in lines if "converted" in line))


# ============================================================================================== tests
def test_published_layout_loads_every_tensor_and_matches_the_reference(published, tmp_path) -> None:
    folder, reference, vocab = published
    lines: list[str] = []
    model, tokenizer = _load(folder, lines, tmp_path / "cache")
    n = len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    assert f"{folder}: loaded {n} of {n} tensors (0 missing, 0 unexpected)" in lines
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in \
        (folder / "model.safetensors.index.json").read_text()
    cfg = model.config
    assert cfg.text_config.model_type == "mistral" and type(model.model.language_model).__name__ == "MistralModel"
    assert (cfg.text_config.num_key_value_heads, cfg.text_config.intermediate_size) == (2, 64)
    assert cfg.text_config.sliding_window is None and cfg.text_config.rope_parameters["rope_theta"] == 1e6
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-2, "default")
    assert cfg.vision_config.num_attention_heads == 2 and cfg.vision_config.hidden_act == "quick_gelu"
    assert cfg.image_token_index == vocab == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    text = tokenizer("where is the lesion in this scan", return_tensors="pt").input_ids
    with torch.no_grad():
        got = model(input_ids=text).logits
    assert got.shape[-1] == vocab + 1
    torch.testing.assert_close(got[..., :vocab], reference.logits(text), atol=1e-5, rtol=1e-5)

    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        features = torch.stack(model.model.get_image_features(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(features, reference.image_features(pixels), atol=1e-5, rtol=1e-5)

    image_ids = torch.full((2, 4), vocab)  # (28 / 14)^2 = 4 image tokens each, after BOS, before the question
    ids = torch.cat([text[:, :1].expand(2, 1), image_ids, text[:, 1:].expand(2, -1)], dim=1)
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(got[..., :vocab], reference.logits(ids, vocab, pixels), atol=1e-5, rtol=1e-5)


def test_second_load_uses_the_cache_and_a_changed_source_converts_again(published, tmp_path) -> None:
    folder, _, _ = published
    first: list[str] = []
    _load(folder, first, tmp_path / "cache")
    converted = _converted_path(first)
    shard = converted / "model-00001-of-00002.safetensors"
    written = shard.stat().st_mtime_ns
    second: list[str] = []
    model, _ = _load(folder, second, tmp_path / "cache", dtype=None)
    assert _converted_path(second) == converted and shard.stat().st_mtime_ns == written
    assert model.dtype == torch.bfloat16  # dtype=None: as the checkpoint's config says (torch_dtype)
    assert [x for x in second if "loaded" in x] == [x for x in first if "loaded" in x]
    os.utime(folder / "config.json", ns=(written + 10**9, written + 10**9))  # an edited source file
    third: list[str] = []
    _load(folder, third, tmp_path / "cache")
    assert _converted_path(third) != converted


def test_missing_and_unexpected_tensors_are_errors_naming_them(published, tmp_path) -> None:
    _, reference, vocab = published

    def drop(state):
        del state["model.layers.1.mlp.down_proj.weight"]

    def extra(state):
        state["model.mm_projector.4.weight"] = torch.zeros(3)

    def reshape(state):
        state["model.mm_projector.0.weight"] = state["model.mm_projector.0.weight"][:, :64].contiguous()

    for name, edit, expected in (("missing", drop, r"1 missing: model\.language_model\.layers\.1\.mlp\.down_proj"),
                                 ("extra", extra, r"1 unexpected: model\.mm_projector\.4\.weight"),
                                 ("shape", reshape, r"multi_modal_projector\.linear_1\.weight: checkpoint \(32, 64\)")):
        folder = write_original_folder(tmp_path / name, reference, vocab, edit=edit)
        with pytest.raises(WeightsMismatchError, match=expected):
            _load(folder, [], tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*-hf-*"))  # nothing half-converted was kept


def test_tower_from_vision_tower_path_or_the_hf_cache_and_a_clear_error_without(published, tmp_path,
                                                                                monkeypatch) -> None:
    stored, reference, vocab = published
    folder = write_original_folder(tmp_path / "no-tower", reference, vocab, with_tower=False)
    with pytest.raises(ModelNotAvailableError, match=r"openai/clip-vit-large-patch14-336.*\n.*hf download.*"
                                                     r"\n.*vision_tower_path"):
        _load(folder, [], tmp_path / "cache")

    clip = write_clip_folder(tmp_path / "clip-vit", reference)
    lines: list[str] = []
    model, _ = _load(folder, lines, tmp_path / "cache", vision_tower_path=clip)
    n_vlm = len(reference.original_state(with_tower=False))
    n_tower = len(reference.tower.state_dict())
    assert f"{folder}: loaded {n_vlm} of {n_vlm} tensors (0 missing, 0 unexpected)" in lines
    tower_line = next(x for x in lines if x.startswith(f"{clip}: loaded {n_tower} of {n_tower} tensors (0 missing,"))
    assert "allowed unexpected: logit_scale, text_model." in tower_line
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        features = torch.stack(model.model.get_image_features(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(features, reference.image_features(pixels), atol=1e-5, rtol=1e-5)

    lines = []  # a checkpoint with its own tower: of vision_tower_path only config.json is read
    _load(stored, lines, tmp_path / "cache", vision_tower_path=clip)
    assert any("only config.json is read" in x for x in lines) and not any(x.startswith(str(clip)) for x in lines)

    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"  # the config's mm_vision_tower as `hf download` leaves it in the HF cache
    repo = cache / "models--openai--clip-vit-large-patch14-336"
    (repo / "snapshots").mkdir(parents=True)
    clip.rename(repo / "snapshots" / ("b" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    lines = []
    _load(folder, lines, tmp_path / "cache")
    assert any(x.startswith(f"{TOWER_NAME}: loaded {n_tower} of {n_tower} tensors") for x in lines)


def test_hf_converted_layout_loads_directly(published, tmp_path) -> None:
    folder, reference, vocab = published
    model, tokenizer = _load(folder, [], tmp_path / "cache")
    hf = tmp_path / "llava-med-v1.5-mistral-7b-hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    lines: list[str] = []
    again, tokenizer2 = _load(hf, lines, tmp_path / "cache")
    n = len(again.state_dict())
    assert lines == [f"{hf}: loaded {n} of {n} tensors (0 missing, 0 unexpected)"]
    assert tokenizer2.convert_tokens_to_ids(IMAGE_TOKEN) == vocab
    ids = tokenizer2("the top left", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits[..., :vocab], reference.logits(ids))


def test_unsupported_llava_options_are_refused_by_name(published, tmp_path) -> None:
    _, reference, vocab = published
    folder = write_original_folder(tmp_path / "linear", reference, vocab)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mm_projector_type": "linear",
                                                    "mm_use_im_start_end": True}))
    with pytest.raises(ValueError, match=r"config\.json: not supported: mm_projector_type 'linear'.*"
                                         r"mm_use_im_start_end"):
        _load(folder, [], tmp_path / "cache")


def test_full_size_llava_med_on_the_meta_device() -> None:
    """LLaVA-Med v1.5 Mistral-7B: Mistral-7B text model (GQA 32/8 heads, MLP 14336), CLIP ViT-L/14 at 336 px."""
    from transformers import CLIPVisionConfig, LlavaForConditionalGeneration

    from nbsupport.prs_med.llava_med import CLIP_VIT_L_336, LLAVA_MED_V15_CONFIG

    source = {**_original_config(32000), **LLAVA_MED_V15_CONFIG}  # the published config.json's fields
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(llava_config_from_original(source, CLIPVisionConfig(**CLIP_VIT_L_336)))

    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    image_row = 2 * 4096  # <image>: one row of the embedding and one of the LM head
    assert count(llava.model.language_model) + count(llava.lm_head) == 7_241_732_096 + image_row
    assert count(llava.model.vision_tower) == 303_507_456
    assert count(llava.model.multi_modal_projector) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert llava.config.image_seq_length == 576


def test_prs_med_builds_its_vlm_from_the_published_folder(published, tmp_path, monkeypatch, capsys) -> None:
    """`vlm` (the seed's --vlm_path) naming the folder as downloaded: the PRS-Med VLM is LLaVA-Med with LoRA."""
    import dataclasses

    from nbsupport.prs_med.model import PRSMedSpec, build_vlm

    monkeypatch.setenv("NBSUPPORT_CACHE", str(tmp_path / "cache"))
    folder, reference, vocab = published
    vlm, tokenizer = build_vlm(dataclasses.replace(PRSMedSpec(), vlm=str(folder)))
    printed = capsys.readouterr().out
    assert f"{folder}: loaded" in printed and "(0 missing, 0 unexpected)" in printed
    trainable = [n for n, p in vlm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert tokenizer.convert_tokens_to_ids("<image>") == vlm.config.image_token_index


def test_prs_med_on_the_published_layouts_runs_on_meta(published, tmp_path, monkeypatch) -> None:
    """``full``'s network -- LLaVA-Med as downloaded (bf16, as its config.json says), TinySAM's encoder, the official
    decoder -- moved to meta as ``load_trained_model`` moves it: every tensor goes, and the forward's parts run there,
    the VLM's bf16 hidden states prompting the fp32 decoder (a CPU-made tensor or a dtype clash would stop it)."""
    import dataclasses

    from on_meta import forward_parts_on_meta, tensors_off
    from prs_med_layouts import write_tinysam_checkpoint

    from nbsupport.prs_med.model import PRSMedNet, PRSMedSpec

    monkeypatch.setenv("NBSUPPORT_CACHE", str(tmp_path / "cache"))
    folder, _, _ = published
    write_tinysam_checkpoint(tmp_path / "tinysam_42.3.pth")
    spec = dataclasses.replace(PRSMedSpec(), image_size=32, sam_path=str(tmp_path / "tinysam_42.3.pth"),
                               vlm=str(folder), mask_decoder="official", decoder_hidden=16)
    model = PRSMedNet(spec).to("meta").eval()
    assert tensors_off(model, "meta") == {}
    assert model.llava.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    out = forward_parts_on_meta(model, ["Where is the lesion?"], ["It is in the top left."])
    assert {t.device.type for t in out.values()} == {"meta"}
    assert out["mask_logits"].shape == (1, 1, 32, 32) and out["mask_logits"].dtype == torch.float32


def test_02_train_smoke_on_the_published_llava_med_and_tinysam_prints_complete_loads(published, tmp_path, monkeypatch,
                                                                                     capsys) -> None:
    """Issue 18's acceptance: 02_train at the smoke profile with ``vlm_path`` = LLaVA-Med v1.5 as downloaded and
    ``sam_ckpt`` = a tinysam_42.3.pth-layout file trains (with its image-only baseline) and evaluates; every load of
    either prints its one line, nothing missing or unexpected, and the run's spec records both as given."""
    from prs_med_layouts import write_tinysam_checkpoint

    from nbsupport.prs_med import config, demo_data, pipeline
    from nbsupport.runs import RunFolder

    monkeypatch.setenv("NBSUPPORT_CACHE", str(tmp_path / "cache"))
    folder, _, _ = published
    sam = tmp_path / "weights" / "tinysam_42.3.pth"
    write_tinysam_checkpoint(sam)
    root = demo_data.write_demo_dataset(tmp_path / "data", n_train=2, n_val=1, n_test=2, image_size=32,
                                        tasks=("polyp_endoscopy",))
    common = {"profile": "smoke", "manifest": str(tmp_path / "m.csv"), "run_dir": str(tmp_path / "run" / "prs_med")}
    preprocess = config.PreprocessConfig.from_params({**common, "data_root": str(root), "n_examples": 1})
    run = RunFolder.for_stage(preprocess)
    pipeline.preprocess(preprocess, run)
    train = config.TrainConfig.from_params({**common, "image_size": 32, "max_steps": 2, "batch_size": 2,
                                            "max_new_tokens": 3, "vlm_path": str(folder), "sam_ckpt": str(sam),
                                            "mask_decoder": "official", "decoder_hidden": 16})
    capsys.readouterr()
    pipeline.train(train, run)
    printed = capsys.readouterr().out.splitlines()
    for source in (folder, sam):
        loads = [line for line in printed if line.startswith(f"{source}: loaded ")]
        assert loads, f"no load line for {source}"
        assert all(line.endswith("(0 missing, 0 unexpected)") for line in loads), loads
    spec = json.loads((run.path / "model_spec.json").read_text())
    assert (spec["vlm"], spec["sam_path"], spec["mask_decoder"]) == (str(folder), str(sam), "official")
    metrics = json.loads((run.path / "metrics.json").read_text())["02_train"]
    assert metrics["steps"] == 2 and "test_dice" in metrics and "test_baseline_image_only_dice" in metrics
