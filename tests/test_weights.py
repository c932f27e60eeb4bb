"""Published weight files load without running code, and every load says what it loaded."""
from __future__ import annotations

import os
import pickle

import pytest
import safetensors.torch
import torch
from torch import nn

from nbsupport.weights import WeightsMismatchError, load_into, read_state_dict


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_every_format_reads_to_the_same_tensors(tmp_path):
    state = _net().state_dict()
    safetensors.torch.save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pth")
    torch.save({"model": state, "epoch": 3}, tmp_path / "wrapped.pt")
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    for got in (read_state_dict(tmp_path / "w.safetensors"), read_state_dict(tmp_path / "w.pth"),
                read_state_dict(tmp_path / "wrapped.pt", key="model"), read_state_dict(folder)):
        assert sorted(got) == sorted(state)
        assert all(torch.equal(got[k], state[k]) for k in state)


def test_a_pickled_object_is_refused_without_running_it(tmp_path, monkeypatch):
    sentinel = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"weight": RunsCode()}, f)
    with pytest.raises(ValueError, match="evil.pth"):
        read_state_dict(path)
    assert not sentinel.exists()


def test_load_reports_counts_and_copies(tmp_path, capsys):
    source, target = _net(), nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    report = load_into(target, source.state_dict(), "/models/net.pth")
    n = len(source.state_dict())
    assert capsys.readouterr().out.strip() == f"/models/net.pth: loaded {n} of {n} tensors (0 missing, 0 unexpected)"
    assert report.loaded == report.expected == n
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_missing_unexpected_and_misshapen_tensors_are_named():
    state = dict(_net().state_dict())
    del state["0.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["2.weight"] = torch.zeros(5, 4)
    target = _net()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsMismatchError) as err:
        load_into(target, state, "ckpt.pth")
    text = str(err.value)
    assert "ckpt.pth" in text and "0.bias" in text and "extra.weight" in text and "2.weight" in text
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), "a refused load changed weights"


def test_allowed_missing_and_unexpected_are_listed(capsys):
    state = dict(_net().state_dict())
    del state["2.bias"]
    state["head.extra"] = torch.zeros(1)
    report = load_into(_net(), state, "w.safetensors", allow_missing=["2.*"], allow_unexpected=["head.*"])
    line = capsys.readouterr().out
    assert report.missing == ("2.bias",) and report.unexpected == ("head.extra",)
    assert "(1 missing, 1 unexpected)" in line and "allowed missing: 2.bias" in line
