"""Disease attention, the vision model, the QLoRA report generator, the spec and the meta-device parameter count."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nbsupport.cxr_report.model import (
    LLAMA2_7B_CONFIG,
    REPORTING_ORDER,
    CxrModelSpec,
    DiseaseAttention,
    ReportGenerator,
    VisionModel,
    classifier_findings_prompt,
    encode_example,
    keep_4bit_weights_trainable,
    lm_prompts,
    load_language_model,
    pad_examples,
    prompt_token_ids,
    report_generator_parameters,
)


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nbsupport.models import tiny_causal_lm

    folder = tmp_path_factory.mktemp("tiny_lm")
    lm, tokenizer = tiny_causal_lm(seed=0)
    with torch.no_grad():
        # At the default init (std 0.02) the frozen, tied output head cannot give any token a clear margin, so
        # nothing trained through LoRA could be told apart; x5 makes confident predictions expressible.
        lm.get_input_embeddings().weight.mul_(5.0)
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_disease_attention_is_a_softmax_over_patches() -> None:
    attention = DiseaseAttention(14, 49)
    patches = torch.randn(2, 49, 8)
    tokens, weights = attention(patches)
    assert tokens.shape == (2, 14, 8) and weights.shape == (14, 49)
    assert torch.allclose(weights.sum(1), torch.ones(14))
    assert torch.allclose(tokens[1, 3], (weights[3][:, None] * patches[1]).sum(0), atol=1e-6)


def test_densenet121_gives_49_patches_of_1024_at_224() -> None:
    model = VisionModel(CxrModelSpec(encoder="densenet121", image_size=224)).eval()
    with torch.no_grad():
        assert model.patches(torch.zeros(1, 3, 224, 224)).shape == (1, 49, 1024)


def test_patch_evidence_adds_up_to_the_logits() -> None:
    model = VisionModel(CxrModelSpec(encoder="densenet_tiny", image_size=96)).eval()
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        _, logits, _ = model(images)
        evidence = model.patch_evidence(images)
    assert evidence.shape == (2, 14, 9)
    assert torch.allclose(evidence.sum(-1) + model.classifier[1].bias, logits, atol=1e-4)


def test_trainable_parameters_of_the_full_configuration_match_the_seed() -> None:
    counts = report_generator_parameters(LLAMA2_7B_CONFIG, CxrModelSpec(encoder="densenet121"))
    # The seed notebook prints 12,587,008 trainable parameters (LoRA on q/k/v/o of 32 layers + the projection).
    assert counts.parts["lora"] == 32 * 4 * 8 * (4096 + 4096)
    assert counts.parts["projection"] == 1024 * 4096 + 4096
    assert counts.trainable == 12_587_008
    assert counts.frozen == 6_738_423_808  # Llama-2-7b with the seed's added <PAD> token (32001 x 4096 twice)


def test_the_full_profile_is_the_seed_and_lora_targets_reach_the_spec() -> None:
    from nbsupport.cxr_report.config import TrainConfig
    from nbsupport.cxr_report.pipeline import model_spec

    full = model_spec(TrainConfig.from_params({"profile": "full"}), None)
    assert report_generator_parameters(LLAMA2_7B_CONFIG, full).trainable == 12_587_008
    all_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    spec = model_spec(TrainConfig.from_params({"profile": "full", "lora_targets": all_linear}), None)
    assert spec.lora_targets == tuple(all_linear)
    # QLoRA's all-linear adapters on Llama-2-7b, r=8: the MLP's gate/up/down (4096 <-> 11008) join q/k/v/o
    assert report_generator_parameters(LLAMA2_7B_CONFIG, spec).parts["lora"] == 32 * 8 * (4 * 8192 + 3 * (4096 + 11008))


def test_trainable_parameters_of_a_small_config() -> None:
    config = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    counts = report_generator_parameters(config, CxrModelSpec(encoder="densenet_tiny", lora_r=4))
    kv = 32 // 4 * 2  # k/v project to num_key_value_heads * head_dim = 16
    per_layer = 4 * (32 + 32) + 4 * (32 + kv) * 2 + 4 * (32 + 32)  # q, k, v, o: r * (in + out)
    assert counts.parts["lora"] == 2 * per_layer
    assert counts.parts["projection"] == 17 * 32 + 32
    assert counts.trainable == 2 * per_layer + 17 * 32 + 32 and counts.total == counts.trainable + counts.frozen


def test_loss_covers_only_report_tokens(tiny_lm_dir: Path) -> None:
    spec = CxrModelSpec(encoder="densenet_tiny", language_model=str(tiny_lm_dir), quantization="none")
    lm, tokenizer = load_language_model(spec)
    generator = ReportGenerator(spec, lm, tokenizer).eval()
    example = encode_example(tokenizer, "Describe.", "No pneumothorax.", 32)
    n_prompt = len(prompt_token_ids(tokenizer, "Describe."))
    assert example["labels"][:n_prompt] == [-100] * n_prompt
    assert example["labels"][-1] == tokenizer.eos_token_id
    ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
    tokens = torch.randn(1, 14, 17)
    with torch.no_grad():
        logits = generator(tokens, ids, torch.ones_like(ids)).logits[0, 14:]  # all positions; text ones here
        labelled_only = generator(tokens, ids, torch.ones_like(ids), labels).loss
        generator.labelled_logits_only = False
        lm_loss = generator(tokens, ids, torch.ones_like(ids), labels).loss
    target = labels[0]
    manual = torch.nn.functional.cross_entropy(logits[:-1][target[1:] != -100], target[1:][target[1:] != -100])
    assert lm_loss.item() == pytest.approx(manual.item(), rel=1e-5)
    assert labelled_only.item() == pytest.approx(manual.item(), rel=1e-5)


def test_labelled_logits_loss_matches_the_lm_loss_on_a_padded_batch(tiny_lm_dir: Path) -> None:
    spec = CxrModelSpec(encoder="densenet_tiny", language_model=str(tiny_lm_dir), quantization="none")
    lm, tokenizer = load_language_model(spec)
    generator = ReportGenerator(spec, lm, tokenizer).eval()
    examples = [encode_example(tokenizer, "Describe.", r, 32) for r in ("No pneumothorax.", "Large left effusion.")]
    ids, mask, labels = pad_examples(examples, tokenizer.pad_token_id,
                                     length=max(len(e["input_ids"]) for e in examples) + 3)
    tokens = torch.randn(2, 14, 17)
    with torch.no_grad():
        fast = generator(tokens, ids, mask, labels)
        generator.labelled_logits_only = False
        seed = generator(tokens, ids, mask, labels)
    assert fast.logits is None and seed.logits is not None
    assert fast.loss.item() == pytest.approx(seed.loss.item(), rel=1e-5)


def test_packed_batch_gives_the_padded_batch_loss_and_gradients(tiny_lm_dir: Path) -> None:
    """``pack_sequences`` (demo profile) runs the examples as one padding-free row: the loss and the projection's
    gradient must equal the padded batch's, so a mask that let one example see another would fail here."""
    spec = CxrModelSpec(encoder="densenet_tiny", language_model=str(tiny_lm_dir), quantization="none")
    lm, tokenizer = load_language_model(spec)
    generator = ReportGenerator(spec, lm, tokenizer).eval()
    reports = ("No pneumothorax.", "Large left effusion with basal atelectasis.", "Normal heart size.")
    examples = [encode_example(tokenizer, "Describe.", r, 32) for r in reports]
    ids, mask, labels = pad_examples(examples, tokenizer.pad_token_id)
    tokens = torch.randn(3, 14, 17)
    results = []
    for packed in (False, True):
        generator.pack_sequences = packed
        generator.zero_grad()
        loss = generator(tokens, ids, mask, labels).loss
        loss.backward()
        results.append((loss.item(), generator.projection.weight.grad.clone()))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)
    # the same rows one by one, to be sure the padded reference itself keeps the examples apart
    alone = [generator(tokens[k:k + 1], ids[k:k + 1, :len(e["input_ids"])], mask[k:k + 1, :len(e["input_ids"])],
                       labels[k:k + 1, :len(e["input_ids"])]).loss.item() for k, e in enumerate(examples)]
    counts = [sum(t != -100 for t in e["labels"][1:]) for e in examples]
    assert results[1][0] == pytest.approx(sum(a * n for a, n in zip(alone, counts)) / sum(counts), rel=1e-5)


