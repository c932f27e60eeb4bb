"""The PRS-Med network: structure loss, prompted mask decoders, prompts, the published image encoders wired in,
full-size parameter counts, learning."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from nbsupport.prs_med.decoder import PromptedMaskDecoder, SimpleMaskDecoder
from nbsupport.prs_med.model import (
    PRSMedNet,
    PRSMedSpec,
    full_parameter_counts,
    neighbourhood_mean,
    network_parts,
    prompt_text,
    structure_loss,
)
from nbsupport.prs_med.sam_encoders import encoder_parameter_counts
from prs_med_layouts import SAM_OTHER_PARTS, SAM_TINY, random_tensors, sam_vit_layout, write_tinysam_checkpoint

TINY = PRSMedSpec(image_size=32, sam_hidden=16, sam_layers=1, sam_heads=2, sam_patch=4, sam_out_channels=16,
                  vlm="tiny", vision_size=32, vision_patch=16, vision_hidden=16, vision_layers=1, decoder_hidden=16)


def test_structure_loss_prefers_the_right_mask_and_weighs_boundaries() -> None:
    mask = torch.zeros(1, 1, 40, 40)
    mask[..., 10:30, 10:30] = 1
    right = structure_loss((mask * 2 - 1) * 10, mask)
    wrong = structure_loss((1 - mask * 2) * 10, mask)
    blank = structure_loss(torch.full_like(mask, -10.0), mask)
    assert right < 0.01 < blank < wrong
    # an error on the boundary costs more than the same error deep inside the background (weight 1 + 5|avg - m|)
    edge, far = torch.full_like(mask, -10.0), torch.full_like(mask, -10.0)
    edge[..., 10:30, 10:30] = 10
    far[..., 10:30, 10:30] = 10
    edge[..., 10:30, 9] = 10  # one wrong column next to the square
    far[..., 10:30, 39] = 10  # one wrong column at the image border, far from it
    assert structure_loss(edge, mask) > structure_loss(far, mask)


def test_structure_loss_weights_are_the_31px_average_pool_bit_for_bit() -> None:
    """The separable window sum (issue 23: ~20x faster) must give exactly avg_pool2d's map, so the loss of every
    profile, full's included, is unchanged; odd sizes and masks touching the border too."""
    torch.manual_seed(0)
    for shape in [(8, 1, 128, 128), (2, 1, 256, 192), (1, 1, 17, 33)]:
        mask = (torch.rand(shape) > 0.6).float()
        pooled = torch.nn.functional.avg_pool2d(mask, kernel_size=31, stride=1, padding=15)
        assert torch.equal(neighbourhood_mean(mask, 31), pooled), shape
    assert torch.equal(neighbourhood_mean(mask, 5), torch.nn.functional.avg_pool2d(mask, 5, stride=1, padding=2))


def test_decoder_dropout_zero_makes_the_training_pass_repeatable_and_the_default_keeps_the_fingerprint() -> None:
    torch.manual_seed(0)
    image, prompt, valid = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.long)
    for kind in (SimpleMaskDecoder, PromptedMaskDecoder):
        still, noisy = kind(24, 16, 32, dropout=0.0).train(), kind(24, 16, 32).train()
        assert torch.equal(still(image, prompt, valid, 16)[0], still(image, prompt, valid, 16)[0]), kind
        assert not torch.equal(noisy(image, prompt, valid, 16)[0], noisy(image, prompt, valid, 16)[0]), kind
    # a spec at the default 0.1 writes no decoder_dropout: checkpoints made before the field keep their fingerprint
    assert "decoder_dropout" not in TINY.to_json()
    assert dataclasses.replace(TINY, decoder_dropout=0.0).fingerprint() != TINY.fingerprint()


