"""textseg3d verbs: result.csv format, NIfTI outputs with the input's affine, sliding-window inference, and a
learning test of the real loss, transforms and network on demo volumes with known ground truth."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.losses import DiceCELoss

from nbsupport.textseg3d import data as ts_data
from nbsupport.textseg3d.model import LLMSegSpec, build_llmseg
from nbsupport.textseg3d.pipeline import (
    CaseEvaluation,
    TrainConfig,
    case_items,
    fusion_attention,
    fusion_attention_figure,
    foreground_fraction,
    predict_volume,
    report_variant,
    result_table,
    save_prediction_nifti,
    set_foreground_prior_bias,
    write_result_csv,
)
from nbsupport.textseg3d.transforms import collate_cases, eval_transforms, train_transforms

SMOKE = ts_data.DEMO_SIZES["smoke"]


def test_result_csv_has_the_public_codes_columns_and_summary_rows(tmp_path: Path) -> None:
    metrics = pd.DataFrame({"case": ["A", "B"], "dice": [0.8, 0.6], "iou": [0.667, 0.429], "hd95": [4.0, 10.0]})
    ev = CaseEvaluation("true", ["A", "B"], ["N0, cT2, x, left side", "N1, cT1, y, right side"], [], metrics)
    path = write_result_csv(result_table(ev), tmp_path / "result.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "no,ID,Avr,Dice,IoU,HD,Report"
    assert lines[1] == "0,A,0.800,0.800,0.667,4.000,\"N0, cT2, x, left side\""
    assert lines[3].startswith("Avr,,0.700,0.700,0.548,7.000")
    assert lines[4].startswith("Std,,0.100,0.100,0.119,3.000")
    assert len(lines) == 5


def test_report_variants() -> None:
    p = "N0, cT2, breast conserving surgery, left side"
    assert report_variant(p, "true") == p
    assert report_variant(p, "flipped").endswith("right side")
    assert report_variant(p, "empty") == ""
    with pytest.raises(ValueError):
        report_variant(p, "shuffled")


def test_prediction_nifti_keeps_the_inputs_affine_and_voxel_order(tmp_path: Path) -> None:
    root = ts_data.write_demo_dataset(tmp_path / "d", layout="nifti", table="csv", **SMOKE)
    image_path = root / "BC001" / "data.nii.gz"
    case = ts_data.load_case(image_path, root / "BC001" / "label.nii.gz")
    out = save_prediction_nifti(case["label"], image_path, tmp_path / "BC001.nii.gz")
    written, original = nib.load(str(out)), nib.load(str(root / "BC001" / "label.nii.gz"))
    np.testing.assert_array_equal(written.affine, original.affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(original.dataobj))


def test_sliding_window_covers_volumes_larger_and_smaller_than_the_roi() -> None:
    model = build_llmseg(LLMSegSpec(feature_size=4, text_encoder="tiny_sentence", roi=(32, 32, 64))).eval()
    for shape in ((40, 50, 70), (20, 32, 30)):
        prob = predict_volume(model, torch.rand(1, 1, *shape), "N0, cT2, bcs, left side", (32, 32, 64))
        assert prob.shape == (2, *shape)
        torch.testing.assert_close(prob.sum(0), torch.ones(shape))


def test_the_profiles_build_valid_configs() -> None:
    for profile in ("smoke", "demo", "full"):
        cfg = TrainConfig.from_params({"profile": profile})
        assert all(r % 32 == 0 for r in cfg.roi)
    assert TrainConfig.from_params({"profile": "full"}).roi == (64, 352, 352)
    with pytest.raises(ValueError, match="divisible by 32"):
        TrainConfig.from_params({"profile": "smoke", "roi": [32, 40, 64]})


@pytest.mark.slow
def test_training_the_unet_with_diceceloss_segments_the_target_of_known_cases(tmp_path: Path) -> None:
    """70 steps on two demo cases: Dice on them must beat the untrained network (stated baseline, ~0.02) and
    all-background (0) by a wide margin."""
    root = ts_data.write_demo_dataset(tmp_path / "d", **SMOKE)
    manifest = ts_data.build_manifest(root).manifest
    items = case_items(manifest[manifest.side == "left"].head(2), root)
    roi = SMOKE["shape"]
    spec = LLMSegSpec(feature_size=8, text_encoder="tiny_sentence", context_length=2, roi=roi)
    torch.manual_seed(0)
    model = build_llmseg(spec)
    transform, evaluate = train_transforms(roi), eval_transforms()
    batch = collate_cases([transform(i) for i in items])
    eval_cases = [evaluate(i) for i in items]

    def dice() -> float:
        scores = []
        for item, data in zip(items, eval_cases):
            pred = predict_volume(model, data["image"][None], item["prompt"], roi).argmax(0) == 1
            truth = torch.as_tensor(data["label"])[0] > 0.5
            scores.append(2 * float((pred & truth).sum()) / float(pred.sum() + truth.sum()))
        return float(np.mean(scores))

    before = dice()
    loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(70):
        loss = loss_fn(model(batch["image"], batch["prompt"]), batch["label"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dice()
    assert after > max(before, 0.0) + 0.3, (before, after)


def test_a_new_case_is_segmented_from_an_image_file_and_a_report_string(tmp_path: Path) -> None:
    from nbsupport.runs import RunFolder
    from nbsupport.textseg3d.pipeline import InferConfig, predict_new_case

    root = ts_data.write_demo_dataset(tmp_path / "d", layout="nifti", table="csv", **SMOKE)
    image = root / "BC003" / "data.nii.gz"
    run = RunFolder(tmp_path / "runs" / "r" / "textseg3d")
    cfg = InferConfig.from_params({"profile": "smoke", "input_image": str(image),
                                   "input_report": "N0, cT2, breast conserving surgery, left side"})
    model = build_llmseg(LLMSegSpec(feature_size=4, text_encoder="tiny_sentence", roi=SMOKE["shape"]))
    result = predict_new_case(cfg, run, model, torch.device("cpu"))
    written = nib.load(str(result.result_path))
    assert result.result_path.name == "BC003.nii.gz"
    np.testing.assert_array_equal(written.affine, nib.load(str(image)).affine)
    assert written.shape == nib.load(str(image)).shape and set(np.unique(np.asarray(written.dataobj))) <= {0, 1}
    assert (run.path / "figures" / "03_new_case.png").exists()


def test_side_mirror_flips_image_label_and_the_reports_side_together(tmp_path: Path) -> None:
    """side_mirror_prob=1: the crop is mirrored along W (patient left-right) and the report names the other side;
    the mirrored label lies where the mirrored image's anatomy of that side is. prob=0 leaves the case as it is."""
    root = ts_data.write_demo_dataset(tmp_path / "d", **SMOKE)
    manifest = ts_data.build_manifest(root).manifest
    item = case_items(manifest[manifest.side == "left"].head(1), root)[0]
    roi = SMOKE["shape"]
    kept_t, mirrored_t = train_transforms(roi, side_mirror_prob=0.0), train_transforms(roi, side_mirror_prob=1.0)
    kept_t.set_random_state(0)
    mirrored_t.set_random_state(0)  # the same crop and intensity jitter, the mirror last
    kept, mirrored = collate_cases([kept_t(item)]), collate_cases([mirrored_t(item)])
    assert kept["prompt"] == [item["prompt"]] and item["prompt"].endswith("left side")
    assert mirrored["prompt"] == [item["prompt"].replace("left side", "right side")]
    # the crop is the whole (padded) volume here, so the mirrored pair is the kept pair flipped along W
    torch.testing.assert_close(mirrored["label"], kept["label"].flip(-1))
    torch.testing.assert_close(mirrored["image"], kept["image"].flip(-1))
    width = kept["label"].shape[-1]
    left_mass = kept["label"][..., width // 2:].sum() / kept["label"].sum()
    assert left_mass > 0.9 and mirrored["label"][..., : width // 2].sum() / mirrored["label"].sum() > 0.9
    with pytest.raises(ValueError, match="side_mirror_prob"):
        TrainConfig.from_params({"profile": "smoke", "side_mirror_prob": 1.5})
    with pytest.raises(ValueError, match="center_text"):
        TrainConfig.from_params({"profile": "demo", "text_readout": "tokens", "center_text": True})
    assert TrainConfig.from_params({"profile": "demo", "text_readout": "mean", "center_text": True}).center_text


def test_token_readout_runs_the_sliding_window_and_the_fusion_attention_per_report_word() -> None:
    """text_readout="tokens": sliding-window inference broadcasts one report's token set over the patches; the fusion
    attention has one map per (prompt, report token), each summing to 1 over the voxels, and is drawn by word."""
    import matplotlib.pyplot as plt

    model = build_llmseg(LLMSegSpec(feature_size=4, n_prompts=2, context_length=3, text_encoder="tiny_sentence",
                                    roi=(32, 32, 64), text_readout="tokens", image_pe="random")).eval()
    report = "N0, cT2, bcs, left side"
    prob = predict_volume(model, torch.rand(1, 1, 40, 50, 70), report, (32, 32, 64))
    torch.testing.assert_close(prob.sum(0), torch.ones(40, 50, 70))
    ids, _ = model.text_encoder._token_ids([report])
    words = model.text_encoder.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    maps, probs = fusion_attention(model, torch.rand(1, 1, 32, 32, 64), report)
    assert [m.shape for m in maps] == [(2 * len(words), 32 // 2 ** (i + 1), 32 // 2 ** (i + 1), 64 // 2 ** (i + 1))
                                       for i in range(5)]
    np.testing.assert_allclose(maps[2].reshape(2 * len(words), -1).sum(1), 1.0, rtol=1e-4)
    image = np.random.rand(32, 32, 64).astype(np.float32)
    label = np.zeros_like(image, dtype=bool)
    label[10:20, 10:20, 5:30] = True
    fig = fusion_attention_figure(image, label, probs[1] > 0.5, [m[:len(words)] for m in maps], [2], report, words)
    titles = [ax.get_title() for ax in fig.axes]
    assert any("'left'" in t for t in titles) and len(fig.axes) == 4 * len(words)
    plt.close(fig)


def test_foreground_prior_bias_starts_the_network_at_the_training_crops_target_fraction() -> None:
    """foreground_prior_bias: the output bias makes the untrained network predict p(target) ~= the prior (the default
    init predicts ~0.5); the prior is the mean target fraction of the training crops."""
    crops = [{"label": np.zeros((1, 4, 4, 4))}, [{"label": np.ones((1, 4, 4, 4)) * (np.arange(4) < 1)}]]
    assert foreground_fraction(crops) == pytest.approx(0.125)
    model = build_llmseg(LLMSegSpec(feature_size=4, use_text=False, roi=(32, 32, 64))).eval()
    image = torch.rand(1, 1, 32, 32, 64)
    with torch.no_grad():
        default = torch.softmax(model(image), 1)[0, 1].median()
        set_foreground_prior_bias(model, 0.01)
        started = torch.softmax(model(image), 1)[0, 1].median()
    bias = model.out.bias.detach()
    assert float(bias[1] - bias[0]) == pytest.approx(np.log(0.01 / 0.99), rel=1e-5)
    assert 0.3 < float(default) < 0.7 and float(started) < 0.05
