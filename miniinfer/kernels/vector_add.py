"""Vector addition three ways: the torch reference, a Triton kernel, and the CUDA kernel of csrc/.

Chapter 00 builds the Triton kernel and measures all three. ``vector_add(x, y, backend=...)``:

* ``"torch"``  — ``x + y``; runs anywhere (the CPU fallback and the reference);
* ``"triton"`` — :func:`vector_add_kernel` below (compiled on a GPU, interpreted on a CPU);
* ``"cuda"``   — ``csrc/vector_add.cu``, built just in time on a CUDA machine;
* ``"auto"``   — CUDA when the kernels can be built here, else torch.

A custom Triton kernel with the same signature can be passed as ``triton_kernel=`` (the chapter's
plug-in cell uses this to run the student's kernel inside the package's launcher).
"""

from __future__ import annotations

import torch

from miniinfer.kernels import triton_available
from miniinfer.kernels.build import cuda_kernels_available, load_cuda_extension

BACKENDS = ("auto", "torch", "triton", "cuda", "cuda-simple")
DEFAULT_BLOCK = 1024

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def vector_add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        """One program adds one block of BLOCK consecutive elements; the mask guards the tail."""
        program = tl.program_id(axis=0)
        offsets = program * BLOCK + tl.arange(0, BLOCK)
        in_bounds = offsets < n
        x = tl.load(x_ptr + offsets, mask=in_bounds)
        y = tl.load(y_ptr + offsets, mask=in_bounds)
        tl.store(out_ptr + offsets, x + y, mask=in_bounds)
else:  # pragma: no cover - exercised only where triton is not installed
    vector_add_kernel = None


def num_programs(n: int, block: int) -> int:
    """How many programs (CUDA: blocks) cover n elements in chunks of ``block``: ceil(n / block)."""
    return (n + block - 1) // block


def _check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("vector_add takes two tensors")
    if x.shape != y.shape:
        raise ValueError(f"vector_add: shapes differ: {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype != y.dtype:
        raise ValueError(f"vector_add: dtypes differ: {x.dtype} and {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"vector_add: devices differ: {x.device} and {y.device}")


def vector_add_triton(x: torch.Tensor, y: torch.Tensor, block: int = DEFAULT_BLOCK, kernel=None) -> torch.Tensor:
    """Launch a Triton vector-add kernel (``kernel`` defaults to :func:`vector_add_kernel`)."""
    if not triton_available():
        raise RuntimeError("triton is not installed: `pip install triton` (Linux x86-64) or use backend='torch'")
    kernel = kernel or vector_add_kernel
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        kernel[(num_programs(n, block),)](x, y, out, n, BLOCK=block)
    return out


def vector_add_cuda(x: torch.Tensor, y: torch.Tensor, vectorized: bool = True) -> torch.Tensor:
    """The CUDA kernel of ``csrc/vector_add.cu`` (16-byte vector loads unless ``vectorized=False``)."""
    extension = load_cuda_extension("miniinfer_vector_add", ("vector_add.cu", "vector_add_binding.cpp"))
    num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    stream = torch.cuda.current_stream(x.device).cuda_stream
    return extension.vector_add(x, y, vectorized, num_sms, stream)


def vector_add(x: torch.Tensor, y: torch.Tensor, backend: str = "auto", triton_kernel=None) -> torch.Tensor:
    """``x + y`` by the chosen backend (see the module docstring)."""
    _check_inputs(x, y)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "cuda" if x.is_cuda and cuda_kernels_available() else "torch"
    if backend == "torch":
        return x + y
    if backend == "triton":
        return vector_add_triton(x, y, kernel=triton_kernel)
    return vector_add_cuda(x, y, vectorized=(backend == "cuda"))
