"""What the training loop optimises with: the optimizer, the learning-rate schedule, the mixed-precision choice.

Separate from :mod:`nbsupport.train` so the loop reads as one workflow; every choice here is a
:class:`nbsupport.train.TrainSettings` field.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import torch

from nbsupport.config import ConfigError

if TYPE_CHECKING:
    from nbsupport.train import TrainSettings

logger = logging.getLogger(__name__)


MixedPrecision = Literal["auto", "no", "bf16", "fp16", "bf16_native"]


def native_bf16() -> bool:
    """Whether this machine's default device computes bf16 natively: a CUDA GPU with bf16, or a CPU with AVX-512
    BF16 or AMX (oneDNN's bf16 kernels; elsewhere the CPU emulates bf16, slower than fp32)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_mixed_precision(choice: str) -> str:
    """``'auto'`` -> ``'bf16'`` on CUDA (``'fp16'`` on GPUs without bf16), ``'no'`` on CPU; ``'bf16_native'`` ->
    ``'bf16'`` where :func:`native_bf16`, else ``'no'`` (a CPU profile that measured bf16 autocast as faster at the
    same accuracy; on other CPUs it runs fp32 rather than slower)."""
    if choice == "bf16_native":
        return "bf16" if native_bf16() else "no"
    if choice == "auto":
        if not torch.cuda.is_available():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if choice == "fp16" and not torch.cuda.is_available():
        raise ConfigError("mixed_precision='fp16' needs a CUDA device; use 'auto' or 'no' on CPU")
    return choice


def build_optimizer(params: Iterable[Any], settings: TrainSettings, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer named by ``settings.optimizer`` over ``params`` (tensors or param-group dicts).

    Plain tensors are grouped nanoGPT-style: weight decay on tensors with ``ndim >= 2`` only.
    """
    params = list(params)
    if not params:
        raise ValueError("the task has no trainable parameters (all requires_grad=False?)")
    if isinstance(params[0], dict):
        groups = params
    else:
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": settings.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
    name = settings.optimizer
    if name == "paged_adamw" and device.type != "cuda":
        logger.warning("optimizer='paged_adamw' pages optimizer state between GPU and CPU memory; on %s "
                       "it falls back to torch AdamW", device.type)
        name = "adamw"
    if name == "paged_adamw":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW(groups, lr=settings.lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr, amsgrad=settings.amsgrad)
    if name == "adam":
        return torch.optim.Adam(groups, lr=settings.lr, amsgrad=settings.amsgrad)
    return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)


def lr_factor(settings: TrainSettings, total_steps: int, done: int) -> float:
    """Multiplier of ``settings.lr`` for the update that follows ``done`` completed optimizer steps.

    warmup_cosine (as nanoGPT): ``(done+1)/(warmup+1)`` during warm-up, then
    ``0.5 * (1 + cos(pi * (done - warmup) / (total - warmup)))``. multistep: ``gamma ** k`` with k the number
    of milestones ``m`` for which ``done >= floor(m * total)``.
    """
    if settings.scheduler == "warmup_cosine":
        if done < settings.warmup_steps:
            return (done + 1) / (settings.warmup_steps + 1)
        span = max(1, total_steps - settings.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (done - settings.warmup_steps) / span)))
    if settings.scheduler == "multistep":
        return settings.gamma ** sum(done >= int(m * total_steps) for m in settings.milestones)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over :func:`lr_factor`; a closure keeps its state_dict loadable with ``weights_only=True``
    (MultiStepLR's would hold a Counter)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: lr_factor(settings, total_steps, done))
