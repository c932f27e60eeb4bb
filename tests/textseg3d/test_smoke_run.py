"""The textseg3d smoke run's records: every test metric of 02_train and 03_infer has its 95 % interval beside it,
the true report is compared with each baseline by a paired interval, the run's headline names Dice with the true
report against the side-flipped one, and the notebook tables show ``mean (low–high)``."""
from __future__ import annotations

import json
import re

from nbsupport.textseg3d.pipeline import TRAIN_METRIC_NAMES

INTERVAL = re.compile(r"^\d+\.\d+ \(\d+\.\d+–\d+\.\d+\)$|^n/a$")


def test_every_test_metric_has_its_interval_and_the_headline_is_written(smoke_run) -> None:
    metrics = json.loads((smoke_run.run_dir / "metrics.json").read_text())
    stages = {"02_train": [f"test_dice_{name}" for name in TRAIN_METRIC_NAMES.values()],
              "03_infer": [f"test_dice_{variant}" for variant in TRAIN_METRIC_NAMES]}
    for stage, keys in stages.items():
        recorded = metrics[stage]
        assert [k for k in recorded if k.startswith("test_dice_") and not k.endswith("_ci95")
                and "_minus_" not in k] == keys, stage
        for key in keys:
            low, high = recorded[f"{key}_ci95"]
            assert low <= recorded[key] <= high, (stage, key)
        for baseline in ("flipped", "empty", "image_only"):
            paired = recorded[f"test_dice_true_minus_{baseline}"]
            true_key, other_key = (keys[list(TRAIN_METRIC_NAMES).index(v)] for v in ("true", baseline))
            assert paired["diff"] == recorded[true_key] - recorded[other_key]
            assert paired["ci95"][0] <= paired["diff"] <= paired["ci95"][1]
    headline = json.loads((smoke_run.run_dir / "headline.json").read_text())
    assert headline["stage"] == "03_infer" and headline["metric"] == "Dice, true report"
    assert headline["value"] == metrics["03_infer"]["test_dice_true"]
    assert headline["baseline"] == "Dice, side-flipped report"
    assert headline["baseline_value"] == metrics["03_infer"]["test_dice_flipped"]
    assert headline["ci95"] == metrics["03_infer"]["test_dice_true_ci95"]


def test_the_notebook_tables_show_each_mean_with_its_interval(smoke_run) -> None:
    for table in (smoke_run.train.table, smoke_run.infer.ablation_table):
        assert list(table.index) == ["LLMSeg, true report", "LLMSeg, side flipped", "LLMSeg, empty report",
                                     "image-only UNet"]
        assert list(table.columns) == ["Dice", "IoU", "HD95 (mm)"]
        assert all(INTERVAL.match(cell) for cell in table.to_numpy().ravel()), table
    assert smoke_run.train.table.loc["LLMSeg, true report", "Dice"].startswith(
        f"{smoke_run.train.scores.loc['LLMSeg, true report', 'dice']:.3f} (")


def test_export_rebuilds_the_trained_network_as_its_card_says(smoke_run) -> None:
    """``<run>/export``: the spec in ``config.json`` and the tensors of ``model.safetensors`` rebuild, as the model
    card's lines do, the network ``load_trained_model`` gives (the frozen text encoder from its path, the rest from
    the file); the card names the true-report Dice with its interval."""
    import safetensors.torch
    import torch

    from nbsupport.textseg3d.model import LLMSegSpec, build_llmseg
    from nbsupport.textseg3d.pipeline import load_trained_model

    export = smoke_run.run_dir / "export"
    spec = LLMSegSpec.from_json(json.dumps(json.loads((export / "config.json").read_text())["model_spec"]))
    rebuilt = build_llmseg(spec)
    loaded = rebuilt.load_state_dict(safetensors.torch.load_file(str(export / "model.safetensors")), strict=False)
    assert not loaded.unexpected_keys and loaded.missing_keys
    assert all(not p.requires_grad for name, p in rebuilt.named_parameters() if name in loaded.missing_keys)
    trained = load_trained_model(smoke_run.train.checkpoint).state_dict()
    assert [k for k, v in rebuilt.state_dict().items() if not torch.equal(v, trained[k])] == []
    card = (export / "README.md").read_text()
    assert f"| {smoke_run.train.test_split}_dice_LLMSeg_true_report | " in card and "_dice_true_minus_flipped |" in card
