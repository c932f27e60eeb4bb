"""Tiny training tasks with a known answer for tests/test_train.py (importable by launched processes too).

The data is y = x @ W_TRUE + B_TRUE (+ small noise), so a linear model can reach nearly zero error and the
size of the improvement over the untrained model is known in advance.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

DIM = 4
W_TRUE = torch.tensor([[1.5], [-2.0], [0.5], [1.0]])
B_TRUE = 0.3


def regression_data(n: int, seed: int) -> TensorDataset:
    """``n`` pairs (x: (4,), y: (1,)) drawn from their own generator, independent of the global RNG."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g)
    y = x @ W_TRUE + B_TRUE + 0.01 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


class SimulatedCrash(RuntimeError):
    """Stands for whatever stops a run mid-epoch (kernel interrupt, out-of-memory)."""


class TiedAutoencoderHead(nn.Module):
    """Encoder and decoder share one weight (as LM embeddings and heads do): safetensors must cope."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(DIM, DIM, bias=False)
        self.decode = nn.Linear(DIM, DIM, bias=False)
        self.decode.weight = self.encode.weight
        self.head = nn.Linear(DIM, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decode(torch.tanh(self.encode(x))) + x)


class RegressionTask:
    """Linear or MLP regression with MSE loss; knobs to make the run slow, crash, or script its metric."""

    def __init__(self, n_train: int = 64, n_val: int = 32, model: str = "linear", dropout: float = 0.0,
                 freeze_first: bool = False, step_delay: float = 0.0, calls_file: str | None = None,
                 crash_at_call: int | None = None, scripted_metric: list[float] | None = None):
        self.n_train, self.n_val, self.model, self.dropout = n_train, n_val, model, dropout
        self.freeze_first, self.step_delay, self.calls_file = freeze_first, step_delay, calls_file
        self.crash_at_call, self.scripted_metric = crash_at_call, scripted_metric
        self.calls = 0
        self.evaluations = 0

    def build_model(self) -> nn.Module:
        if self.model == "linear":
            return nn.Linear(DIM, 1)
        if self.model == "tied":
            return TiedAutoencoderHead()
        if self.model == "qlora":
            return qlora_model()
        model = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Dropout(self.dropout), nn.Linear(16, 1))
        if self.freeze_first:
            model[0].requires_grad_(False)
        return model

    def train_dataset(self) -> TensorDataset:
        return regression_data(self.n_train, seed=1)

    def val_dataset(self) -> TensorDataset:
        return regression_data(self.n_val, seed=2)

    def training_step(self, model: nn.Module, batch: Any) -> torch.Tensor:
        self.calls += 1
        if self.crash_at_call is not None and self.calls == self.crash_at_call:
            raise SimulatedCrash(f"simulated crash in training_step call {self.calls}")
        if self.calls_file:
            with open(self.calls_file, "a") as fh:  # one byte per call: the test watches the size
                fh.write(".")
        if self.step_delay:
            time.sleep(self.step_delay)  # gives the killing test a window; nothing is asserted about time
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        se, n = 0.0, 0
        for x, y in loader:
            se += ((model(x.to(device)) - y.to(device)) ** 2).sum().item()
            n += len(y)
        metrics = {"loss": se / n}
        if self.scripted_metric is not None:
            metrics["scripted"] = self.scripted_metric[self.evaluations % len(self.scripted_metric)]
        self.evaluations += 1
        return metrics


def qlora_model() -> nn.Module:
    """QLoRA in miniature: a frozen NF4 layer with a LoRA adapter (bitsandbytes runs it on the CPU)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    dense = nn.Linear(64, 128)  # bitsandbytes' CPU kernels want feature sizes in multiples of 64
    quantized = bnb.nn.Linear4bit(64, 128, quant_type="nf4", compute_dtype=torch.float32)
    quantized.load_state_dict(dense.state_dict())
    model = nn.Sequential(nn.Linear(DIM, 64), quantized, nn.Tanh(), nn.Linear(128, 1))
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["1"], modules_to_save=["0", "3"]))


def make_regression(**kwargs: Any) -> RegressionTask:
    """Factory for ``launch`` / ``python -m nbsupport.launch --factory train_tasks:make_regression``."""
    return RegressionTask(**kwargs)


def calls_made(calls_file: str | Path) -> int:
    path = Path(calls_file)
    return path.stat().st_size if path.exists() else 0
