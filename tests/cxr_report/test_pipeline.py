"""The cxr_report verbs on a small synthetic CheXpert Plus (smoke profile: tiny DenseNet, tiny random Llama in NF4):
intervals and the headline in metrics.json, the labelers named beside every CE number, ``nbsupport predict`` on
radiographs in no manifest, and the device rule checked on the meta device."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from nbsupport import cli
from nbsupport.cxr_report import InferConfig, PreprocessConfig, TrainConfig, load_trained_model, predict, preprocess
from nbsupport.cxr_report import train
from nbsupport.cxr_report.chexbert import RULE_LABELER
from nbsupport.cxr_report.data import CHEXBERT, LABEL_COLUMNS, RULE, read_xray, real_cxr_path
from nbsupport.cxr_report.demo_data import write_demo_dataset
from nbsupport.cxr_report.inference import reference_positives
from nbsupport.cxr_report.labeler import LABELS
from nbsupport.runs import RunFolder

pytestmark = pytest.mark.slow  # one smoke training and one 03_infer: ~1 min on a 2-core CPU


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, torchvision_densenet_file) -> SimpleNamespace:
    """01 -> 02 -> 03 (smoke) on 16 synthetic patients, in one run folder, on one thread; the encoder starts from
    a file in the layout of torchvision's published DenseNet (tiny sizes: the smoke encoder), and 02's output is
    kept."""
    folder = tmp_path_factory.mktemp("cxr_pipeline")
    root = write_demo_dataset(folder / "data", n_patients=16, image_size=64, seed=2)
    weights, _ = torchvision_densenet_file(folder / "weights" / "densenet_tiny_torchvision.pth")
    run_dir = folder / "runs" / "r" / "cxr_report"
    common = {"profile": "smoke", "manifest": str(folder / "m.csv"), "run_dir": str(run_dir), "device": "cpu"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    printed = io.StringIO()
    try:
        pre = PreprocessConfig.from_params({**common, "data_root": str(root), "n_examples": 1})
        prepared = preprocess(pre, RunFolder.for_stage(pre))
        cfg = TrainConfig.from_params({**common, "encoder_weights": str(weights)})
        with contextlib.redirect_stdout(printed):
            train(cfg, RunFolder.for_stage(cfg))
        cfg = InferConfig.from_params({**common, "real_dicom": False, "n_examples": 1})
        inferred = predict(cfg, RunFolder.for_stage(cfg))
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(root=root, run_dir=run_dir, prepared=prepared, inferred=inferred, weights=weights,
                           train_output=printed.getvalue())


def test_train_loads_every_tensor_of_a_torchvision_densenet_file_and_says_so(trained: SimpleNamespace) -> None:
    from nbsupport.cxr_report.model import build_densenet_features

    n = len(build_densenet_features("densenet_tiny").state_dict())
    assert f"{trained.weights}: loaded {n} of {n} tensors (0 missing, 0 unexpected)" in trained.train_output
    assert "left out classifier.weight, classifier.bias (ImageNet head)" in trained.train_output
    metrics = json.loads((trained.run_dir / "metrics.json").read_text())["02_train"]
    assert metrics["encoder_weights"] == str(trained.weights)


def _is_metric(key: str, value: object) -> bool:
    return isinstance(value, float) and not key.endswith("_ci95")


def test_every_test_metric_has_its_interval_and_the_run_its_headline(trained: SimpleNamespace) -> None:
    metrics = json.loads((trained.run_dir / "metrics.json").read_text())
    train_metrics, infer = metrics["02_train"], metrics["03_infer"]
    low, high = train_metrics["test_aux_auroc_mean_ci95"]
    assert 0 <= low <= high <= 1
    scored = [k for k, v in infer.items() if _is_metric(k, v) and k.startswith(("model_", "baseline_"))]
    assert {"model_ce_micro_f1", "model_top_beam_ce_micro_f1", "baseline_nn_ce_micro_f1", "baseline_common_bleu4",
            "model_cider_d"} <= set(scored)
    for key in scored:
        interval = infer[f"{key}_ci95"]
        assert len(interval) == 2 and (None in interval or interval[0] <= interval[1]), key
    for model in ("model", "model_top_beam"):
        paired = infer[f"{model}_minus_baseline_nn_ce_micro_f1"]
        assert paired["diff"] == pytest.approx(infer[f"{model}_ce_micro_f1"] - infer["baseline_nn_ce_micro_f1"])
        assert paired["ci95"][0] <= paired["ci95"][1]
    # every CE number names its labelers; the beam choice's labeler is disclosed
    assert infer["ce_labeler"] == RULE_LABELER.name and "chexbert_path not set" in infer["ce_labeler_note"]
    assert infer["ce_reference_labels"].startswith("dataset CheXbert labels")
    assert infer["beam_choice"] == "findings" and infer["beam_choice_labeler"] == RULE_LABELER.name
    assert "model_top_beam_" in infer["beam_choice_note"]
    headline = json.loads((trained.run_dir / "headline.json").read_text())
    assert headline["stage"] == "03_infer" and headline["baseline"] == "nearest-neighbour report"
    assert headline["value"] == infer["model_ce_micro_f1"] and headline["ci95"] == infer["model_ce_micro_f1_ci95"]
    assert headline["baseline_value"] == infer["baseline_nn_ce_micro_f1"] and "rule labeler" in headline["metric"]
    table = trained.inferred.table
    assert table.loc["model (this run)", "ce_micro_f1"].count("(") == 1  # "0.123 (0.050–0.200)"


def test_preprocess_measures_the_rule_labeler_against_the_shipped_chexbert_labels(trained: SimpleNamespace) -> None:
    agreement = trained.prepared.labeler_agreement
    assert list(agreement.index) == [*LABELS, "all findings (micro)"]
    assert (agreement["n"] == len(trained.prepared.manifest)).all()
    assert ((agreement["agreement"] >= 0) & (agreement["agreement"] <= 1)).all()
    metrics = json.loads((trained.run_dir / "metrics.json").read_text())["01_preprocess"]
    assert metrics["rule_vs_chexbert_positive_f1"] == pytest.approx(agreement.loc["all findings (micro)", "f1"])
    assert (trained.run_dir / "labeler_agreement.csv").is_file()
    assert set(trained.prepared.manifest["label_source"]) == {CHEXBERT}


def test_reference_findings_are_the_datasets_chexbert_labels_where_it_ships_them() -> None:
    """A reference whose text the rule labeler reads as 'cardiomegaly' but whose shipped label says 'edema'."""
    labels = {c: [None, None] for c in LABEL_COLUMNS}
    labels[LABEL_COLUMNS[LABELS.index("Edema")]] = [1.0, None]
    part = pd.DataFrame({"report": ["There is cardiomegaly."] * 2, "label_source": [CHEXBERT, RULE], **labels})
    positives, source = reference_positives(part, RULE_LABELER)
    assert [LABELS[k] for k in np.flatnonzero(positives[0])] == ["Edema"]
    assert [LABELS[k] for k in np.flatnonzero(positives[1])] == ["Cardiomegaly"]
    assert source.startswith("dataset CheXbert labels for 1 of 2 references")


def test_predict_command_reports_radiographs_in_no_manifest(trained: SimpleNamespace, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """A JPEG from the dataset copied elsewhere, the same X-ray as a PNG, the real pydicom-data DICOM, and a file that
    is no image: three reports with their 14 probabilities, the bad file named; a second call refuses to overwrite."""
    new = tmp_path / "my_xrays"
    (new / "sub").mkdir(parents=True)
    jpeg = sorted(trained.root.glob("*/patient*/study*/view1_frontal.jpg"))[0]
    shutil.copy(jpeg, new / "a.jpg")
    cv2.imwrite(str(new / "sub" / "b.png"), read_xray(jpeg))
    shutil.copy(real_cxr_path(), new / "c.dcm")
    (new / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    argv = ["predict", "cxr_report", "--run", str(trained.run_dir), "-i", str(new), "-o", str(out), "--device", "cpu"]
    assert cli.main(argv) == cli.EXIT_FAILED  # one input failed, the others were written
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "broken.png" in printed
    table = pd.read_csv(out / "reports.csv")
    assert sorted(Path(f).name for f in table["file"]) == ["a.jpg", "b.png", "c.dcm"]
    probabilities = table[list(LABELS)].to_numpy()
    assert ((probabilities >= 0) & (probabilities <= 1)).all() and table["report"].notna().all()
    jpg_row, png_row = (table[table["file"].str.endswith(n)].iloc[0] for n in ("a.jpg", "b.png"))
    np.testing.assert_allclose(jpg_row[list(LABELS)].astype(float), png_row[list(LABELS)].astype(float), atol=1e-5)
    entries = json.loads((out / "reports.json").read_text())
    assert [e["report"] for e in entries] == list(table["report"].fillna(""))
    assert set(entries[0]["probabilities"]) == set(LABELS)
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "already exist" in capsys.readouterr().err


def test_load_trained_model_puts_every_tensor_on_the_meta_device(trained: SimpleNamespace) -> None:
    """The device rule without a GPU: every parameter and buffer (4-bit LM weights and their quantization state,
    LoRA, projection, vision model) on ``meta``, and the vision, projection, prompt and LM paths run there, so no
    tensor they create is left on the CPU."""
    import bitsandbytes as bnb

    model = load_trained_model(trained.run_dir, device="meta")
    modules = {"vision": model.vision, "generator": model.generator}
    elsewhere = [f"{part}.{name}" for part, module in modules.items()
                 for name, t in (*module.named_parameters(), *module.named_buffers()) if t.device.type != "meta"]
    assert not elsewhere, elsewhere[:5]
    packed = [m.weight for m in model.generator.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert packed and all(w.quant_state.absmax.device.type == "meta" for w in packed)
    image = torch.zeros(2, 3, model.spec.image_size, model.spec.image_size, device="meta")
    tokens, logits, _ = model.vision(image)
    assert tokens.device.type == logits.device.type == "meta"
    assert model.vision.patch_evidence(image).device.type == "meta"
    embeds, mask = model.generator.prompt_embeddings(torch.zeros(2, 14, model.spec.feature_dim), [[1, 2, 3], [4]])
    assert embeds.device.type == mask.device.type == "meta" and embeds.shape[:2] == mask.shape == (2, 17)
    out = model.generator.lm(inputs_embeds=embeds)  # (transformers' mask helpers read values: no mask on meta)
    assert out.logits.device.type == "meta"


def test_export_adapter_loads_with_peft_and_gives_the_workbench_logits(trained: SimpleNamespace) -> None:
    """The acceptance test of the export: the adapter folder on the base its config names, loaded as the model card
    says (``PeftModel.from_pretrained`` on a 4-bit ``AutoModelForCausalLM``), gives the workbench LM's logits, which
    differ from the base's; the visual file holds the trained vision model and projection; the card names the
    headline with its interval and no patient."""
    import safetensors.torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from nbsupport.export import EXPORT_DIR

    export = trained.run_dir / EXPORT_DIR
    workbench = load_trained_model(trained.run_dir)
    base_name = json.loads((export / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_name == str((trained.run_dir / "tiny_lm").resolve())
    base = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    lm = PeftModel.from_pretrained(base, export / "adapter").eval()
    ids = torch.tensor([workbench.tokenizer("Findings: the lungs are clear.\n")["input_ids"]])
    with torch.no_grad():
        ours = workbench.generator.lm(input_ids=ids).logits
        theirs = lm(input_ids=ids).logits
        with lm.disable_adapter():
            without_adapter = lm(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert (theirs - without_adapter).abs().max() > 1e-4  # the adapter was trained: the comparison means something
    visual = safetensors.torch.load_file(str(export / "visual" / "model.safetensors"))
    parts = {"vision": workbench.vision, "projection": workbench.generator.projection}
    for part, module in parts.items():
        for key, value in module.state_dict().items():
            assert torch.equal(visual[f"{part}.{key}"], value.cpu()), f"{part}.{key}"
    card = (export / "README.md").read_text()
    metrics = json.loads((trained.run_dir / "metrics.json").read_text())["02_train"]
    (key, auroc), = [(k, v) for k, v in metrics.items() if k.endswith("_aux_auroc_mean")]
    low, high = metrics[f"{key}_ci95"]
    assert f"| {key} | {auroc:.4g} | {low:.4g}–{high:.4g} |" in card and "profile: `smoke`" in card
    assert f"Headline: {key.split('_')[0]} mean AUROC, auxiliary 14-label classifier {auroc:.4g} (95 % CI" in card
    patients = trained.prepared.manifest["patient"].astype(str).unique()
    assert len(patients) and not [p for p in patients if p in card]


def test_lm_dtype_casts_an_unquantized_report_generator_and_leaves_a_4bit_one(trained: SimpleNamespace) -> None:
    """03/04's ``lm_dtype``: bfloat16 casts a ``quantization="none"`` generator (the demo's) and leaves bitsandbytes'
    4-bit LM as it computes; a misspelt dtype is an error naming the allowed ones."""
    import dataclasses

    four_bit = load_trained_model(trained.run_dir)
    before = {n: p.dtype for n, p in four_bit.generator.named_parameters()}
    assert {n: p.dtype for n, p in four_bit.with_lm_dtype("bfloat16").generator.named_parameters()} == before
    unquantized = dataclasses.replace(load_trained_model(trained.run_dir), spec=dataclasses.replace(
        four_bit.spec, quantization="none"))  # the cast reads the spec; 4-bit layers cast as any module would
    cast = unquantized.with_lm_dtype("bfloat16")
    assert cast.generator.projection.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in cast.vision.parameters())  # only the report generator
    with pytest.raises(ValueError, match="'float32' or 'bfloat16'"):
        four_bit.with_lm_dtype("fp16")
