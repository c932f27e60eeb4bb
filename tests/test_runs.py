"""Run folders: never overwritten, atomic writes, provenance."""
from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest

from nbsupport.config import StageConfig, param
from nbsupport.runs import RunExistsError, RunFolder, atomic_path, atomic_write_json, provenance


@dataclasses.dataclass(frozen=True)
class ToyStage(StageConfig):
    SYSTEM = "toy"
    STAGE = "01_preprocess"
    data_root: str = param("", "data")


def test_create_refuses_an_existing_run_id(tmp_path: Path) -> None:
    run = RunFolder.create("toy", run_id="r1", root=tmp_path)
    assert run.path == (tmp_path / "r1" / "toy").resolve() and run.run_id == "r1"
    with pytest.raises(RunExistsError, match="already exists"):
        RunFolder.create("toy", run_id="r1", root=tmp_path)
    # Another system in the same run is fine.
    RunFolder.create("other", run_id="r1", root=tmp_path)


def test_runs_started_at_once_get_distinct_folders(tmp_path: Path) -> None:
    made: list[RunFolder] = []
    threads = [threading.Thread(target=lambda: made.append(RunFolder.create("toy", root=tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.path for r in made}) == 8


def test_stage_records_config_and_provenance_once(tmp_path: Path) -> None:
    cfg = ToyStage.from_params({"profile": "smoke", "run_dir": str(tmp_path / "r" / "toy"), "seed": 7})
    run = RunFolder.for_stage(cfg)
    config = json.loads((run.path / "config.json").read_text())
    assert config["01_preprocess"]["seed"] == 7 and config["01_preprocess"]["profile"] == "smoke"
    prov = json.loads((run.path / "provenance.json").read_text())["01_preprocess"]
    assert prov["seed"] == 7 and prov["packages"]["torch"].startswith("2.13")
    assert set(prov["git"]) == {"commit", "dirty"}
    with pytest.raises(RunExistsError, match="already ran"):
        RunFolder.for_stage(cfg)
    run.write_metrics("01_preprocess", {"slices": 3})
    run.write_metrics("01_preprocess", {"cases": 1})
    assert run.metrics() == {"01_preprocess": {"slices": 3, "cases": 1}}


@dataclasses.dataclass(frozen=True)
class ToyTrain(StageConfig):
    SYSTEM = "toy"
    STAGE = "02_train"
    resume: bool = param(False, "continue the run in run_dir")


def test_a_resumed_stage_is_recorded_again_in_its_run_folder(tmp_path: Path) -> None:
    params = {"run_dir": str(tmp_path / "r" / "toy")}
    RunFolder.for_stage(ToyTrain.from_params(params))
    with pytest.raises(RunExistsError, match="already ran"):
        RunFolder.for_stage(ToyTrain.from_params(params))
    run = RunFolder.for_stage(ToyTrain.from_params({**params, "resume": True}))
    assert json.loads((run.path / "config.json").read_text())["02_train"]["resume"] is True


def test_new_run_when_run_dir_is_empty(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NBSUPPORT_OUTPUTS", str(tmp_path))
    run = RunFolder.for_stage(ToyStage.from_params({}))
    assert run.path.parent.parent == (tmp_path / "runs").resolve() and run.system == "toy"


def test_atomic_write_leaves_old_content_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind


def test_atomic_write_without_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "submission.csv"
    atomic_write_json(target, [1], overwrite=False)
    with pytest.raises(RunExistsError):
        atomic_write_json(target, [2], overwrite=False)
    assert json.loads(target.read_text()) == [1]


def test_provenance_fields() -> None:
    prov = provenance(seed=3, device="cpu")
    assert {"time", "git", "python", "packages", "seed", "device"} <= set(prov)
    assert prov["python"].startswith("3.")


def test_atomic_write_uses_the_usual_permissions(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        target = atomic_write_json(tmp_path / "config.json", {})
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o644
