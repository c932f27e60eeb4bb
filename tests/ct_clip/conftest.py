"""ct_clip test data: a tiny CT-RATE demo, preprocessed, shared by the task and pipeline tests; tiny checkpoints in
the published layouts `full` reads (tests/ct_clip/ct_clip_checkpoints.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nbsupport.ct_clip import demo_data
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
