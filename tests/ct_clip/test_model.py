"""ct_clip model: encoder shapes, the two losses against hand computations, text pooling, and a learning test."""
from __future__ import annotations

import math

import pytest
import torch

from nbsupport.ct_clip.model import (
    SENTENCE_CHUNK,
    CTClip,
    CTClipSpec,
    ResNet3DEncoder,
    ViT3DEncoder,
    clip_loss,
    contrastive_loss,
    siglip_loss,
    split_sentences,
)
from nbsupport.metrics import auroc

TINY = dict(input_size=(16, 16, 16), image_width=4, image_blocks=(1, 1), text_encoder="tiny", embed_dim=16)


def test_encoders_map_volumes_to_vectors():
    x = torch.rand(2, 1, 32, 32, 16)
    resnet = ResNet3DEncoder(4, (1, 1, 1))
    fmap = resnet.feature_map(x)
    assert fmap.shape == (2, 16, 2, 2, 1) and resnet.pool(fmap).shape == (2, 32)  # stem and stages halve
    vit = ViT3DEncoder((32, 32, 16), (8, 8, 8), dim=24, depth=1, heads=2)
    fmap = vit.feature_map(x)
    assert fmap.shape == (2, 24, 4, 4, 2) and vit.pool(fmap).shape == (2, 24)
    with pytest.raises(ValueError, match="multiple"):
        ViT3DEncoder((30, 32, 16), (8, 8, 8), 24, 1, 2)


def test_siglip_loss_matches_its_definition():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    expected = -(math.log(torch.sigmoid(torch.tensor(2.0))) + math.log(torch.sigmoid(torch.tensor(1.0)))
                 + math.log(torch.sigmoid(torch.tensor(-0.5))) + math.log(torch.sigmoid(torch.tensor(3.0)))) / 2
    assert siglip_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_clip_loss_is_the_mean_of_both_directions():
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 3.0, 1.0], [0.0, 0.2, 0.1]])
    rows = -torch.log_softmax(logits, 1).diagonal().mean()
    cols = -torch.log_softmax(logits, 0).diagonal().mean()
    assert clip_loss(logits).item() == pytest.approx(((rows + cols) / 2).item(), rel=1e-6)


@pytest.mark.parametrize("loss", ["siglip", "clip"])
def test_both_losses_are_selectable_with_their_initial_temperatures(loss):
    model = CTClip(CTClipSpec(**TINY, loss=loss))
    scale = model.logit_scale.exp().item()
    assert scale == pytest.approx(10.0 if loss == "siglip" else 1 / 0.07, rel=1e-5)
    assert model.logit_bias.item() == (-10.0 if loss == "siglip" else 0.0)
    img, txt = model(torch.rand(3, 1, 16, 16, 16), model.text_encoder(["a.", "b.", "c."]))
    assert img.shape == (3, 16) and torch.allclose(img.norm(dim=-1), torch.ones(3))
    value = contrastive_loss(model, img, txt)
    reference = siglip_loss(model.logits(img, txt)) if loss == "siglip" else clip_loss(model.logits(img, txt))
    assert value.item() == pytest.approx(reference.item())


def test_sentence_mean_pooling_averages_sentence_embeddings():
    model = CTClip(CTClipSpec(**TINY, text_pooling="sentence_mean"))
    report = "No pleural effusion. The heart is enlarged."
    assert split_sentences(report) == ["No pleural effusion.", "The heart is enlarged."]
    with torch.no_grad():
        whole = model.text_encoder([report])
        parts = model.text_encoder(split_sentences(report))
    assert torch.allclose(whole[0], parts.mean(0), atol=1e-5)


def test_contrastive_training_learns_a_finding_beyond_chance():
    """Volumes with a bright sphere vs without, reports saying so (plus an id sentence so reports differ).

    Baseline: an untrained model scores zero-shot AUROC ~0.5 on held-out volumes; training must reach > 0.9.
    """
    gen = torch.Generator().manual_seed(0)
    n = 48
    present = torch.arange(n) % 2 == 0
    grid = torch.stack(torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij"))
    images = torch.rand(n, 1, 16, 16, 16, generator=gen) * 0.2
    for i in range(n):
        if present[i]:
            c = torch.randint(5, 11, (3,), generator=gen).float()
            images[i, 0][((grid - c[:, None, None, None]) ** 2).sum(0) <= 9] += 0.7
    reports = [("Lung nodule is present." if p else "Lung nodule is not present.") + f" Study {i}."
               for i, p in enumerate(present.tolist())]
    torch.manual_seed(0)
    model = CTClip(CTClipSpec(**TINY, text_pooling="sentence_mean", loss="siglip"))
    train, test = slice(0, 32), slice(32, n)
    with torch.no_grad():
        text = model.text_encoder(reports)
        prompts = model.text_encoder(["Lung nodule is present.", "Lung nodule is not present."])

    def zero_shot_auroc() -> float:
        model.eval()
        with torch.no_grad():
            img = model.encode_image(images[test])
            p = model.project_text(prompts)
            score = (img @ p.T).softmax(-1)[:, 0]
        model.train()
        return auroc(present[test].numpy(), score.numpy())

    before = zero_shot_auroc()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(60):
        idx = torch.randperm(32, generator=gen)[:16]
        img, txt = model(images[train][idx], text[train][idx])
        loss = contrastive_loss(model, img, txt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = zero_shot_auroc()
    assert after > 0.9 and after > before + 0.2, (before, after)


def test_sentence_mean_encodes_each_distinct_sentence_once_in_length_sorted_chunks():
    """A batch's distinct sentences go through the tower sorted by token count, SENTENCE_CHUNK at a time (little
    padding); each report's embedding is still the mean of its own sentences' embeddings, encoded one by one."""
    model = CTClip(CTClipSpec(**TINY, text_pooling="sentence_mean")).eval()
    encoder = model.text_encoder
    words = ["effusion", "pleural", "heart", "enlarged", "nodule", "lung", "left", "right"]
    sentences = [" ".join(words[: 1 + k % 8]) + f" {k}." for k in range(2 * SENTENCE_CHUNK + 3)]
    reports = [" ".join(sentences[i::5]) for i in range(5)] + [sentences[0]]  # the last repeats a sentence
    chunks = encoder._sentence_chunks(list(dict.fromkeys(sentences)), batch_size=64)
    assert [len(c) for c in chunks] == [SENTENCE_CHUNK, SENTENCE_CHUNK, 3]
    lengths = [len(encoder.tokenizer(s)["input_ids"]) for chunk in chunks for s in chunk]
    assert lengths == sorted(lengths) and sorted(s for c in chunks for s in c) == sorted(sentences)
    with torch.no_grad():
        pooled = encoder(reports)
        one_by_one = [torch.cat([encoder._mean([s]) for s in split_sentences(r)]).mean(0) for r in reports]
    assert torch.allclose(pooled, torch.stack(one_by_one), atol=1e-5)
