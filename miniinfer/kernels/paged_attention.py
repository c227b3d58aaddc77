"""Paged attention: attention over a KV cache stored in fixed-size blocks, read through block tables.

The KV cache of one layer is a pool of blocks, ``k_cache, v_cache: [num_blocks, P, H_kv, D]``
(``P`` = block size). Sequence ``b`` owns the blocks listed in ``block_tables[b]``: its token at
position ``pos`` lives at block ``block_tables[b, pos // P]``, offset ``pos % P``, i.e. at flat
"slot" ``block * P + offset`` of the cache viewed as ``[num_blocks * P, H_kv, D]``. Blocks need not be
contiguous, in order, or private (sequences sharing a prefix share its blocks). Entries of a block
table past a sequence's length may hold anything (-1, stale ids): no function here reads them.

Three operations, each with backends chosen by ``backend=``:

* :func:`write_kv` — store the new tokens' k/v at their slots (slot -1 = padding, skipped).
  ``"torch"`` (``index_copy_``) or ``"triton"``; ``"auto"``: Triton on a GPU, torch otherwise.
* :func:`paged_decode_attention` — one new query per sequence attends to its first ``seq_lens[b]``
  cached tokens (the engine writes the new token's k/v first). ``"torch"`` (the reference: gather
  through the block table, softmax in float32), ``"triton"``, ``"cuda"`` (``csrc/paged_attention.cu``);
  ``"auto"``: CUDA when it can be built here and supports the inputs (fp16/bf16, D in {64, 128},
  power-of-two P), else Triton on a GPU, else torch.
* :func:`paged_prefill_attention` — prefill of the uncached suffix: new queries (packed, ``T`` tokens)
  attend causally to the paged prefix plus themselves. A decode is a sequence with one query, so mixed
  batches work too. ``"torch"`` (reference) or ``"triton"`` (flash attention over paged KV);
  ``"cuda"`` is accepted (so one backend name can serve both calls) and runs the Triton kernel.

GQA everywhere: query head ``h`` uses KV head ``h // G`` with ``G = H // H_kv``. The reference upcasts
to float32; every backend returns q's dtype.

The GPU paths never synchronise with the host (no ``.item()``), so they can be captured in a CUDA graph;
the grid is sized from ``max_seq_len`` (default ``block_tables.shape[1] * P``), an upper bound of
``seq_lens`` that the caller guarantees. The CUDA kernel keeps a small per-device buffer of counters
(zero between launches): do not run two CUDA paged-decode calls concurrently on different streams.
"""

from __future__ import annotations

import warnings

import torch

from miniinfer.kernels import triton_available, triton_interpreted
from miniinfer.kernels.build import cuda_kernels_available, load_cuda_extension

BACKENDS = ("auto", "torch", "triton", "cuda")
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (64, 128)