def test_specs_written_before_the_findings_prompt_keep_their_fingerprint(tiny_lm_dir: Path) -> None:
    plain = CxrModelSpec(encoder="densenet_tiny", language_model=str(tiny_lm_dir), quantization="none")
    prompted = CxrModelSpec(encoder="densenet_tiny", language_model=str(tiny_lm_dir), quantization="none",
                            findings_prompt=True)
    # a spec written before the option existed reads back with the same fingerprint (its checkpoints still load)
    assert "findings_prompt" not in plain.to_json()
    assert CxrModelSpec.from_json(plain.to_json()).fingerprint("report") == plain.fingerprint("report")
    assert CxrModelSpec.from_json(prompted.to_json()) == prompted and prompted.fingerprint() != plain.fingerprint()


def test_report_parameter_groups_give_the_input_side_its_own_rate(tiny_lm_dir: Path) -> None:
    from nbsupport.cxr_report.task import report_parameter_groups

    spec = CxrModelSpec(encoder="densenet_tiny", language_model=str(tiny_lm_dir), quantization="none")
    lm, tokenizer = load_language_model(spec)
    generator = ReportGenerator(spec, lm, tokenizer)
    trainable = {id(p) for p in generator.parameters() if p.requires_grad}
    for projection_lr, input_lr in ((None, 1e-3), (2e-2, 2e-2)):
        groups = report_parameter_groups(generator, 1e-3, projection_lr, 0.01)
        grouped = [id(p) for g in groups for p in g["params"]]
        assert sorted(grouped) == sorted(trainable)  # every trainable tensor once
        rate = {id(p): g["lr"] for g in groups for p in g["params"]}
        decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
        assert rate[id(generator.projection.weight)] == rate[id(generator.projection.bias)] == input_lr
        lora = [p for n, p in generator.named_parameters() if "lora_" in n]
        assert lora and all(rate[id(p)] == 1e-3 for p in lora)
        assert decay[id(generator.projection.weight)] == 0.01 and decay[id(generator.projection.bias)] == 0.0


