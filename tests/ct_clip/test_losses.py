"""SigLIP and CLIP over every process's features, with gradient (the seed's --gather-with-grad): averaged over
processes, the loss and its gradients are the one-process ones of the whole global batch; and through the trainer,
two gloo processes follow the one-process loss curve."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nbsupport import ct_clip
from nbsupport.ct_clip import demo_data
from nbsupport.ct_clip import preprocessing as ct_pre
from nbsupport.ct_clip.model import clip_loss, siglip_loss
from nbsupport.runs import RunFolder

HERE = Path(__file__).parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from distributed_loss_worker import BATCH, loss_and_gradients  # noqa: E402

WORLD = 2


def test_a_process_block_of_the_losses_is_its_rows_of_the_whole_batch():
    logits = torch.randn(6, 6)
    parts = [siglip_loss(logits[r * 3:(r + 1) * 3], offset=r * 3) for r in range(2)]
    assert torch.stack(parts).mean().item() == pytest.approx(siglip_loss(logits).item(), rel=1e-6)
    parts = [clip_loss(logits[r * 3:(r + 1) * 3], logits.T[r * 3:(r + 1) * 3], offset=r * 3) for r in range(2)]
    assert torch.stack(parts).mean().item() == pytest.approx(clip_loss(logits).item(), rel=1e-6)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Each gloo process's losses and gradients (both losses) on its half of the global batch."""
    tmp_path = tmp_path_factory.mktemp("gloo")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path]), "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / f"rank{r}.pt" for r in range(WORLD)]
    workers = [subprocess.Popen([sys.executable, str(HERE / "distributed_loss_worker.py"), str(r), str(WORLD),
                                 str(tmp_path / "init"), str(outs[r])], env=env) for r in range(WORLD)]
    assert [w.wait(timeout=300) for w in workers] == [0] * WORLD
    return [torch.load(o, weights_only=True) for o in outs]


@pytest.mark.parametrize("loss", ["siglip", "clip"])
def test_two_gloo_processes_give_the_whole_batch_loss_and_gradients(loss, two_processes):
    ranks = [r[loss] for r in two_processes]
    whole = loss_and_gradients(loss, slice(0, BATCH))  # one process, no process group

    # data-parallel training averages over processes: the mean loss, the mean parameter gradients; an embedding's
    # gradient reaches its own process summed over every process's loss, i.e. WORLD x the mean loss's
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(whole["loss"].item(), rel=1e-5)
    for name in ("images", "texts"):
        torch.testing.assert_close(torch.cat([r[name] for r in ranks]) / WORLD, whole[name], atol=1e-6, rtol=1e-5)
    for name in ("scale", "bias") if loss == "siglip" else ("scale",):
        torch.testing.assert_close(torch.stack([r[name] for r in ranks]).mean(), whole[name], atol=1e-6, rtol=1e-5)
    local = loss_and_gradients(loss, slice(0, BATCH // WORLD))  # what one process sees without the gather
    assert abs(local["loss"].item() - ranks[0]["loss"].item()) > 1e-3


@pytest.mark.slow
def test_two_training_processes_follow_the_one_process_loss_curve(tmp_path):
    """ViT image tower (no BatchNorm: per-process statistics would differ) and a frozen text tower."""
    root = demo_data.write_demo_dataset(tmp_path / "data", n_train_patients=8, n_valid_patients=1, scale=0.2)
    manifest = tmp_path / "ct.csv"
    assert ct_pre.main(["--data-root", str(root), "--manifest", str(manifest), "--workers", "1", "--spacing", "8",
                        "8", "8", "--shape", "16", "16", "16", "--val-fraction", "0.2"]) == 0
    params = {"profile": "smoke", "manifest": str(manifest), "input_size": [16, 16, 16], "image_arch": "vit",
              "vit_patch": [8, 8, 8], "vit_dim": 16, "vit_depth": 1, "vit_heads": 2, "text_tuning": "frozen",
              "epochs": 10, "batch_size": 4, "lr": 1e-2}
    curves = {}
    for n in (1, WORLD):
        cfg = ct_clip.TrainConfig.from_params({**params, "num_processes": n,
                                               "run_dir": str(tmp_path / f"p{n}" / "ct_clip")})
        outcome = ct_clip.train(cfg, RunFolder.for_stage(cfg))
        curves[n] = [(e["step"], e["train_loss"]) for e in outcome.history if "train_loss" in e]
    assert len(curves[1]) >= 2 and [s for s, _ in curves[1]] == [s for s, _ in curves[WORLD]]
    for (step, one), (_, two) in zip(curves[1], curves[WORLD]):
        assert two == pytest.approx(one, rel=1e-4), f"step {step}: one process {one}, two processes {two}"
