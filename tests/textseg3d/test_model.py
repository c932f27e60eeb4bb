"""LLMSeg network: shapes, the frozen encoder with learnable context prompts, <SEG> read-out, image-only ablation."""
from __future__ import annotations

import pytest
import torch

from nbsupport.spec import count_parameters
from nbsupport.textseg3d.model import SEG_TOKEN, LLMSegSpec, build_llmseg, voxels_per_scale

REPORTS = ["N0, cT2, breast conserving surgery, left side",
           "N1, cT3, total mastectomy surgery, right side, with a much longer remark about the axilla"]


def _spec(**changes) -> LLMSegSpec:
    values = dict(feature_size=8, n_prompts=2, context_length=3, text_encoder="tiny_sentence", roi=(32, 32, 64))
    values.update(changes)
    return LLMSegSpec(**values)


@pytest.mark.parametrize(("kind", "readout"), [("tiny_sentence", "mean"), ("tiny_sentence", "last_word"),
                                               ("tiny_causal", "mean")])
def test_text_tokens_are_one_per_prompt_and_independent_of_batch_padding(kind: str, readout: str) -> None:
    model = build_llmseg(_spec(text_encoder=kind, text_readout=readout))
    enc = model.text_encoder
    alone = enc([REPORTS[0]])
    batched = enc(REPORTS)  # the first report is right-padded here
    assert alone.shape == (1, 2, enc.hidden_size) and batched.shape == (2, 2, enc.hidden_size)
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batched[0], batched[1])
    assert not torch.allclose(alone[0, 0], alone[0, 1])  # the two context prompts give two different tokens


def test_causal_encoder_reads_the_seg_token_added_to_the_vocabulary() -> None:
    model = build_llmseg(_spec(text_encoder="tiny_causal"))
    enc = model.text_encoder
    seg_id = enc.tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    assert seg_id == len(enc.tokenizer) - 1 and enc.embedding_layer().num_embeddings >= len(enc.tokenizer)
    ids, mask = enc._token_ids(REPORTS)
    last = mask.sum(1) - 1
    assert (ids[torch.arange(2), last] == seg_id).all()
    # the feature is the hidden state at <SEG>: changing a word before it changes it, padding after it does not
    a, b = enc(["N0, cT2, bcs, left side"]), enc(["N0, cT2, bcs, right side"])
    assert not torch.allclose(a, b)


def test_only_contexts_and_the_unet_train_and_gradients_reach_the_contexts() -> None:
    model = build_llmseg(_spec())
    counts = count_parameters(model)
    assert counts.frozen == sum(p.numel() for p in model.text_encoder.backbone.parameters())
    image = torch.randn(2, 1, 32, 32, 64)
    logits = model(image, REPORTS)
    assert logits.shape == (2, 2, 32, 32, 64)
    logits[:, 1].mean().backward()
    assert model.text_encoder.contexts.grad is not None and model.text_encoder.contexts.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.text_encoder.backbone.parameters())
    assert all(f.layers[0].cross_attn_image_to_token.q_proj.weight.grad is not None for f in model.fusion)


def test_the_report_changes_the_segmentation_and_the_image_only_model_has_no_text_path() -> None:
    model = build_llmseg(_spec()).eval()
    image = torch.randn(1, 1, 32, 32, 64)
    with torch.no_grad():
        left, right = model(image, REPORTS[:1]), model(image, REPORTS[1:])
    assert (left - right).abs().max() > 1e-4
    image_only = build_llmseg(_spec(use_text=False))
    assert image_only.text_encoder is None and not hasattr(image_only, "fusion")
    assert count_parameters(image_only).frozen == 0
    assert image_only(image).shape == (1, 2, 32, 32, 64)
    assert _spec().fingerprint() != _spec(use_text=False).fingerprint()


def test_roi_must_be_divisible_by_32() -> None:
    with pytest.raises(ValueError, match="divisible by 32"):
        build_llmseg(_spec(roi=(32, 48, 64)))
    assert voxels_per_scale((64, 352, 352)) == [32 * 176 * 176, 16 * 88 * 88, 8 * 44 * 44, 4 * 22 * 22, 2 * 11 * 11]


