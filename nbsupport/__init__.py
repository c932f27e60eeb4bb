"""nbsupport: the tested library behind the workbench's notebooks.

Shared modules (``config``, ``runs``, ``train``, ``metrics``, ``manifest``, ``models``, ``viz``, ``runner``) never
import a system; each system (``seg2d``, ...) is a subpackage with ``data``, ``model`` and ``pipeline``.
"""
__version__ = "0.1.0"


def _quiet_known_library_noise() -> None:
    """Silence the two library messages every notebook that imports peft printed in red, which a reader cannot act
    on; each by its exact text, so every other warning (of these libraries too) still shows.

    * bitsandbytes 0.50 (``bitsandbytes/backends/cpu/ops.py``, at import, which ``import peft`` triggers) logs
      "Failed to load CPU gemm_4bit_forward from kernels-community" on a CPU with AVX512-BF16 when the optional
      ``kernels`` package is absent, then uses its own CPU kernel: a speed hint, not an error.
    * transformers 5.23 (``modeling_utils.py``, ``PreTrainedModel.is_gradient_checkpointing``) warns that the
      property is deprecated; peft (``peft_model.py``, ``PeftModel.__init__``) reads it in every
      ``get_peft_model`` / ``PeftModel.from_pretrained``. Our code never reads it.

    Installed here, at ``import nbsupport``, because peft is imported by several systems and the bitsandbytes
    message is logged once, at whichever import comes first.
    """
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    kernels_hint = "Failed to load CPU gemm_4bit_forward from kernels-community"
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: not str(record.msg).startswith(kernels_hint))


_quiet_known_library_noise()