def test_simple_mask_decoder_shapes_and_ignores_padding() -> None:
    torch.manual_seed(0)
    decoder = SimpleMaskDecoder(prompt_dim=24, image_dim=16, hidden_dim=32).eval()
    image = torch.randn(2, 16, 4, 4)
    prompt = torch.randn(2, 5, 24)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    logits, attention = decoder(image, prompt, valid, output_size=32, return_attention=True)
    assert logits.shape == (2, 1, 32, 32) and logits.abs().max() <= 10
    assert attention.shape == (2, 16, 5)
    assert torch.allclose(attention.sum(-1), torch.ones(2, 16), atol=1e-5)
    assert attention[1, :, 3:].abs().max() == 0
    # what the padded tokens hold cannot change the mask
    changed = prompt.clone()
    changed[1, 3:] = 100.0
    again, _ = decoder(image, changed, valid, output_size=32)
    assert torch.allclose(again[1], logits[1], atol=1e-5) and not torch.allclose(again[0], logits[0] + 1)


@pytest.fixture(scope="module")
def tiny_model() -> PRSMedNet:
    return PRSMedNet(TINY)


def test_encode_scores_only_the_answer(tiny_model: PRSMedNet) -> None:
    tok = tiny_model.tokenizer
    enc = tiny_model.encode(["Where is it?", "Which part of the image contains the polyp?"],
                            ["center", "It is in the top left."])
    ids, labels, mask = enc["input_ids"], enc["labels"], enc["attention_mask"]
    n_image = tiny_model.n_image_tokens
    assert n_image == 4 and (ids == tiny_model.image_token_id).sum(1).tolist() == [n_image, n_image]
    for i, answer in enumerate(["center", "It is in the top left."]):
        scored = labels[i][labels[i] != -100]
        assert tok.decode(scored[:-1]) == answer and scored[-1] == tok.eos_token_id
        assert "### Assistant:" in tok.decode(ids[i][mask[i] == 1])
    assert mask[0, -1] == 0 and mask[1, -1] == 1  # right padding for training
    left = tiny_model.encode(["Where is it?", "Which part of the image contains the polyp?"])
    assert "labels" not in left and left["attention_mask"][0, 0] == 0 and left["attention_mask"][:, -1].all()
    assert prompt_text("Q?") == "\n### User: Q? \n### Assistant: \n"


def test_only_lora_vision_projector_and_heads_train(tiny_model: PRSMedNet) -> None:
    trainable = {n.split(".")[0] for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == {"image_encoder", "vlm", "mask_decoder", "modality_classifier"}
    lm_trainable = [n for n, p in tiny_model.vlm.named_parameters() if p.requires_grad and "language_model" in n]
    assert lm_trainable and all("lora_" in n for n in lm_trainable)
    assert any(n.endswith(("q_proj.lora_A.default.weight", "o_proj.lora_B.default.weight")) for n in lm_trainable)
    assert tiny_model.vlm.peft_config["default"].r == 16


def test_parameter_count_of_the_parts(tiny_model: PRSMedNet) -> None:
    """metrics.json's keys: each part, the LoRA adapters alone (every ``lora_*`` tensor of the VLM, counted once),
    total and trainable; the LoRA tensors are inside the VLM's count."""
    from nbsupport.spec import count_parameters

    counts = count_parameters(tiny_model, network_parts(tiny_model)).to_dict()
    lora = sum(p.numel() for n, p in tiny_model.vlm.named_parameters() if "lora_" in n)
    assert counts["lora_adapters"] == lora > 0
    assert counts["vlm"] == sum(p.numel() for p in tiny_model.vlm.parameters()) > lora
    parts = ("sam_image_encoder", "vlm", "mask_decoder", "modality_classifier")
    assert counts["total"] == sum(counts[k] for k in parts)  # the parts cover the network, without overlap
    assert counts["trainable"] + counts["frozen"] == counts["total"] and counts["frozen"] > 0


def test_position_weight_scores_the_position_words(tiny_model: PRSMedNet) -> None:
    """The weighted answer loss: every position word of the demo answers is one weighted token, and a huge weight
    leaves the mean cross-entropy of those tokens alone (checked against the LLaVA model's own logits)."""
    from nbsupport.prs_med.demo_data import ANSWER_TEMPLATES, POSITION_WORDS

    tok = tiny_model.tokenizer
    answers = [ANSWER_TEMPLATES[i % len(ANSWER_TEMPLATES)].format(finding="polyp", modality="endoscopy image",
                                                                   position=p)
               for i, p in enumerate(POSITION_WORDS.values())]
    enc = tiny_model.encode(["Where is it?"] * len(answers), answers)
    targets = enc["labels"][:, 1:]
    weighted = torch.isin(targets, tiny_model.position_token_ids)
    for i, position in enumerate(POSITION_WORDS.values()):
        words = tok.decode(targets[i][weighted[i]]).split()
        assert words == position.split()
    images = torch.randn(len(answers), 3, 32, 32)
    tiny_model.eval()
    with torch.no_grad():
        out = tiny_model(images, enc["input_ids"], enc["attention_mask"], enc["labels"], position_weight=1e9)
        logits = tiny_model.llava(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                  pixel_values=tiny_model.vlm_pixels(images)).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits[weighted].float(), targets[weighted])
    assert torch.allclose(out.lm_loss, expected, atol=1e-3)
    plain = tiny_model(images, enc["input_ids"], enc["attention_mask"], enc["labels"]).lm_loss
    assert not torch.allclose(plain, expected, atol=1e-3)


