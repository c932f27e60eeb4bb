"""The library messages ``import nbsupport`` silences (nbsupport/__init__.py) are silenced by their exact text only:
every other warning of the same libraries and categories still reaches the reader."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import logging, warnings
logging.basicConfig(level=logging.WARNING)
warnings.simplefilter("default")
import nbsupport
import peft  # imports bitsandbytes, whose CPU backend logs the kernels-community hint on AVX512-BF16 CPUs
from transformers import LlamaConfig, LlamaForCausalLM
lm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=2, vocab_size=40))
peft.get_peft_model(lm, peft.LoraConfig(target_modules=["q_proj"]))  # reads the deprecated is_gradient_checkpointing
lm.is_gradient_checkpointing
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward from kernels-community: x")
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another bitsandbytes message")
warnings.warn("another FutureWarning", FutureWarning)
print("done")
"""


def test_only_the_known_messages_are_silenced() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0 and "done" in out.stdout, out.stderr[-2000:]
    assert "is_gradient_checkpointing" not in out.stderr
    assert "gemm_4bit_forward" not in out.stderr
    assert "another bitsandbytes message" in out.stderr and "another FutureWarning" in out.stderr
