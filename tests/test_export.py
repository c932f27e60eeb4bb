"""The export folder every 02_train writes (nbsupport.export): atomic, and a model card built from the run's records.

The systems' exports are loaded with the ecosystem's loaders in each system's pipeline tests (seg2d, cxr_report,
prs_med, textseg3d, ct_clip), on the smoke runs those tests already train."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nbsupport.export import EXPORT_DIR, write_export, write_tensors
from nbsupport.runs import RunFolder, atomic_write_json
from nbsupport.seg2d.model import build_seg2d_model


@pytest.fixture
def run(tmp_path: Path) -> RunFolder:
    """A trained-run folder's records as the stages write them: config, provenance, metrics, headline, and the
    runner's status (its command line)."""
    run = RunFolder.create("seg2d", "20260101-000000-abcdef", root=tmp_path)
    atomic_write_json(run.path / "config.json", {"02_train": {"profile": "demo", "manifest": "data_manifests/uw.csv",
                                                              "data_root": "/data/uwmgi", "lr": 0.002}})
    atomic_write_json(run.path / "provenance.json", {"02_train": {"git": {"commit": "0123abc", "dirty": True},
                                                                  "time": "2026-01-01T00:00:00", "device": "cpu"}})
    run.write_metrics("02_train", {"test_dice": 0.61, "test_dice_ci95": [0.55, 0.66], "steps": 480,
                                   "test_dice_minus_best_baseline": {"diff": 0.3, "ci95": [0.25, 0.35]},
                                   "test_score": 0.7, "test_auroc_ci95": [0.1, 0.2]})
    run.write_headline("02_train", "test Dice", 0.61, "mean mask", 0.3, ci95=[0.55, 0.66])
    atomic_write_json(run.path / "run_status.json", {"command": ["nbsupport", "run", "seg2d", "--profile", "demo"]})
    return run


def test_the_model_card_states_the_run_from_its_records(run: RunFolder) -> None:
    def files(folder: Path) -> dict[str, str]:
        (folder / "weights.bin").write_bytes(b"0")
        return {"weights.bin": "the weights"}

    export = write_export(run, "02_train", files, "model = load('export')")
    card = (export / "README.md").read_text()
    for expected in ("profile: `demo`", "`data_manifests/uw.csv` (data root `/data/uwmgi`)",
                     "`nbsupport run seg2d --profile demo` (`nbsupport run`)", "`0123abc (with uncommitted changes)`",
                     "Headline: test Dice 0.61 (95 % CI 0.55–0.66), against mean mask 0.3.",
                     "| test_dice | 0.61 | 0.55–0.66 |", "| test_dice_minus_best_baseline | 0.3 | 0.25–0.35 |",
                     "- `weights.bin`: the weights", "model = load('export')", '"lr": 0.002'):
        assert expected in card, expected
    assert "| test_score |" not in card and "| steps |" not in card  # no interval: not in the interval table


def test_a_failed_export_leaves_the_previous_one_and_no_temporary_folder(run: RunFolder) -> None:
    write_export(run, "02_train", lambda folder: {"a.txt": (folder / "a.txt").write_text("first") and "first"}, "")

    def half_written(folder: Path) -> dict[str, str]:
        (folder / "a.txt").write_text("second")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_export(run, "02_train", half_written, "")
    assert (run.path / EXPORT_DIR / "a.txt").read_text() == "first"
    assert sorted(p.name for p in run.path.iterdir() if p.name.startswith(".export")) == []
    write_export(run, "02_train", lambda folder: {"b.txt": (folder / "b.txt").write_text("third") and "third"}, "")
    assert sorted(p.name for p in (run.path / EXPORT_DIR).iterdir()) == ["README.md", "b.txt"]  # replaced whole


def test_tensors_and_the_spec_round_trip(tmp_path: Path) -> None:
    import safetensors.torch

    model = build_seg2d_model("segformer", 3, 64, width="tiny")
    contents = write_tensors(tmp_path, model.state_dict(), model.spec, "a SegFormer", sub="net")
    assert list(contents) == ["net/model.safetensors", "net/config.json"]
    config = json.loads((tmp_path / "net" / "config.json").read_text())
    assert config == {"model_spec": json.loads(model.spec.to_json()), "tensors": "a SegFormer"}
    loaded = safetensors.torch.load_file(str(tmp_path / "net" / "model.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
