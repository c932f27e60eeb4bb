"""Device and precision, decided once (nanoGPT style): bf16 autocast on CUDA, plain fp32 on CPU."""
from __future__ import annotations

import contextlib

import torch


def resolve_device(spec: str = "auto") -> torch.device:
    """``'auto'`` picks CUDA when available; anything else is passed to ``torch.device``.

    Raises:
        ValueError: a CUDA device is asked for on a machine without one.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={spec!r} but no CUDA device is available here; use 'auto' or 'cpu'")
    return device


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op on CPU, where autocast is slow and fp32 is what we test."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
