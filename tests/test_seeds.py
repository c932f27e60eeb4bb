"""Seed series: the spread of a run's metrics over seeds (known numbers), and `nbsupport run --seeds` on a real system."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from nbsupport import cli
from nbsupport.report import write_index
from nbsupport.runs import atomic_write_json
from nbsupport.seeds import SEEDS_SUMMARY_FILE, format_spread, seed_metrics, spread, summarize_system


def _seed_run(root: Path, seed: int, dice: float, extra: dict | None = None, headline: str = "test Dice") -> Path:
    """A finished system run folder holding what the notebooks write: metrics.json and headline.json."""
    run_dir = root / f"s-seed{seed}" / "toy"
    atomic_write_json(run_dir / "metrics.json", {
        "01_preprocess": {"n_cases": 10 + seed},
        "02_train": {"val_dice": dice - 0.05, "converged": True, "history": [0.1, 0.2]},
        "03_infer": {"test_dice": dice, "test_dice_ci95": [dice - 0.1, dice + 0.1], "note": "text",
                     "per_class": {"liver": dice + 0.1, "liver_ci95": [0.0, 1.0]}, **(extra or {})},
    })
    atomic_write_json(run_dir / "headline.json", {"stage": "03_infer", "metric": headline, "value": dice,
                                                  "ci95": [dice - 0.1, dice + 0.1], "baseline": "image only",
                                                  "baseline_value": dice / 2})
    return run_dir


def test_spread_is_mean_sample_sd_min_max_n_of_known_numbers():
    stats = spread([0.79, 0.81, 0.83])
    assert stats["mean"] == pytest.approx(0.81) and stats["sd"] == pytest.approx(0.02)  # ddof=1: sqrt(0.0008/2)
    assert (stats["min"], stats["max"], stats["n"]) == (0.79, 0.83, 3)
    assert format_spread(stats) == "0.81 \u00b1 0.02 (0.79\u20130.83, n=3)"
    assert spread([2.0, 4.0, 9.0])["sd"] == pytest.approx(3.605551275)  # population sd would be 2.944
    assert format_spread(spread([0.5])) == "0.5 (n=1)" and spread([0.5])["sd"] is None
    with pytest.raises(ValueError):
        spread([])


def test_summary_keeps_the_numbers_of_02_and_03_without_intervals(tmp_path):
    runs = {0: _seed_run(tmp_path, 0, 0.79, {"only_seed0": 1.0}), 1: _seed_run(tmp_path, 1, 0.81),
            2: _seed_run(tmp_path, 2, 0.83)}
    assert seed_metrics(runs[1]) == {"02_train.val_dice": pytest.approx(0.76), "03_infer.test_dice": 0.81,
                                     "03_infer.per_class.liver": pytest.approx(0.91)}
    summary = summarize_system(runs)
    assert summary["seeds"] == [0, 1, 2]
    assert set(summary["metrics"]) == {"02_train.val_dice", "03_infer.test_dice", "03_infer.per_class.liver",
                                       "03_infer.only_seed0"}
    dice = summary["metrics"]["03_infer.test_dice"]
    assert dice["values"] == {"0": 0.79, "1": 0.81, "2": 0.83}
    assert dice["mean"] == pytest.approx(0.81) and dice["sd"] == pytest.approx(0.02) and dice["n"] == 3
    assert summary["metrics"]["03_infer.only_seed0"]["n"] == 1
    headline = summary["headline"]
    assert headline["metric"] == "test Dice" and format_spread(headline["value"]) == "0.81 \u00b1 0.02 (0.79\u20130.83, n=3)"
    assert headline["baseline_value"]["mean"] == pytest.approx(0.405)


def test_headline_spread_takes_the_metric_most_seeds_name(tmp_path):
    runs = {0: _seed_run(tmp_path, 0, 0.7), 1: _seed_run(tmp_path, 1, 0.9, headline="test position accuracy"),
            2: _seed_run(tmp_path, 2, 0.8)}
    headline = summarize_system(runs)["headline"]
    assert headline["metric"] == "test Dice" and headline["seeds"] == [0, 2] and headline["value"]["n"] == 2


def test_index_shows_each_series_headline_as_mean_sd_range_n(tmp_path):
    runs = {seed: _seed_run(tmp_path / "runs", seed, dice) for seed, dice in ((0, 0.79), (1, 0.81), (2, 0.83))}
    atomic_write_json(tmp_path / "seeds" / "s" / SEEDS_SUMMARY_FILE, {
        "series": "s", "profile": "demo", "seeds": [0, 1, 2], "systems": {"toy": summarize_system(runs)}})
    page = write_index(tmp_path).read_text(encoding="utf-8")
    assert "Seed series" in page and "<b>0.81 \u00b1 0.02 (0.79\u20130.83, n=3)</b>" in page
    assert 'href="seeds/s/seeds_summary.json"' in page
    (tmp_path / "seeds" / "s" / SEEDS_SUMMARY_FILE).write_text("{ half written")
    assert "Seed series" not in write_index(tmp_path).read_text(encoding="utf-8"), "a broken summary is left out"


@pytest.mark.notebook
@pytest.mark.slow
def test_nbsupport_run_seeds_on_the_fastest_smoke_system(tmp_path, monkeypatch, capsys):
    """ct_clip, the fastest smoke series (1:49 a seed with its demo data, against 2:28 for textseg3d and prs_med and
    over 3:20 for seg2d, on the shared 2-core machine), on 2 seeds, from a fresh data folder (the runner writes the
    smoke demo data before the first seed)."""
    monkeypatch.setenv("NBSUPPORT_DATA", str(tmp_path / "data"))
    started = time.monotonic()
    code = cli.main(["run", "ct_clip", "--profile", "smoke", "--seeds", "0,1", "--run-id", "sd",
                     "--outputs-dir", str(tmp_path / "out"), "-p", f"manifest={tmp_path / 'manifest.csv'}"])
    out = capsys.readouterr().out
    print(f"2 seeds of ct_clip smoke: {time.monotonic() - started:.0f} s")
    assert code == 0, out[-3000:]
    summary = json.loads((tmp_path / "out" / "seeds" / "sd" / SEEDS_SUMMARY_FILE).read_text())
    entry = summary["systems"]["ct_clip"]
    assert entry["seeds"] == [0, 1] and summary["complete"]
    assert entry["metrics"] and all(m["n"] == 2 and m["sd"] is not None for m in entry["metrics"].values())
    assert not [name for name in entry["metrics"] if "_ci95" in name or name.startswith("01_")]
    for seed in (0, 1):
        config = json.loads((tmp_path / "out" / "runs" / f"sd-seed{seed}" / "ct_clip" / "config.json").read_text())
        assert {stage["seed"] for stage in config.values()} == {seed}
    shown = format_spread(entry["headline"]["value"])
    assert f"  ct_clip  {entry['headline']['metric']} {shown}" in out
    assert shown in (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
