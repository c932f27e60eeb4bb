"""Tiny stand-ins for the checkpoints ct_clip's `full` reads, in the published layouts: the real file names, config
fields and tensor names, random weights, small sizes. Written by tests (tests/ct_clip/conftest.py's fixtures) and
loaded through the same path as a real download."""
from __future__ import annotations

LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16}


def llm2clip_config(vocab_size: int, **sizes: int) -> dict:
    """config.json of microsoft/LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned (its Hub file, revision 52e9e56),
    with ``sizes`` replacing the published ones."""
    return {"_name_or_path": "LLM2CLIP-Llama-3-2-1B-Instruct-CC-Finetuned", "architectures": ["LlamaBiModel"],
            "auto_map": {"AutoModel": "modeling_bidirectional_llama_encoder.LlamaBiModel"},
            "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
            "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
            "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
            "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
            "transformers_version": "4.44.2", "use_cache": True, "vocab_size": vocab_size, **sizes}


def _llama3_style_tokenizer():
    """A byte-level BPE tokenizer with Llama 3's special tokens (BOS prepended), trained on a few report sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from nbsupport.ct_clip.data import LABELS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=list(LLAMA3_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"{name} is present. {name} is not present." for name in LABELS] * 4, trainer)
    bos = LLAMA3_SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>")


def write_llm2clip_folder(folder, seed: int = 0):
    """The LLM2CLIP base folder as downloaded: config.json, model.safetensors (the LlamaBiModel's own tensor names,
    ``embed_tokens.weight``, ``layers.0...``), tokenizer files, and the custom modeling file (which must never run)."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaModel

    tokenizer = _llama3_style_tokenizer()
    tokenizer.save_pretrained(folder)
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}))
    config = llm2clip_config(len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=[tokenizer.eos_token_id], **TINY_LLAMA)
    torch.manual_seed(seed)
    LlamaModel(LlamaConfig(**config)).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2))  # the published fields, not transformers 5's
    (folder / "modeling_bidirectional_llama_encoder.py").write_text(
        "raise RuntimeError('the checkpoint's own code must never run')\n")
    return folder


def write_llm2vec4cxr_weights(path, base_folder, seed: int = 1):
    """llm2vec4cxr's pytorch_model.bin: an LLM2Vec state dict (``model.*``, ``latent_attn.*``), bfloat16."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    from nbsupport.ct_clip.llm2vec import LLM2Vec

    torch.manual_seed(seed)
    encoder = LLM2Vec(LlamaModel(LlamaConfig.from_pretrained(base_folder)), None, "latent_attention")
    torch.save({k: v.to(torch.bfloat16) for k, v in encoder.state_dict().items()}, path)
    return path


def write_merlin_checkpoint(path, width: int = 4, blocks=(1, 1, 1, 1), seed: int = 2):
    """Merlin's CLIP checkpoint (i3_resnet_clinical_longformer_...pt): MerlinArchitecture's state dict, the image
    tower under ``encode_image.i3_resnet.``, a (much reduced) Longformer text tower and ``logit_scale``."""
    import torch

    from nbsupport.ct_clip.i3resnet import I3ResNet

    torch.manual_seed(seed)
    image = I3ResNet(width, blocks).state_dict()
    for name, value in image.items():  # trained-looking BatchNorm statistics, not the init's 0 / 1
        if name.endswith(("running_mean", "running_var")):
            value.copy_(torch.rand_like(value) + 0.5)
    state = {f"encode_image.i3_resnet.{k}": v for k, v in image.items()}
    state.update({"encode_text.text_encoder.embeddings.word_embeddings.weight": torch.randn(50, 8),
                  "encode_text.linear_layer.weight": torch.randn(512, 768),
                  "encode_text.linear_layer.bias": torch.randn(512), "logit_scale": torch.tensor(1.0)})
    torch.save(state, path)
    return path