def test_random_positional_encoding_lets_the_fusion_tell_positions_apart() -> None:
    """With image_pe="zeros" (public code) a uniform volume gives the same fused feature everywhere; with SAM's random
    Fourier features the text tokens' attention, and so the fused features, depend on where a voxel is."""
    image = torch.full((1, 1, 32, 32, 64), 0.5)
    fused = {}
    for pe in ("zeros", "random"):
        model = build_llmseg(_spec(image_pe=pe)).eval()
        torch.manual_seed(1)
        text = 3 * torch.randn(1, 2, model.text_encoder.hidden_size)  # two clearly different text tokens
        with torch.no_grad():
            fused[pe] = model.fuse(0, model.encoders[0](image), text)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))  # away from the padded borders
    assert fused["zeros"][inner].std(dim=(2, 3, 4)).max() < 1e-4
    assert fused["random"][inner].std(dim=(2, 3, 4)).max() > 1e-2
    with pytest.raises(ValueError, match="image_pe"):
        build_llmseg(_spec(image_pe="learned"))


def test_last_word_readout_is_the_hidden_state_before_sep() -> None:
    """text_readout="last_word" returns the encoder's last hidden state at the report's last word (before [SEP])."""
    model = build_llmseg(_spec(text_readout="last_word")).eval()
    enc = model.text_encoder
    report = "N0, cT2, breast conserving surgery, left side"
    ids, _ = enc._token_ids([report])
    assert enc.tokenizer.convert_ids_to_tokens(int(ids[0, -2])) == "side"
    assert int(ids[0, -1]) == enc.tokenizer.sep_token_id
    with torch.no_grad():
        feature = enc([report])
        embed = enc.embedding_layer()
        cls = embed(torch.tensor([[enc.tokenizer.cls_token_id]]))
        for p in range(2):
            seq = torch.cat([cls, enc.contexts[p][None], embed(ids)], dim=1)
            hidden = enc.backbone(inputs_embeds=seq, attention_mask=torch.ones(seq.shape[:2])).last_hidden_state
            torch.testing.assert_close(feature[0, p], hidden[0, -2], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="readout"):
        build_llmseg(_spec(text_encoder="tiny_causal", text_readout="last_word"))


def test_token_readout_gives_every_report_token_and_keeps_padding_out_of_the_fusion() -> None:
    """text_readout="tokens": one fusion token per report token and prompt; a right-padded report in a batch gives
    the same tokens and the same segmentation as alone (its padding is masked out of the two-way attention), while
    unmasked padding would change it."""
    model = build_llmseg(_spec(text_readout="tokens", image_pe="random")).eval()
    enc = model.text_encoder
    ids, _ = enc._token_ids([REPORTS[0]])
    with torch.no_grad():
        alone = model.encode_reports([REPORTS[0]])
        batched = model.encode_reports(REPORTS)
        assert alone.tokens.shape == (1, 2 * ids.shape[1], enc.hidden_size) and bool(alone.mask.all())
        assert batched.tokens.shape[1] > alone.tokens.shape[1] and not bool(batched.mask[0].all())
        real = batched.mask[0]
        torch.testing.assert_close(batched.tokens[0][real], alone.tokens[0], atol=1e-5, rtol=1e-4)
        image = torch.randn(2, 1, 32, 32, 64)
        logits_batched = model.segment(image, batched)
        logits_alone = model.segment(image[:1], alone)
        torch.testing.assert_close(logits_batched[:1], logits_alone, atol=1e-4, rtol=1e-4)
        unmasked = type(batched)(batched.tokens, torch.ones_like(batched.mask))
        assert not torch.allclose(model.segment(image, unmasked)[:1], logits_alone, atol=1e-4, rtol=1e-4)
        # the sliding window broadcasts one report's tokens over a batch of patches
        assert model.segment(image, alone).shape == (2, 2, 32, 32, 64)
    with pytest.raises(ValueError, match="center_text"):
        build_llmseg(_spec(text_readout="tokens", center_text=True))