@pytest.fixture()
def one_thread() -> object:
    """Tiny matrices: a single thread avoids OpenMP's synchronisation cost (large on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quantized_generator_learns_to_use_the_image(tiny_lm_dir: Path, one_thread: object) -> None:
    """Two 'images' (fixed disease tokens) with different reports. After training the 4-bit LM's LoRA adapters and
    the projection, each report must be clearly more likely given its own image than given the other (baseline:
    the same model and text with the other image's tokens; before training the two are equal)."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    spec = CxrModelSpec(encoder="densenet_tiny", language_model=str(tiny_lm_dir), quantization="nf4")
    lm, tokenizer = load_language_model(spec)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in lm.modules())
    generator = ReportGenerator(spec, lm, tokenizer)
    reports = ["There is cardiomegaly.", "No pneumothorax."]
    images = torch.randn(2, 14, 17)
    examples = [encode_example(tokenizer, "Report:", r, 16) for r in reports]
    ids, mask, labels = pad_examples(examples, tokenizer.pad_token_id)

    def per_report_loss(image_tokens: torch.Tensor) -> list[float]:
        with torch.no_grad():
            return [float(generator(image_tokens[k:k + 1], ids[k:k + 1], mask[k:k + 1], labels[k:k + 1]).loss)
                    for k in range(2)]

    generator.eval()
    before = per_report_loss(images)
    trainable = [p for p in generator.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    generator.train()
    for _ in range(60):
        loss = generator(images, ids, mask, labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    generator.eval()
    matched, swapped = per_report_loss(images), per_report_loss(images.flip(0))
    for k in range(2):
        assert matched[k] < before[k] - 1.0, (before, matched)
        assert matched[k] < swapped[k] - 1.0, (matched, swapped)


def test_classifier_findings_prompt_names_the_positive_labels() -> None:
    from nbsupport.cxr_report.labeler import LABELS

    probs = [0.0] * 14
    probs[LABELS.index("Cardiomegaly")], probs[LABELS.index("Pleural Effusion")] = 0.9, 0.5
    probs[LABELS.index("Edema")], probs[LABELS.index("No Finding")] = 0.49, 0.99
    probs[LABELS.index("Support Devices")] = 0.7
    # named in the order a report states them (devices, lungs, pleura, heart), not in LABELS order
    assert sorted(REPORTING_ORDER) == sorted(set(LABELS) - {"No Finding"})
    expected = "Describe. Classifier findings: support devices, pleural effusion, cardiomegaly."
    assert classifier_findings_prompt("Describe.", probs) == expected
    assert classifier_findings_prompt("Describe.", [0.1] * 14) == "Describe. Classifier findings: none."
    with pytest.raises(ValueError, match="14 label probabilities"):
        classifier_findings_prompt("Describe.", [0.9] * 13)
    seed = CxrModelSpec(findings_prompt=False)
    assert lm_prompts(seed, ["Describe."], torch.tensor([probs])) == ["Describe."]
    ours = CxrModelSpec(findings_prompt=True, findings_threshold=0.95)
    assert lm_prompts(ours, ["Describe."], torch.tensor([probs])) == ["Describe. Classifier findings: none."]


def test_training_after_a_no_grad_evaluation_gets_the_same_gradients(tiny_lm_dir: Path, one_thread: object) -> None:
    """Validation between epochs (eval mode, no grad) must leave the NF4 LM as it was for the training backward
    (bitsandbytes repacks the weights for CPU inference, after which the gradient through them is wrong)."""
    spec = CxrModelSpec(encoder="densenet_tiny", language_model=str(tiny_lm_dir), quantization="nf4",
                        lora_dropout=0.0)
    lm, tokenizer = load_language_model(spec)
    keep_4bit_weights_trainable(lm)
    generator = ReportGenerator(spec, lm, tokenizer)
    example = encode_example(tokenizer, "Describe.", "There is cardiomegaly.", 16)
    ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
    tokens = torch.randn(1, 14, 17)

    def loss_and_gradient() -> tuple[float, torch.Tensor]:
        generator.zero_grad()
        loss = generator(tokens, ids, torch.ones_like(ids), labels).loss
        loss.backward()
        return float(loss), generator.projection.weight.grad.clone()

    generator.train()
    loss_before, gradient_before = loss_and_gradient()
    assert gradient_before.norm() > 0
    generator.eval()
    with torch.no_grad():
        generator(tokens, ids, torch.ones_like(ids), labels)
    generator.train()
    loss_after, gradient_after = loss_and_gradient()
    assert loss_after == pytest.approx(loss_before, rel=1e-4)
    assert torch.allclose(gradient_after, gradient_before, rtol=1e-3, atol=1e-6)


def test_training_prompts_name_the_reports_own_labels_and_validation_the_classifiers() -> None:
    import pandas as pd

    from nbsupport.cxr_report.data import LABEL_COLUMNS
    from nbsupport.cxr_report.task import prompt_findings

    labels = [[None] * 14, [None] * 14, [None] * 14]
    labels[0][2], labels[0][8] = 1.0, -1.0  # train: cardiomegaly positive, atelectasis uncertain
    labels[1][2] = 1.0  # val
    manifest = pd.DataFrame(labels, columns=list(LABEL_COLUMNS)).assign(split=["train", "val", "test"])
    probabilities = torch.full((3, 14), 0.3)
    probabilities[0, 5] = 0.9  # the classifier's call on the training image: edema
    findings = prompt_findings(manifest, probabilities)
    assert findings[0].tolist() == [1.0 if k == 2 else 0.0 for k in range(14)]
    assert torch.equal(findings[1:], probabilities[1:])


def test_findings_beam_choice_keeps_the_first_beam_that_states_the_classifiers_findings() -> None:
    from nbsupport.cxr_report.labeler import LABELS
    from nbsupport.cxr_report.inference import choose_reports

    beams = [["Pneumothorax is not seen. No effusion.", "Small right pneumothorax. The heart is enlarged.",
              "There is a right pneumothorax.", "There is a left pneumothorax."],
             ["The lungs are clear.", "No pneumothorax."]]
    probabilities = torch.zeros(2, 14)
    probabilities[0, LABELS.index("Pneumothorax")] = 0.8
    probabilities[1, LABELS.index("No Finding")] = 0.9  # not a finding a prompt names
    assert choose_reports(beams, "score") == [beams[0][0], beams[1][0]]
    # beam 1 states pneumothorax but adds cardiomegaly; beams 2 and 3 state it alone: the better-scoring one
    assert choose_reports(beams, "findings", probabilities) == [beams[0][2], beams[1][0]]
    probabilities[0, LABELS.index("Cardiomegaly")] = 0.5  # at the threshold: named
    assert choose_reports(beams, "findings", probabilities, threshold=0.5)[0] == beams[0][1]
    with pytest.raises(ValueError, match="probabilities"):
        choose_reports(beams, "findings")
