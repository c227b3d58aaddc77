"""Kernels: CUDA C++ (built from ``csrc/`` on a CUDA machine) and Triton (runs anywhere).

On a machine without a CUDA GPU, Triton kernels run through Triton's interpreter, which executes a
kernel's body with NumPy on the CPU. The interpreter is chosen when a kernel is *decorated*
(``@triton.jit`` reads ``TRITON_INTERPRET``), so we set the variable here, before any of our kernel
modules is imported. Export ``TRITON_INTERPRET=0`` yourself to opt out.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def triton_available() -> bool:
    """True when the ``triton`` package imports (Linux x86-64 wheels; the [dev] extra installs it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
