"""Training tasks for the fault tests (importable by the processes they kill).

``TargetDistanceTask`` is the regression task of tests/train_tasks.py whose monitored metric is the distance of
the weights to a fixed point (the weights of step 16 of the same run). The best checkpoint is then known in
advance, and unlike a metric scripted by evaluation count it does not depend on how often a process evaluated:
a resumed run must pick the same best step as an uninterrupted one.
"""
from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader
from train_tasks import RegressionTask


class TargetDistanceTask(RegressionTask):
    def __init__(self, target_file: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.target = load_file(target_file)

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        metrics = super().evaluate(model, loader, device)
        state = model.state_dict()
        metrics["distance"] = float(sum(((state[k].cpu() - t) ** 2).sum() for k, t in self.target.items()))
        return metrics


def make_target_task(**kwargs: Any) -> TargetDistanceTask:
    """Factory for ``python -m nbsupport.launch --factory fault_tasks:make_target_task``."""
    return TargetDistanceTask(**kwargs)
