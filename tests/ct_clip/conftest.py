"""ct_clip test data: a tiny CT-RATE demo, preprocessed, shared by the task and pipeline tests; a trained smoke run
(01-03 in one run folder); tiny checkpoints in the published layouts `full` reads
(tests/ct_clip/ct_clip_checkpoints.py)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from nbsupport import ct_clip
from nbsupport.ct_clip import demo_data
from nbsupport.ct_clip.config import InferConfig, PreprocessConfig, TrainConfig
from nbsupport.ct_clip.pipeline import InferResult, TrainOutcome
from nbsupport.runs import RunFolder
from nbsupport.ct_clip import preprocessing as ct_pre

if str(Path(__file__).parent) not in sys.path:  # importlib mode: the layout writers are imported by module name
    sys.path.insert(0, str(Path(__file__).parent))
from ct_clip_checkpoints import write_llm2clip_folder, write_llm2vec4cxr_weights, write_merlin_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory):
    """(data root, manifest) of 3 + 1 demo patients preprocessed to 16^3 voxels."""
    tmp_path = tmp_path_factory.mktemp("ct_clip_tiny")
    root = demo_data.write_demo_dataset(tmp_path / "data", n_train_patients=3, n_valid_patients=1, scale=0.2)
    manifest = tmp_path / "ct.csv"
    assert ct_pre.main(["--data-root", str(root), "--manifest", str(manifest), "--workers", "1", "--spacing", "8",
                        "8", "8", "--shape", "16", "16", "16", "--val-fraction", "0.34"]) == 0
    return root, manifest


@pytest.fixture(scope="session")
def llm2vec_checkpoint(tmp_path_factory):
    """(base folder, llm2vec4cxr weights file) in the published layouts."""
    root = tmp_path_factory.mktemp("llm2vec")
    base = write_llm2clip_folder(root / "LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned")
    return base, write_llm2vec4cxr_weights(root / "pytorch_model.bin", base)


@pytest.fixture(scope="session")
def merlin_checkpoint(tmp_path_factory):
    """Merlin's CLIP checkpoint file (tiny I3ResNet: width 4, one bottleneck per stage)."""
    root = tmp_path_factory.mktemp("merlin")
    return write_merlin_checkpoint(root / "i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt")


@dataclasses.dataclass(frozen=True)
class SmokeRun:
    data_root: Path  # the smoke demo dataset the run was trained on
    manifest: Path  # its manifest (01_preprocess)
    run_dir: Path  # outputs/runs/<id>/ct_clip as nbsupport run writes it
    train: TrainOutcome
    infer: InferResult


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    """01_preprocess, 02_train and 03_infer of the ``smoke`` profile on the smoke demo data, through the verbs the
    notebooks call, into one run folder."""
    base = tmp_path_factory.mktemp("ct_clip_smoke")
    root = demo_data.write_demo_dataset(base / "data", **demo_data.DEMO_SIZES["smoke"])
    run_dir = base / "runs" / "smoke" / "ct_clip"
    common = {"profile": "smoke", "manifest": str(base / "manifest.csv"), "run_dir": str(run_dir)}
    prep = PreprocessConfig.from_params({**common, "data_root": str(root), "n_examples": 1, "real_ct": "none"})
    ct_clip.preprocess(prep, RunFolder.for_stage(prep))
    train_cfg = TrainConfig.from_params({**common, "device": "cpu"})
    outcome = ct_clip.train(train_cfg, RunFolder.for_stage(train_cfg))
    infer_cfg = InferConfig.from_params({**common, "device": "cpu"})
    result = ct_clip.predict(infer_cfg, RunFolder.for_stage(infer_cfg))
    return SmokeRun(root, base / "manifest.csv", run_dir, outcome, result)