def test_fusion_attention_is_monai_attention_computed_fused_and_masks_only_the_padding() -> None:
    """Every attention of the fusion blocks is MONAI's ``Attention`` function of the same parameters (checkpoints
    interchangeable); a key mask equals dropping the masked keys."""
    from monai.networks.nets.vista3d import Attention

    from nbsupport.textseg3d.model import FusedAttention

    model = build_llmseg(_spec(text_readout="tokens"))
    block = model.fusion[1]
    fused = [block.final_attn_token_to_image] + [a for layer in block.layers for a in
                                                (layer.self_attn, layer.cross_attn_token_to_image,
                                                 layer.cross_attn_image_to_token)]
    assert all(type(a) is FusedAttention for a in fused)
    attn = block.layers[0].cross_attn_image_to_token
    reference = Attention(attn.embedding_dim, attn.num_heads,
                          downsample_rate=attn.embedding_dim // attn.internal_dim)
    reference.load_state_dict(attn.state_dict())
    torch.manual_seed(0)
    q, kv = torch.randn(2, 50, attn.embedding_dim), torch.randn(2, 7, attn.embedding_dim)
    with torch.no_grad():
        torch.testing.assert_close(attn(q=q, k=kv, v=kv), reference(q=q, k=kv, v=kv), atol=1e-5, rtol=1e-4)
        attn.key_mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
        try:
            masked = attn(q=q, k=kv, v=kv)
        finally:
            attn.key_mask = None
        torch.testing.assert_close(masked[0], reference(q=q[:1], k=kv[:1], v=kv[:1])[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(masked[1], reference(q=q[1:], k=kv[1:, :4], v=kv[1:, :4])[0], atol=1e-5,
                                   rtol=1e-4)


def _encoder_inputs_and_outputs(model, image: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """What each of the five encoder blocks received and returned in one forward pass."""
    inputs, outputs = [], []
    hooks = [enc.register_forward_hook(lambda m, args, out: inputs.append(args[0]) or outputs.append(out))
             for enc in model.encoders]
    try:
        with torch.no_grad():
            model(image, REPORTS[:1])
    finally:
        for h in hooks:
            h.remove()
    return inputs, outputs


def test_llmseg_wiring_encodes_unfused_features_then_fuses_every_scale() -> None:
    """tvseg/MM-LLM-RO model/contextunet.py:259-279: encoder blocks chained on their own outputs, the two-way fusion
    of each scale afterwards, the decoders reading the fused scales; a residual block in the first decoder only."""
    model = build_llmseg(_spec()).eval()
    assert model.spec.wiring == "llmseg"
    image = torch.randn(1, 1, 32, 32, 64)
    inputs, outputs = _encoder_inputs_and_outputs(model, image)
    for i in range(1, 5):
        torch.testing.assert_close(inputs[i], outputs[i - 1], rtol=0, atol=0)  # unfused
    fused = []
    hooks = [block.register_forward_hook(lambda m, args, out: fused.append(out[1])) for block in model.fusion]
    with torch.no_grad():
        model(image, REPORTS[:1])
    for h in hooks:
        h.remove()
    assert len(fused) == 5 and all(f.shape[1] == o.flatten(2).shape[2] for f, o in zip(fused, outputs))
    assert [type(d.conv_block).__name__ for d in model.decoders] == ["UnetResBlock"] + ["UnetBasicBlock"] * 3


def test_fused_chain_wiring_feeds_each_fused_scale_to_the_next_encoder_block() -> None:
    model = build_llmseg(_spec(wiring="fused_chain")).eval()
    inputs, outputs = _encoder_inputs_and_outputs(model, torch.randn(1, 1, 32, 32, 64))
    for i in range(1, 5):
        assert inputs[i].shape == outputs[i - 1].shape and not torch.allclose(inputs[i], outputs[i - 1])
    assert [type(d.conv_block).__name__ for d in model.decoders] == ["UnetResBlock"] * 4


def test_specs_written_before_the_wiring_field_rebuild_as_the_fused_chain() -> None:
    """A model_spec.json of an earlier run has no ``wiring``: it is the fused chain, its fingerprint unchanged; a new
    spec writes ``"wiring": "llmseg"`` and so cannot load an earlier checkpoint by mistake."""
    earlier = '{"feature_size": 8, "n_prompts": 2, "context_length": 3, "text_encoder": "tiny_sentence"}'
    old = LLMSegSpec.from_json(earlier)
    assert old.wiring == "fused_chain" and "wiring" not in old.to_json()
    new = LLMSegSpec.from_json(_spec().to_json())
    assert new.wiring == "llmseg" and '"wiring": "llmseg"' in new.to_json()
    assert new.fingerprint() != LLMSegSpec.from_json(_spec(wiring="fused_chain").to_json()).fingerprint()
    with pytest.raises(ValueError, match="wiring must be one of"):
        build_llmseg(_spec(wiring="other"))
