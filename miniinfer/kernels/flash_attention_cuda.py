"""Our CUDA flash-attention forward kernel (``csrc/flash_attention.cu``), from Python.

Same arguments and meaning as :func:`miniinfer.kernels.flash_attention.flash_attention_triton`: packed
``q [T, H, D]`` by ``cu_seqlens_q [B + 1]``; K/V packed ``[S_total, H_kv, D]`` by ``cu_seqlens_k``, or
paged pools ``[num_blocks, P, H_kv, D]`` read through ``block_table [B, M]`` with ``seq_lens [B]`` keys;
query i of a sequence with L queries and S keys at position ``S - L + i`` (bottom-right causal); GQA
head h reads KV head ``h // G``; a query that sees no key gets zeros.

The kernel: FA2-style, 4 warps × 32 query rows (two m16 tiles each) = 128 rows per CTA, 64-key tiles
double-buffered through shared memory with ``cp.async``, ``ldmatrix`` into ``mma.sync.m16n8k16``
fragments, online softmax in registers (see the comments of the .cu file). float16 / bfloat16, head dims 64 and 128, any
power-of-two page size. The extension is compiled on first use (:mod:`miniinfer.kernels.build`).
"""

from __future__ import annotations

import torch

from miniinfer.kernels.build import cuda_build_problem, load_cuda_extension

__all__ = ["flash_attention_cuda", "cuda_flash_supports", "CUDA_FLASH_DTYPES", "CUDA_FLASH_HEAD_DIMS"]

CUDA_FLASH_DTYPES = (torch.float16, torch.bfloat16)
CUDA_FLASH_HEAD_DIMS = (64, 128)
_FN = "flash_attention(backend='cuda')"

_EXTENSION = None
_ERROR: Exception | None = None


def _extension():
    """The compiled ``csrc/flash_attention.cu`` (built on first use, then cached on disk); a failed build
    is remembered, so callers do not pay for a rebuild attempt on every call."""
    global _EXTENSION, _ERROR
    if _EXTENSION is None:
        if _ERROR is not None:
            raise _ERROR
        try:
            _EXTENSION = load_cuda_extension("miniinfer_flash_attention",
                                             ("flash_attention.cu", "flash_attention_binding.cpp"))
        except Exception as error:
            _ERROR = error
            raise
    return _EXTENSION


def cuda_flash_supports(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """Why the CUDA kernel cannot take these inputs (q ``[T, H, D]`` or ``[B, L, H, D]``; k packed or a
    paged pool ``[num_blocks, P, H_kv, D]``), or None when it can. Looks at shapes and dtypes only."""
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        return "q and k must be tensors"
    if q.dtype not in CUDA_FLASH_DTYPES or k.dtype != q.dtype:
        return f"the CUDA kernel supports float16 and bfloat16 (q {q.dtype}, k {k.dtype})"
    D = q.shape[-1]
    if D not in CUDA_FLASH_HEAD_DIMS or k.shape[-1] != D:
        return f"the CUDA kernel supports head dims {CUDA_FLASH_HEAD_DIMS}, got q {D}, k {k.shape[-1]}"
    if k.dim() == 4 and q.dim() == 3:  # a paged pool [num_blocks, P, H_kv, D]
        P = k.shape[1]
        if P <= 0 or P & (P - 1):
            return f"the CUDA kernel needs a power-of-two page size, got P={P}"
    if not q.is_cuda or not k.is_cuda:
        return f"the CUDA kernel needs CUDA tensors (q on {q.device}, k on {k.device})"
    problem = cuda_build_problem()
    if problem:
        return f"the CUDA kernel cannot be built here: {problem}"
    return None


def _rows_ok(t: torch.Tensor) -> bool:
    """Last dim contiguous, other strides multiples of 8 elements, 16-byte aligned: what cp.async needs."""
    if t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    return all(size <= 1 or stride % 8 == 0 for size, stride in zip(t.shape[:-1], t.stride()[:-1]))


def flash_attention_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, seq_lens, causal, scale, *,
                         max_seqlen_q=None, max_seqlen_k=None, out=None) -> torch.Tensor:
    """Launch the CUDA kernel on packed ``q [T, H, D]`` -> ``[T, H, D]`` (q's dtype).

    K/V packed by ``cu_seqlens_k`` (then ``block_table``, ``seq_lens`` are None) or paged. ``max_seqlen_q``
    bounds the query lengths and sizes the grid (one host sync when absent); ``max_seqlen_k`` is
    accepted for the common signature and unused (the kernel reads each sequence's key count on the
    device). ``out``: an optional caller-owned ``[T, H, D]`` output.
    """
    if q.dim() != 3:
        raise ValueError(f"{_FN}: q must be packed [T, H, D], got shape {tuple(q.shape)}")
    paged = block_table is not None
    if paged != (seq_lens is not None):
        raise ValueError(f"{_FN}: paged K/V needs both block_table [B, M] and seq_lens [B]")
    if paged == (cu_seqlens_k is not None):
        raise ValueError(f"{_FN}: give cu_seqlens_k (packed K/V) or block_table + seq_lens (paged), exactly one")
    if k.dim() != (4 if paged else 3) or v.shape != k.shape:
        raise ValueError(f"{_FN}: k, v must be {'[num_blocks, P, H_kv, D]' if paged else '[S_total, H_kv, D]'} "
                         f"of one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    problem = cuda_flash_supports(q, k)
    if problem:
        raise ValueError(f"{_FN}: {problem}; use backend='triton' or 'torch'")
    del max_seqlen_k
    # cp.async copies 16-byte pieces: copy the (rare) odd layouts rather than fail.
    q, k, v = (t if _rows_ok(t) else t.contiguous() for t in (q, k, v))
    int32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731 - a device-side cast, no host sync
    cu_seqlens_q = int32(cu_seqlens_q)
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if cu_seqlens_q.numel() > 1 else 0
    if paged:
        block_table = block_table.to(torch.int32)
        if block_table.shape[1] and block_table.stride(1) != 1:
            block_table = block_table.contiguous()
        seq_lens = int32(seq_lens)
    else:
        cu_seqlens_k = int32(cu_seqlens_k)
    stream = torch.cuda.current_stream(q.device).cuda_stream
    with torch.cuda.device(q.device):
        return _extension().flash_attention_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, seq_lens, bool(causal), float(scale),
            max(0, int(max_seqlen_q)), out, stream)
