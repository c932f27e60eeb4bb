"""The small synthetic dataset the cxr_report tests read, and weight files in torchvision's DenseNet layout."""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from nbsupport.cxr_report.demo_data import write_demo_dataset


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 synthetic patients at 128 px (seed 3), CheXpert Plus layout."""
    return write_demo_dataset(tmp_path_factory.mktemp("cxr") / "demo", n_patients=30, image_size=128, seed=3)


TorchvisionFile = Callable[..., tuple[Path, dict[str, torch.Tensor]]]


@pytest.fixture(scope="session")
def torchvision_densenet_file() -> TorchvisionFile:
    """Writes a DenseNet in the layout of torchvision's published ImageNet file (densenet121-a639ec97.pth):
    ``features.``-prefixed names, a dense layer's parts as ``denselayerN.norm.1`` (``legacy``, the published file) or
    ``norm1`` (a state dict saved from torchvision's network), no ``num_batches_tracked`` (the file predates them),
    the 1000-class head ``classifier.weight`` / ``classifier.bias``; every tensor random, so a tensor loaded into
    the wrong place shows. Returns the path and the tensors written."""
    from nbsupport.cxr_report.model import ENCODERS, build_densenet_features

    def write(path: Path, encoder: str = "densenet_tiny", legacy: bool = True) -> tuple[Path, dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(0)
        state = {}
        for key, value in build_densenet_features(encoder).state_dict().items():
            if key.endswith("num_batches_tracked"):
                continue
            part = r"\1.\2." if legacy else r"\1\2."
            name = "features." + re.sub(r"\.layers\.(norm|relu|conv)([12])\.", "." + part, key)
            state[name] = torch.rand(value.shape, generator=generator) + 0.5  # positive: valid running variances
        channels = ENCODERS[encoder][3]
        state["classifier.weight"] = torch.randn(1000, channels, generator=generator)
        state["classifier.bias"] = torch.randn(1000, generator=generator)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        return path, state

    return write
