"""``encoder_weights``: torchvision's published DenseNet-121 file is read as it is (weights only, names mapped to
MONAI's DenseNet, its ImageNet head left out by name) and loaded strictly, with one report line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nbsupport.cxr_report.model import build_densenet_features, load_encoder_weights
from nbsupport.weights import WeightsMismatchError

PUBLISHED_NAME = "densenet121-a639ec97.pth"


@pytest.fixture(scope="module")
def densenet121_file(tmp_path_factory: pytest.TempPathFactory, torchvision_densenet_file) -> tuple[Path, dict]:
    """A full-size DenseNet-121 (8 M parameters) in the published file's layout, under its published name."""
    return torchvision_densenet_file(tmp_path_factory.mktemp("tv") / PUBLISHED_NAME, "densenet121")


def test_the_published_densenet121_layout_loads_every_tensor(densenet121_file: tuple[Path, dict],
                                                             capsys: pytest.CaptureFixture) -> None:
    path, written = densenet121_file
    features = build_densenet_features("densenet121")
    report = load_encoder_weights(features, path)
    assert report.loaded == report.expected == len(features.state_dict()) == 725
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"{path}: loaded 725 of 725 tensors (0 missing, 0 unexpected)"
    assert "left out classifier.weight, classifier.bias (ImageNet head)" in lines[-2]
    assert "121 BatchNorm num_batches_tracked set to 0" in lines[-2]
    state = features.state_dict()
    for ours, theirs in (("conv0.weight", "conv0.weight"),
                         ("denseblock1.denselayer1.layers.norm1.weight", "denseblock1.denselayer1.norm.1.weight"),
                         ("denseblock4.denselayer16.layers.conv2.weight", "denseblock4.denselayer16.conv.2.weight"),
                         ("transition3.norm.running_var", "transition3.norm.running_var"),
                         ("norm5.bias", "norm5.bias")):
        assert torch.equal(state[ours], written[f"features.{theirs}"]), ours


def test_the_mapping_is_monais_own(densenet121_file: tuple[Path, dict], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """MONAI's DenseNet121(pretrained=True) renames the published file itself (its _load_state_dict): given the same
    file in torch's download cache (so nothing is downloaded), it must end up with the very tensors we load."""
    from monai.networks.nets import DenseNet121

    path, _ = densenet121_file
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / PUBLISHED_NAME).symlink_to(path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monais = DenseNet121(spatial_dims=2, in_channels=3, out_channels=14, pretrained=True, progress=False)
    ours = build_densenet_features("densenet121")
    load_encoder_weights(ours, path, log=None)
    expected = monais.features.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_names_saved_from_torchvisions_network_load_too(tmp_path: Path, torchvision_densenet_file) -> None:
    """A state dict saved from torchvision's DenseNet names the parts ``norm1`` (its loader's renaming)."""
    path, written = torchvision_densenet_file(tmp_path / "tiny.pth", "densenet_tiny", legacy=False)
    assert "features.denseblock1.denselayer1.norm1.weight" in written
    features = build_densenet_features("densenet_tiny")
    report = load_encoder_weights(features, path, log=None)
    assert report.loaded == report.expected
    assert torch.equal(features.state_dict()["denseblock1.denselayer1.layers.norm1.weight"],
                       written["features.denseblock1.denselayer1.norm1.weight"])


def test_a_file_of_another_densenet_is_refused_naming_its_tensors(tmp_path: Path, torchvision_densenet_file) -> None:
    path, _ = torchvision_densenet_file(tmp_path / "small.pth", "densenet_small")
    features = build_densenet_features("densenet_tiny")
    before = {k: v.clone() for k, v in features.state_dict().items()}
    with pytest.raises(WeightsMismatchError, match=r"small\.pth: does not fit .*of another shape: conv0\.weight"):
        load_encoder_weights(features, path, log=None)
    assert all(torch.equal(before[k], v) for k, v in features.state_dict().items())  # left untouched


def test_a_safetensors_file_in_monais_names_loads_as_before(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = build_densenet_features("densenet_tiny")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "enc.safetensors"))
    features = build_densenet_features("densenet_tiny")
    report = load_encoder_weights(features, tmp_path / "enc.safetensors", log=None)
    assert report.loaded == report.expected == len(source.state_dict())