def test_conv_stem_keeps_the_patch_grid() -> None:
    """The conv stem replaces CLIP's patch embedding with the same token grid; the tower stays trainable."""
    import dataclasses

    model = PRSMedNet(dataclasses.replace(TINY, vision_stem="conv"))
    tower = model.llava.model.vision_tower
    pixels = model.vlm_pixels(torch.randn(2, 3, 32, 32))
    tokens = tower(pixels).last_hidden_state
    assert tokens.shape == (2, 1 + (32 // 16) ** 2, 16)
    assert all(p.requires_grad for p in tower.embeddings.patch_embedding.parameters())
    with pytest.raises(ValueError, match="vision_stem"):
        PRSMedNet(dataclasses.replace(TINY, vision_stem="resnet"))


def test_spatial_projector_writes_where_into_the_tokens() -> None:
    """Moving a feature to another patch leaves the per-token MLP's token mean unchanged (the LM's values would not
    know where it was) but changes the spatial projector's; the projector sits in the assembled LLaVA."""
    import dataclasses

    from nbsupport.prs_med.model import SpatialProjector

    torch.manual_seed(0)
    proj = SpatialProjector(n_tokens=4, vision_hidden=8, text_hidden=12)
    grid = torch.zeros(1, 4, 8)
    grid[0, 0, 3] = 1.0  # a "finding" feature in the first patch ...
    moved = grid.roll(1, dims=1)  # ... and in the second
    per_token = proj.linear_2(torch.nn.functional.gelu(proj.linear_1(torch.cat([grid, moved]))))
    assert torch.allclose(per_token[0].mean(0), per_token[1].mean(0), atol=1e-6)
    out = proj(torch.cat([grid, moved]))
    assert out.shape == (2, 4, 12) and not torch.allclose(out[0].mean(0), out[1].mean(0), atol=1e-3)
    with pytest.raises(ValueError, match="4 image tokens"):
        proj(torch.zeros(1, 5, 8))
    model = PRSMedNet(dataclasses.replace(TINY, projector="spatial"))
    assert isinstance(model.llava.model.multi_modal_projector, SpatialProjector)
    assert all(p.requires_grad for p in model.llava.model.multi_modal_projector.parameters())
    answers = model.generate_answers(torch.randn(1, 3, 32, 32), ["Where?"], max_new_tokens=2)
    assert len(answers) == 1


def test_full_parameter_counts_on_the_meta_device() -> None:
    counts = full_parameter_counts()
    # Mistral-7B (vocabulary 32000): 7 241 732 096; the <image> token the LLaVA-Med loader adds is one more row of
    # the embedding and of the LM head -- the same count test_llava_med.py finds in the loader's model
    assert counts["vlm_language_model"] == 7_241_732_096 + 2 * 4096
    assert 3.0e8 < counts["vlm_vision_tower"] < 3.1e8  # CLIP ViT-L/14-336: 303 M
    assert counts["vlm_projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    # TinySAM vit_t with the classifier head tinysam_42.3.pth holds (frozen); the official decoder (test_decoder.py)
    assert counts["sam_image_encoder"] == encoder_parameter_counts()["tinysam_vit_t"] == 6_065_532
    assert counts["mask_decoder"] == 5_366_465
    # r x (in + out) per projection: q 4096->4096, k and v 4096->1024 (8 KV heads), o 4096->4096; 32 layers
    assert counts["lora_adapters"] == 32 * 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2)
    assert counts["modality_classifier"] == 256 * 6 + 6
    assert counts["total"] == sum(v for k, v in counts.items() if k not in ("total", "trainable"))
    # trainable: the encoder without its head, the decoder without its unused ffn.norm1 (2 x 256)
    assert counts["trainable"] == 5_743_892 + counts["lora_adapters"] + 5_366_465 - 512 + 256 * 6 + 6


@pytest.mark.slow
def test_the_network_learns_masks_and_answers_of_a_small_set() -> None:
    """Learning test: 20 steps on 6 images with known masks and answers; both losses must fall below the untrained
    network's on the same data (baseline: step 0). The tiny LM is random and learns only through LoRA, the vision
    tower and the projector, so its loss falls slowly: 10.87 -> 10.28 nats measured; the structure loss 1.57 -> 1.17."""
    import numpy as np

    from nbsupport.prs_med.data import image_to_tensor, mask_to_tensor
    from nbsupport.prs_med.demo_data import _lesion_mask, _render

    rng = np.random.default_rng(0)
    positions = ["top left", "bottom right", "center", "top right", "bottom left", "center"]
    masks = [_lesion_mask(rng, 32, p) for p in positions]
    images = torch.stack([image_to_tensor(_render("skin_rgbimage", m, rng), 32) for m in masks])
    targets = torch.stack([mask_to_tensor(m, 32) for m in masks])
    model = PRSMedNet(TINY)
    enc = model.encode(["Where is the lesion?"] * 6, [f"The lesion is in the {p}." for p in positions])
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    first = None
    for _ in range(20):
        out = model(images, **enc)
        seg = structure_loss(out.mask_logits, targets)
        loss = seg + out.lm_loss
        first = first or (float(seg.detach()), float(out.lm_loss.detach()))
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval()
    with torch.no_grad():
        out = model(images, **enc)
    assert float(structure_loss(out.mask_logits, targets)) < 0.85 * first[0]
    assert float(out.lm_loss) < first[1] - 0.2


def test_image_tokens_before_the_answer_and_the_position_head() -> None:
    """Our additions: the image tokens can sit right before the answer, and every projected image token gets a
    5-way position classification whose loss reaches the vision tower and projector (not the frozen LM)."""
    import dataclasses

    from nbsupport.metrics import POSITIONS

    model = PRSMedNet(dataclasses.replace(TINY, image_tokens_at="before_answer", position_head=True))
    enc = model.encode(["Where is it?", "Which part of the image contains the polyp?"],
                       ["center", "It is in the top left."])
    ids, labels = enc["input_ids"], enc["labels"]
    n_image = model.n_image_tokens
    for i in range(2):
        first_answer = int((labels[i] != -100).nonzero()[0])
        assert (ids[i, first_answer - n_image:first_answer] == model.image_token_id).all()
        assert (ids[i, :first_answer - n_image] != model.image_token_id).all()
    left = model.encode(["Where is it?", "Which part of the image contains the polyp?"])
    assert (left["input_ids"][:, -n_image:] == model.image_token_id).all()
    images = torch.randn(2, 3, 32, 32)
    out = model(images, **enc)
    assert out.position_logits is not None and out.position_logits.shape == (2, n_image, len(POSITIONS))
    target = torch.tensor([0, 1]).repeat_interleave(n_image)
    torch.nn.functional.cross_entropy(out.position_logits.flatten(0, 1), target).backward()
    projector = model.llava.model.multi_modal_projector
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    assert all(p.grad is None for n, p in model.vlm.named_parameters() if "lora_" in n)
    public = PRSMedNet(TINY)
    assert public(images, **public.encode(["Q?"] * 2)).position_logits is None
    with pytest.raises(ValueError, match="image_tokens_at"):
        PRSMedNet(dataclasses.replace(TINY, image_tokens_at="end"))


def test_tinysam_checkpoint_with_the_official_decoder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """sam_ckpt = a tinysam_42.3.pth-layout file: every encoder tensor loaded (one load line), its channels size the
    decoder and the modality classifier, and one training pass gives every trainable tensor a gradient, which is
    what DDP needs; the parameters no forward uses (TinyViT's classifier head, the decoder's ffn.norm1) are frozen."""
    path = tmp_path / "weights" / "tinysam_42.3.pth"
    n = write_tinysam_checkpoint(path)
    model = PRSMedNet(dataclasses.replace(TINY, sam_path=str(path), mask_decoder="official"))
    assert f"{path}: loaded {n} of {n} tensors (0 missing, 0 unexpected)\n" in capsys.readouterr().out
    stored = torch.load(path, weights_only=True)
    own = model.image_encoder.encoder.state_dict()
    assert all(torch.equal(v, stored["image_encoder." + k]) for k, v in own.items())
    assert model.image_encoder.kind == "tinyvit" and isinstance(model.mask_decoder, PromptedMaskDecoder)
    assert model.modality_classifier[-1].in_features == 16 == model.image_encoder.out_channels
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad and not n.startswith("vlm.")}
    assert frozen == {"image_encoder.encoder.norm_head.weight", "image_encoder.encoder.norm_head.bias",
                      "image_encoder.encoder.head.weight", "image_encoder.encoder.head.bias",
                      "mask_decoder.ffn.norm1.weight", "mask_decoder.ffn.norm1.bias"}
    enc = model.encode(["Where is it?", "Which part holds the polyp?"], ["center", "It is in the top left."])
    model.train()
    out = model(torch.randn(2, 3, 32, 32), **enc)
    assert out.mask_logits.shape == (2, 1, 32, 32)
    (structure_loss(out.mask_logits, torch.zeros(2, 1, 32, 32)) + out.lm_loss + out.modality_logits.sum()).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_a_sam_vit_checkpoint_takes_its_own_image_size_only(tmp_path: Path) -> None:
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(random_tensors(sam_vit_layout(**SAM_TINY), "image_encoder.") | random_tensors(SAM_OTHER_PARTS), path)
    with pytest.raises(ValueError, match=r"sam_vit_b_01ec64\.pth: a SAM ViT takes 128 px images only.*image_size=128"):
        PRSMedNet(dataclasses.replace(TINY, sam_path=str(path)))
    with pytest.raises(FileNotFoundError, match=r"tinysam_42\.3\.pth does not exist.*releases/download/3\.0"):
        PRSMedNet(dataclasses.replace(TINY, sam_path=str(tmp_path / "tinysam_42.3.pth")))
    with pytest.raises(ValueError, match="channels divisible by 16"):
        PRSMedNet(dataclasses.replace(TINY, sam_out_channels=24, mask_decoder="official"))


def test_checkpoints_written_before_the_encoder_wrapper_still_load() -> None:
    """Earlier PRSMedNet checkpoints hold the random-init SAM ViT as the bare transformers SamVisionModel
    (``image_encoder.vision_encoder.*``); they load into today's wrapped encoder, tensor for tensor."""
    from transformers import SamVisionConfig, SamVisionModel

    torch.manual_seed(5)  # the encoder the code before the wrapper built for TINY
    earlier = SamVisionModel(SamVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                                             patch_size=4, output_channels=16, window_size=4, global_attn_indexes=[0],
                                             mlp_dim=64)).eval()
    model = PRSMedNet(TINY).eval()
    result = model.load_state_dict({"image_encoder." + k: v for k, v in earlier.state_dict().items()}, strict=False)
    assert result.unexpected_keys == [] and not any(k.startswith("image_encoder.") for k in result.missing_keys)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.image_encoder(pixels), earlier(pixel_values=pixels).last_hidden_state)
