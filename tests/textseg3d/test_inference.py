"""textseg3d inference: result.csv format, NIfTI outputs with the input's affine, sliding-window inference over any
volume size, and the fusion attention of the token readout."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from nbsupport.textseg3d import data as ts_data
from nbsupport.textseg3d.demo_data import DEMO_SIZES, write_demo_dataset
from nbsupport.textseg3d.inference import (
    CaseEvaluation,
    fusion_attention,
    predict_volume,
    result_table,
    save_prediction_nifti,
    write_result_csv,
)
from nbsupport.textseg3d.model import LLMSegSpec, build_llmseg
from nbsupport.textseg3d.views import fusion_attention_figure

SMOKE = DEMO_SIZES["smoke"]


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


def test_prediction_nifti_keeps_the_inputs_affine_and_voxel_order(tmp_path: Path) -> None:
    root = write_demo_dataset(tmp_path / "d", layout="nifti", table="csv", **SMOKE)
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
