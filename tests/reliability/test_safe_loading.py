"""Loading never runs code from a file: weights_only everywhere, safetensors weights, trust_remote_code off and
logged, foreign or tampered checkpoints refused with a message that says why."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from torch.utils.data import TensorDataset

import nbsupport
from nbsupport import models
from nbsupport.paths import project_root
from nbsupport.checkpoints import load_weights
from nbsupport.train import TrainSettings, fit

PACKAGE = Path(nbsupport.__file__).parent
TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))
from train_tasks import make_regression

SENTINEL_ENV = "NBSUPPORT_TEST_SENTINEL"


class RunsCode:
    """Unpickling this creates the file named by $NBSUPPORT_TEST_SENTINEL: proof that a loader ran foreign code."""

    def __reduce__(self):
        return (os.system, (f'touch "${SENTINEL_ENV}"',))


# ---------------------------------------------------------------------------------------------- static scan
def unsafe_calls(source: str, where: str) -> list[str]:
    """Calls in ``source`` that can unpickle arbitrary objects or run shipped code."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        line = f"{where}:{node.lineno}: {ast.unparse(node)[:100]}"

        def literal(key: str, keywords: dict = keywords) -> object:
            value = keywords.get(key)
            return value.value if isinstance(value, ast.Constant) else ("<expr>" if value is not None else None)

        if name.endswith("torch.load") and literal("weights_only") is not True:
            found.append(line + "  (torch.load without weights_only=True)")
        if name in ("pickle.load", "pickle.loads", "cloudpickle.load", "dill.load", "joblib.load"):
            found.append(line + "  (unpickles arbitrary objects)")
        if name.endswith(("np.load", "numpy.load")) and literal("allow_pickle") not in (None, False):
            found.append(line + "  (np.load with allow_pickle)")
        if literal("trust_remote_code") is True:
            found.append(line + "  (trust_remote_code=True hard-coded)")
        if name.endswith("torch.save") and not where.endswith("train.py"):
            found.append(line + "  (model weights are written as safetensors; torch.save only for training state)")
    return found


def test_the_scan_finds_what_it_looks_for() -> None:
    bad = ("import torch, pickle, numpy as np\nx = torch.load('a.pt')\ny = torch.load('b', weights_only=False)\n"
           "z = pickle.loads(b'')\nw = np.load('c.npy', allow_pickle=True)\nm = f(trust_remote_code=True)\n"
           "torch.save(m, 'm.pt')\n")
    assert len(unsafe_calls(bad, "example.py")) == 6
    assert unsafe_calls("import torch\ns = torch.load(p, map_location='cpu', weights_only=True)\n", "x.py") == []


def test_no_package_module_or_notebook_loads_unsafely() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))
    notebooks = sorted((project_root() / "notebooks").rglob("*.ipynb"))
    for path in notebooks:
        for k, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type == "code":
                code = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
                found += unsafe_calls(code, f"{path.relative_to(project_root())} cell {k}")
    assert notebooks, "no notebooks scanned"
    assert found == [], "unsafe loading:\n" + "\n".join(found)


def test_pretrained_loaders_keep_remote_code_off_by_default() -> None:
    for loader in (models.load_text_encoder, models.load_causal_lm):
        assert inspect.signature(loader).parameters["trust_remote_code"].default is False, loader.__name__


def test_trust_remote_code_is_logged_when_turned_on(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nbsupport.models"):
        models.load_text_encoder(models.MINILM_ALIAS)
    assert "trust_remote_code" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="nbsupport.models"):
        models.load_text_encoder(models.MINILM_ALIAS, trust_remote_code=True)
    # the folder the alias resolves to: the prepared cache copy, or the packaged files before `prepare-models`
    assert "trust_remote_code=True" in caplog.text and models.resolve_pretrained(models.MINILM_ALIAS) in caplog.text


# ---------------------------------------------------------------------------------------------- tampered files
@pytest.fixture()
def sentinel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "code-was-run"
    monkeypatch.setenv(SENTINEL_ENV, str(path))
    return path