def _output(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """A fresh output like q, or the caller's ``out`` after checking it can hold the result."""
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(q.shape)} {q.dtype} tensor on {q.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _launch_options(num_warps: int | None, num_stages: int | None) -> dict:
    """Triton launch keywords for the tuning knobs the caller set (None: Triton's default)."""
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return {name: value for name, value in options.items() if value is not None}


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# --------------------------------------------------------------------------------------------------
# Input checks (shapes only: looking at values would synchronise with the GPU)
# --------------------------------------------------------------------------------------------------

def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, fn: str) -> tuple[int, int, int]:
    if k_cache.dim() != 4:
        raise ValueError(f"{fn}: k_cache must be [num_blocks, P, H_kv, D], got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{fn}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    if k_cache.device != v_cache.device:
        raise ValueError(f"{fn}: k_cache on {k_cache.device}, v_cache on {v_cache.device}")
    _, P, H_kv, D = k_cache.shape
    return P, H_kv, D


def _check_attention(fn: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, batch: int) -> tuple[int, int, int, int]:
    P, H_kv, D = _check_cache(k_cache, v_cache, fn)
    if q.dim() != 3:
        raise ValueError(f"{fn}: q must be 3-D ([B, H, D] or [T, H, D]), got shape {tuple(q.shape)}")
    H = q.shape[1]
    if q.shape[2] != D:
        raise ValueError(f"{fn}: head dim of q ({q.shape[2]}) differs from the cache's ({D})")
    if H % H_kv:
        raise ValueError(f"{fn}: query heads H={H} must be a multiple of KV heads H_kv={H_kv}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"{fn}: block_tables must be [B={batch}, max_blocks], got shape {tuple(block_tables.shape)}")
    if seq_lens.dim() != 1 or seq_lens.shape[0] != batch:
        raise ValueError(f"{fn}: seq_lens must be [B={batch}], got shape {tuple(seq_lens.shape)}")
    if block_tables.dtype.is_floating_point or seq_lens.dtype.is_floating_point:
        raise ValueError(f"{fn}: block_tables and seq_lens must be integer tensors")
    for name, t in (("q", q), ("k_cache", k_cache), ("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, q on {q.device}: put them on one device")
    return P, H, H_kv, D


# --------------------------------------------------------------------------------------------------
# The torch reference (the oracle the kernels are tested against)
# --------------------------------------------------------------------------------------------------

def _gather(cache: torch.Tensor, table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one sequence, [length, H_kv, D] float32, through its block table."""
    P = cache.shape[1]
    num_blocks = _cdiv(length, P)
    blocks = table_row[:num_blocks].long()  # only the entries the sequence uses
    return cache[blocks].reshape(num_blocks * P, *cache.shape[2:])[:length].float()


def paged_decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference decode: q [B, H, D] -> [B, H, D]; one sequence at a time, float32 math."""
    B, H, D = q.shape
    H_kv = k_cache.shape[2]
    G = H // H_kv
    out = torch.zeros_like(q)  # a sequence of length 0 attends to nothing: zeros
    lengths = seq_lens.tolist()
    for b in range(B):
        if lengths[b] <= 0:
            continue
        k = _gather(k_cache, block_tables[b], lengths[b])  # [S, H_kv, D]
        v = _gather(v_cache, block_tables[b], lengths[b])
        qb = q[b].float().view(H_kv, G, D)  # query head h = kv head h // G, member h % G
        scores = torch.einsum("kgd,skd->kgs", qb, k) * scale  # [H_kv, G, S]
        probs = scores.softmax(dim=-1)
        out[b] = torch.einsum("kgs,skd->kgd", probs, v).reshape(H, D).to(q.dtype)
    return out


def paged_prefill_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                                  scale: float) -> torch.Tensor:
    """Reference prefill: q [T, H, D] packed by cu_seqlens_q [B + 1] -> [T, H, D]; causal, float32 math."""
    T, H, D = q.shape
    H_kv = k_cache.shape[2]
    G = H // H_kv
    out = torch.zeros_like(q)
    starts = cu_seqlens_q.tolist()
    lengths = seq_lens.tolist()
    for b in range(len(lengths)):
        q_len, S = starts[b + 1] - starts[b], lengths[b]
        if q_len == 0:
            continue
        if S < q_len:
            raise ValueError(f"paged_prefill_attention: sequence {b} has {q_len} new queries but only {S} keys "
                             "(seq_lens counts the cached prefix plus the new tokens)")
        k = _gather(k_cache, block_tables[b], S)  # [S, H_kv, D]
        v = _gather(v_cache, block_tables[b], S)
        qb = q[starts[b]:starts[b + 1]].float().view(q_len, H_kv, G, D)
        scores = torch.einsum("lkgd,skd->kgls", qb, k) * scale  # [H_kv, G, L, S]
        positions = torch.arange(S - q_len, S, device=q.device)  # new tokens come after the prefix
        visible = torch.arange(S, device=q.device)[None, :] <= positions[:, None]  # [L, S]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[starts[b]:starts[b + 1]] = torch.einsum("kgls,skd->lkgd", probs, v).reshape(q_len, H, D).to(q.dtype)
    return out


# --------------------------------------------------------------------------------------------------
# write_kv
# --------------------------------------------------------------------------------------------------

def _flat_cache(cache: torch.Tensor, fn: str) -> torch.Tensor:
    if not cache.is_contiguous():
        raise ValueError(f"{fn}: the cache must be contiguous (it is written in place through a flat view)")
    return cache.view(-1, *cache.shape[2:])  # [num_blocks * P, H_kv, D]: row = slot


def write_kv_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    flat_k, flat_v = _flat_cache(k_cache, "write_kv"), _flat_cache(v_cache, "write_kv")
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):  # padding tokens (slot -1) are not stored (a host sync: reference path)
        index = keep.nonzero().squeeze(1)
        k, v, slots = k[index], v[index], slots[index]
    flat_k.index_copy_(0, slots, k.to(k_cache.dtype))
    flat_v.index_copy_(0, slots, v.to(v_cache.dtype))


def write_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    from miniinfer.kernels.paged_attention_triton import write_kv_kernel

    _flat_cache(k_cache, "write_kv")
    _flat_cache(v_cache, "write_kv")
    T, H_kv, D = k.shape
    if T == 0:
        return
    if k.stride(2) != 1:
        k = k.contiguous()
    if v.stride(2) != 1:
        v = v.contiguous()
    write_kv_kernel[(T,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                          H_kv, D=D, H_PAD=_next_pow2(H_kv), D_PAD=_next_pow2(D))


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, backend: str = "auto") -> None:
    """Store new tokens: ``k, v [T, H_kv, D]`` go to cache slots ``slot_mapping [T]`` (-1: skip).

    ``slot = block * P + offset`` indexes the cache viewed as ``[num_blocks * P, H_kv, D]``. Values are
    cast to the cache's dtype. ``"auto"``: Triton on a GPU (no host sync), torch otherwise.
    """
    _, H_kv, D = _check_cache(k_cache, v_cache, "write_kv")
    if k.dim() != 3 or k.shape != v.shape or tuple(k.shape[1:]) != (H_kv, D):
        raise ValueError(f"write_kv: k and v must be [T, H_kv={H_kv}, D={D}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"write_kv: slot_mapping must be [T={k.shape[0]}], got shape {tuple(slot_mapping.shape)}")
    if backend == "auto":
        backend = "triton" if k_cache.is_cuda and triton_available() else "torch"
    if backend == "torch":
        write_kv_torch(k, v, k_cache, v_cache, slot_mapping)
    elif backend == "triton":
        write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        raise ValueError(f"write_kv: backend must be 'auto', 'torch' or 'triton', got {backend!r}")


# --------------------------------------------------------------------------------------------------
# Decode: Triton and CUDA launchers
# --------------------------------------------------------------------------------------------------

def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: keep grids small


def default_partition_size(num_pairs: int, max_seq_len: int, num_sms: int) -> int:
    """Tokens per split-KV partition: 512, halved (down to 64) until the grid fills the GPU 4 times.

    ``num_pairs`` = programs per partition index (B x H_kv x head chunks). Longer partitions mean
    fewer partials to write and combine; more partitions mean more blocks to spread over the SMs.
    """
    part = 512
    while part > 64 and num_pairs * _cdiv(max_seq_len, part) < 4 * num_sms:
        part //= 2
    return part


def _decode_common(q, k_cache, block_tables, max_seq_len):
    B, H, D = q.shape
    P, H_kv = k_cache.shape[1], k_cache.shape[2]
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * P  # the capacity of the block tables: no host sync
    return B, H, D, P, H_kv, max(1, int(max_seq_len))


def paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, *, max_seq_len=None,
                                  partition_size=None, block_n=None, num_warps=None, num_stages=None, out=None):
    """Triton split-KV decode (see :mod:`miniinfer.kernels.paged_attention_triton`)."""
    if not triton_available():
        raise RuntimeError("paged_decode_attention: triton is not installed; use backend='torch'")
    from miniinfer.kernels.paged_attention_triton import (
        LOG2E,
        paged_decode_partition_kernel,
        paged_decode_reduce_kernel,
    )

    B, H, D, P, H_kv, max_seq_len = _decode_common(q, k_cache, block_tables, max_seq_len)
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("paged_decode_attention: the caches' last (D) dimension must be contiguous")
    q = q if q.stride(2) == 1 else q.contiguous()
    out = _output(out, q)
    if B == 0 or H == 0:
        return out
    G = H // H_kv
    if partition_size is None:
        partition_size = default_partition_size(B * H_kv, max_seq_len, _num_sms(q.device))
    if block_n is None:
        block_n = 32 if q.dtype == torch.float32 else 64  # fp32 "ieee" dots are FMA loops: smaller tiles
    block_n = min(block_n, partition_size)
    if partition_size & (partition_size - 1) or block_n & (block_n - 1) or block_n < 16:
        raise ValueError(f"partition_size ({partition_size}) and block_n ({block_n}) must be powers of two, "
                         "block_n >= 16")
    num_parts = _cdiv(max_seq_len, partition_size)
    single = num_parts == 1
    if single:
        tmp_out = tmp_ml = out  # unused
    else:
        tmp_out = torch.empty(B * H * num_parts * D, dtype=torch.float32, device=q.device)
        tmp_ml = torch.empty(B * H * num_parts * 2, dtype=torch.float32, device=q.device)
    launch = _launch_options(num_warps, num_stages)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    D_PAD = max(16, _next_pow2(D))
    paged_decode_partition_kernel[(B, H_kv, num_parts)](
        q, k_cache, v_cache, block_tables, seq_lens, out, tmp_out, tmp_ml, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), H, G, num_parts, max_seq_len,
        P=P, D=D, D_PAD=D_PAD, G_PAD=max(16, _next_pow2(G)), PARTITION=partition_size, BLOCK_N=block_n,
        SINGLE=single, DOT_PRECISION=precision, **launch)
    if not single:
        paged_decode_reduce_kernel[(B, H)](
            tmp_out, tmp_ml, seq_lens, out, out.stride(0), out.stride(1), H, num_parts, max_seq_len,
            D=D, D_PAD=D_PAD, PARTITION=partition_size, PARTS_PAD=max(2, _next_pow2(num_parts)))
    return out


_CUDA_EXTENSION = None
_CUDA_ERROR: Exception | None = None
_SPLIT_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _cuda_extension():
    """The compiled ``csrc/paged_attention.cu`` (built on first use, then cached on disk)."""
    global _CUDA_EXTENSION, _CUDA_ERROR
    if _CUDA_EXTENSION is None:
        try:
            _CUDA_EXTENSION = load_cuda_extension("miniinfer_paged_attention",
                                                  ("paged_attention.cu", "paged_attention_binding.cpp"))
        except Exception as error:  # remembered, so "auto" falls back instead of rebuilding every call
            _CUDA_ERROR = error
            raise
    return _CUDA_EXTENSION


def _split_counters(device: torch.device, needed: int) -> torch.Tensor:
    """Per-device int32 zeros for the kernel's "last block combines" counters (it leaves them zero)."""
    counters = _SPLIT_COUNTERS.get(device)
    if counters is None or counters.numel() < needed:
        counters = torch.zeros(max(needed, 4096), dtype=torch.int32, device=device)
        _SPLIT_COUNTERS[device] = counters
    return counters


def cuda_supports(q: torch.Tensor, k_cache: torch.Tensor) -> str | None:
    """Why the CUDA kernel cannot take these inputs, or None when it can."""
    P, D = k_cache.shape[1], k_cache.shape[3]
    if not q.is_cuda:
        return "the CUDA kernel needs CUDA tensors"
    if q.dtype not in CUDA_DTYPES or k_cache.dtype != q.dtype:
        return f"the CUDA kernel supports float16 and bfloat16 (q {q.dtype}, cache {k_cache.dtype})"
    if D not in CUDA_HEAD_DIMS:
        return f"the CUDA kernel supports head dims {CUDA_HEAD_DIMS}, got {D}"
    if P & (P - 1):
        return f"the CUDA kernel needs a power-of-two block size, got {P}"
    return None


def paged_decode_attention_cuda(q, k_cache, v_cache, block_tables, seq_lens, scale, *, max_seq_len=None,
                                partition_size=None, out=None):
    """The CUDA kernel of ``csrc/paged_attention.cu`` (split-KV, tensor cores, one launch)."""
    problem = cuda_supports(q, k_cache)
    if problem:
        raise ValueError(f"paged_decode_attention(backend='cuda'): {problem}; use backend='triton' or 'torch'")
    extension = _cuda_extension()
    B, H, D, P, H_kv, max_seq_len = _decode_common(q, k_cache, block_tables, max_seq_len)
    G = H // H_kv
    pairs = B * H_kv * _cdiv(G, 16)  # the kernel serves up to 16 query heads of one KV head per block
    if partition_size is None:
        partition_size = default_partition_size(pairs, max_seq_len, _num_sms(q.device))
    block_tables = block_tables if block_tables.dtype == torch.int32 else block_tables.to(torch.int32)
    seq_lens = seq_lens if seq_lens.dtype == torch.int32 else seq_lens.to(torch.int32)
    stream = torch.cuda.current_stream(q.device).cuda_stream
    return extension.paged_decode_attention(q.contiguous(), k_cache, v_cache, block_tables.contiguous(),
                                            seq_lens.contiguous(), float(scale), max_seq_len, partition_size,
                                            _split_counters(q.device, pairs), out, stream)


def _pick_decode_backend(q: torch.Tensor, k_cache: torch.Tensor) -> str:
    if not q.is_cuda:
        return "torch"  # the Triton interpreter is far slower than torch on a CPU
    if cuda_supports(q, k_cache) is None and cuda_kernels_available() and _CUDA_ERROR is None:
        try:
            _cuda_extension()
            return "cuda"
        except Exception as error:  # noqa: BLE001 - a failed build must not stop the engine
            warnings.warn(f"paged attention: CUDA kernel unavailable ({error}); using Triton", stacklevel=3)
    return "triton" if triton_available() else "torch"


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           backend: str = "auto", *, max_seq_len: int | None = None,
                           partition_size: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention over the paged cache: ``q [B, H, D] -> [B, H, D]`` (q's dtype).

    Sequence ``b``'s single new query attends to its first ``seq_lens[b]`` cached tokens (including
    itself), located through ``block_tables [B, max_blocks]`` in ``k_cache, v_cache [num_blocks, P,
    H_kv, D]``. ``max_seq_len`` (GPU kernels): an upper bound of ``seq_lens``, sizing the grid without
    a host sync; default ``max_blocks * P``. ``partition_size``: tokens per split-KV partition
    (a power of two; default: chosen to fill the GPU). ``out``: an optional preallocated [B, H, D]
    output (contiguous, q's dtype), e.g. for CUDA graphs.
    """
    if backend not in BACKENDS:
        raise ValueError(f"paged_decode_attention: backend must be one of {BACKENDS}, got {backend!r}")
    _check_attention("paged_decode_attention", q, k_cache, v_cache, block_tables, seq_lens, q.shape[0])
    if backend == "auto":
        backend = _pick_decode_backend(q, k_cache)
    if backend == "torch":
        result = paged_decode_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, scale)
        return result if out is None else _output(out, q).copy_(result)
    if backend == "triton":
        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                             max_seq_len=max_seq_len, partition_size=partition_size, out=out)
    return paged_decode_attention_cuda(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                       max_seq_len=max_seq_len, partition_size=partition_size, out=out)


# --------------------------------------------------------------------------------------------------
# Prefill over a paged prefix
# --------------------------------------------------------------------------------------------------

def paged_prefill_attention_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, *,
                                   max_q_len=None, max_seq_len=None, block_m=None, block_n=None, num_warps=None,
                                   num_stages=None, out=None):
    """Triton flash attention of packed new queries over the paged cache (see the kernel's docstring)."""
    if not triton_available():
        raise RuntimeError("paged_prefill_attention: triton is not installed; use backend='torch'")
    from miniinfer.kernels.paged_attention_triton import LOG2E, paged_prefill_kernel

    T, H, D = q.shape
    P, H_kv = k_cache.shape[1], k_cache.shape[2]
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("paged_prefill_attention: the caches' last (D) dimension must be contiguous")
    q = q if q.stride(2) == 1 else q.contiguous()
    out = _output(out, q)
    B = seq_lens.shape[0]
    if T == 0 or B == 0:
        return out
    if max_q_len is None:  # one host sync; pass max_q_len to avoid it (e.g. under CUDA graphs)
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    max_q_len = max(1, int(max_q_len))
    small = triton_interpreted() or q.dtype == torch.float32  # fp32 "ieee" dots spill with big tiles
    if block_m is None:
        block_m = 16 if triton_interpreted() else 32 if small else 64
    if block_n is None:
        block_n = 32 if small else 64
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * P  # the capacity of the block tables: no host sync
    launch = _launch_options(num_warps, num_stages)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    paged_prefill_kernel[(_cdiv(max_q_len, block_m), B, H)](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), H // H_kv,
        P=P, D=D, D_PAD=max(16, _next_pow2(D)), BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=precision,
        INTERPRETER_KV_TILES=_cdiv(max(1, int(max_seq_len)), block_n) if triton_interpreted() else 0, **launch)
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                            scale: float, backend: str = "auto", *, max_q_len: int | None = None,
                            max_seq_len: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill of uncached suffixes over a paged prefix: ``q [T, H, D] -> [T, H, D]``, causal.

    Sequence ``b`` owns the new queries ``q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]`` (``q_len`` of them)
    and ``seq_lens[b]`` keys in the cache: its cached prefix plus the new tokens, whose k/v are already
    written. The i-th new query sits at position ``seq_lens[b] - q_len + i`` and sees keys 0..that
    position. A decode row is a sequence with ``q_len = 1``. ``max_q_len`` (Triton): the longest
    ``q_len``, sizing the grid; computed (one host sync) when not given. ``max_seq_len`` (Triton): an
    upper bound of ``seq_lens``, default ``max_blocks * P``. ``out``: optional preallocated [T, H, D].
    """
    if backend not in BACKENDS:  # "cuda" is accepted and runs the Triton kernel (no CUDA prefill kernel)
        raise ValueError(f"paged_prefill_attention: backend must be one of {BACKENDS}, got {backend!r}")
    B = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    _check_attention("paged_prefill_attention", q, k_cache, v_cache, block_tables, seq_lens, B)
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] != B + 1:
        raise ValueError(f"paged_prefill_attention: cu_seqlens_q must be [B + 1 = {B + 1}], "
                         f"got shape {tuple(cu_seqlens_q.shape)}")
    if backend == "auto":
        backend = "triton" if q.is_cuda and triton_available() else "torch"
    if backend == "cuda" and not q.is_cuda:
        raise ValueError("paged_prefill_attention(backend='cuda') needs CUDA tensors; use 'torch' or 'triton'")
    if backend == "torch":
        result = paged_prefill_attention_torch(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale)
        return result if out is None else _output(out, q).copy_(result)
    return paged_prefill_attention_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                                          max_q_len=max_q_len, max_seq_len=max_seq_len, out=out)
