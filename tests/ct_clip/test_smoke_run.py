"""The ct_clip smoke run's records: every test metric of 02_train and 03_infer has its 95 % interval beside it, the
headline metrics are compared with chance (and the linear probe with zero-shot) by a paired interval, the run's
headline names report->volume recall against chance, and the notebook tables show ``value (low–high)``."""
from __future__ import annotations

import json
import re

INTERVAL = re.compile(r"^-?\d+\.\d+ \(-?\d+\.\d+–-?\d+\.\d+\)$|^-?\d+\.\d+$|^n/a$")
NOT_MEASURED = ("steps", "best_val", "n_params", "n_trainable")  # counts, not test metrics


def test_every_test_metric_has_its_interval_and_the_headline_is_written(smoke_run) -> None:
    metrics = json.loads((smoke_run.run_dir / "metrics.json").read_text())
    for stage in ("02_train", "03_infer"):
        recorded = metrics[stage]
        measured = [k for k, v in recorded.items() if isinstance(v, float) and k not in NOT_MEASURED
                    and "_chance_" not in k]  # chance R@k is exact (k / volumes)
        assert "test_report_to_volume_R@1" in measured and "test_zero_shot_mean_auroc" in measured, stage
        for key in measured:
            low, high = recorded[f"{key}_ci95"]
            assert low <= recorded[key] <= high, (stage, key)
        chance = recorded["test_report_to_volume_R@1_minus_chance"]
        assert abs(chance["diff"] - (recorded["test_report_to_volume_R@1"] - 1 / 4)) < 1e-12  # 4 test volumes
        auroc = recorded["test_zero_shot_mean_auroc_minus_chance"]
        assert abs(auroc["diff"] - (recorded["test_zero_shot_mean_auroc"] - 0.5)) < 1e-12
        assert auroc["ci95"][0] <= auroc["diff"] <= auroc["ci95"][1]
    probe = metrics["03_infer"]["test_linear_probe_mean_auroc_minus_zero_shot"]
    assert probe["ci95"][0] <= probe["diff"] <= probe["ci95"][1]
    headline = json.loads((smoke_run.run_dir / "headline.json").read_text())
    assert headline["stage"] == "03_infer" and headline["metric"] == "report->volume R@1 (test)"
    assert headline["value"] == metrics["03_infer"]["test_report_to_volume_R@1"]
    assert headline["baseline"] == "chance R@1" and headline["baseline_value"] == 0.25
    assert headline["ci95"] == metrics["03_infer"]["test_report_to_volume_R@1_ci95"]


def test_the_notebook_tables_show_each_metric_with_its_interval(smoke_run) -> None:
    for table in (smoke_run.train.table, smoke_run.infer.table):
        column = table["value (95 % interval)"]
        assert all(INTERVAL.match(cell) for cell in column), column
        recall = smoke_run.infer.evaluation.headline()["report_to_volume_R@1"]
        assert column["test_report_to_volume_R@1"].startswith(f"{recall:.3f} (")


def test_export_holds_the_best_checkpoint_the_spec_and_a_card(smoke_run) -> None:
    """``<run>/export``: ``model.safetensors`` holds exactly the best checkpoint's tensors, ``config.json`` the run's
    model spec, and ``CTClip(spec)`` takes the tensors with the card's ``strict`` setting; the card leads with the
    retrieval headline next to chance."""
    import safetensors.torch
    import torch

    from nbsupport.ct_clip.model import CTClip, CTClipSpec

    export = smoke_run.run_dir / "export"
    exported = safetensors.torch.load_file(str(export / "model.safetensors"))
    best = safetensors.torch.load_file(str(smoke_run.train.checkpoint / "model.safetensors"))
    assert exported.keys() == best.keys() and all(torch.equal(exported[k], best[k]) for k in best)
    spec_json = json.loads((export / "config.json").read_text())["model_spec"]
    assert spec_json == json.loads((smoke_run.run_dir / "model_spec.json").read_text())
    card = (export / "README.md").read_text()
    strict = re.search(r"strict=(True|False)", card).group(1) == "True"
    CTClip(CTClipSpec.from_json(json.dumps(spec_json))).load_state_dict(exported, strict=strict)
    assert re.search(r"Headline: report->volume R@\d \(\w+\) [\d.]+ \(95 % CI [\d.]+–[\d.]+\), against chance", card)