def _refresh_sizes(checkpoint: Path) -> None:
    """Make a tampered checkpoint look complete, as an attacker (or a careless copy) could."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["files"] = {name: (checkpoint / name).stat().st_size for name in meta["files"]}
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def test_a_training_state_holding_a_pickled_object_is_refused_without_running_it(tmp_path: Path, sentinel: Path):
    settings = TrainSettings(epochs=1, batch_size=8, lr=0.05, max_steps=2)
    fit(make_regression(), settings, tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last"
    state = torch.load(last / "training_state.pt", weights_only=True)
    state["progress"]["payload"] = RunsCode()
    torch.save(state, last / "training_state.pt")
    _refresh_sizes(last)

    with pytest.raises(ValueError, match=r"cannot resume from .*training_state\.pt.*weights_only=True"):
        fit(make_regression(), dataclasses.replace(settings, max_steps=4, resume=True), tmp_path / "run")
    assert not sentinel.exists(), "unpickling ran code from the checkpoint"


def test_pickled_weights_in_a_pretrained_folder_are_refused_without_running_them(tmp_path: Path, sentinel: Path):
    folder = tmp_path / "minilm-tampered"
    shutil.copytree(models.minilm_path(), folder)
    (folder / "model.safetensors").unlink()
    torch.save({"embeddings.word_embeddings.weight": RunsCode()}, folder / "pytorch_model.bin")
    with pytest.raises(Exception) as raised:
        models.load_text_encoder(str(folder))
    assert not sentinel.exists(), "from_pretrained ran code from pytorch_model.bin"
    assert "weights_only" in str(raised.value) or "Unpickl" in type(raised.value).__name__ + str(raised.value)


# ---------------------------------------------------------------------------------------------- foreign checkpoints
class TinySegTask:
    """One optimizer step of a tiny random-init SegFormer, to get a real seg2d checkpoint in the trainer's format."""

    def __init__(self, image_size: int):
        from nbsupport.seg2d.model import build_seg2d_model

        self.image_size = image_size
        self.net = build_seg2d_model("segformer", 3, image_size, width="tiny")

    def build_model(self) -> torch.nn.Module:
        return self.net

    def train_dataset(self) -> TensorDataset:
        g = torch.Generator().manual_seed(0)
        size = self.image_size
        return TensorDataset(torch.rand(2, 1, size, size, generator=g), (torch.rand(2, 3, size, size) > 0.5).float())

    def val_dataset(self) -> None:
        return None

    def training_step(self, model: torch.nn.Module, batch) -> torch.Tensor:
        image, masks = batch
        return torch.nn.functional.binary_cross_entropy_with_logits(model(image), masks)

    def evaluate(self, model, loader, device):  # pragma: no cover - no validation set
        return {}


def _seg2d_run(root: Path, image_size: int) -> Path:
    task = TinySegTask(image_size)
    spec = task.net.spec
    settings = TrainSettings(epochs=1, batch_size=2, max_steps=1, monitor="train_loss")
    fit(task, settings, root, config_hash=spec.fingerprint())
    (root / "model_spec.json").write_text(spec.to_json())
    return root / "checkpoints" / "last"


def test_a_checkpoint_from_another_config_or_system_is_rejected_by_seg2d(tmp_path: Path) -> None:
    from nbsupport.seg2d.pipeline import load_trained_model

    own = _seg2d_run(tmp_path / "a", image_size=32)
    assert load_trained_model(own) is not None

    other_config = _seg2d_run(tmp_path / "b", image_size=64)
    shutil.rmtree(other_config)
    shutil.copytree(own, other_config)  # weights of a 32-px model next to a 64-px spec
    with pytest.raises(ValueError, match=r"config_hash '[0-9a-f]+' but '[0-9a-f]+' was expected: it comes from "
                                         r"another system or config"):
        load_trained_model(other_config)

    foreign = tmp_path / "regression"
    fit(make_regression(), TrainSettings(epochs=1, batch_size=8, max_steps=1), foreign, config_hash="textseg3d:1f2e")
    shutil.rmtree(own)
    shutil.copytree(foreign / "checkpoints" / "last", own)
    with pytest.raises(ValueError, match="'textseg3d:1f2e'.*another system or config"):
        load_trained_model(own)
    with pytest.raises(ValueError, match="does not fit"):  # and without a hash to compare, the tensors decide
        load_weights(TinySegTask(32).net, own)


def calls_of_load_weights_without_a_config_hash(source: str, where: str) -> list[str]:
    """``load_weights(...)`` calls in ``source`` that do not pass ``expected_config_hash=`` (which would load a
    checkpoint of another system or config whenever its tensors happen to fit)."""
    def name(call: ast.Call) -> str | None:
        return getattr(call.func, "id", getattr(call.func, "attr", None))

    return [f"{where}:{node.lineno}" for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and name(node) == "load_weights"
            and not any(k.arg == "expected_config_hash" for k in node.keywords)]


def test_every_system_loads_its_checkpoints_with_their_config_hash() -> None:
    """seg2d's rejection (above) is the shared ``load_weights`` check; every other call site must ask for it too."""
    assert calls_of_load_weights_without_a_config_hash("load_weights(m, d)\nx.load_weights(m, d)", "probe") == [
        "probe:1", "probe:2"]  # the scan finds what it looks for
    unchecked = [hit for path in sorted(PACKAGE.rglob("*.py"))
                 for hit in calls_of_load_weights_without_a_config_hash(path.read_text(encoding="utf-8"),
                                                                        str(path.relative_to(PACKAGE)))]
    assert unchecked == [], f"checkpoints loaded without their config hash: {unchecked}"
    # every system loads its trained model through the shared load_model (which checks the hash) or asks for it
    systems = sorted(p.parent for p in PACKAGE.glob("*/pipeline.py"))
    checked = [s.name for s in systems if any("load_model(" in f.read_text() or "expected_config_hash=" in f.read_text()
                                              for f in s.glob("*.py"))]
    assert len(systems) == 5 and checked == [s.name for s in systems], checked
