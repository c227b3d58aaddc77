"""Flash attention: exact attention of packed variable-length sequences without an [L, S] score matrix.

One entry point, :func:`flash_attention`, for the two layouts the engine meets:

* **dense varlen** — ``q: [T, H, D]`` packed by ``cu_seqlens_q [B + 1]`` (sequence b owns rows
  ``cu_seqlens_q[b] : cu_seqlens_q[b + 1]``), ``k, v: [S_total, H_kv, D]`` packed by ``cu_seqlens_k``;
  or a batch of equal lengths, ``q: [B, L, H, D]``, ``k, v: [B, S, H_kv, D]`` (reshaped internally);
* **paged** — ``k, v`` are the KV pools ``[num_blocks, P, H_kv, D]`` of
  :mod:`miniinfer.kernels.paged_attention`, read through ``block_table [B, M]``; sequence b has
  ``seq_lens[b]`` keys (its cached prefix plus the new tokens, already written).

In both, sequence b's L queries are the *last* L of its S positions: query i sits at position
``S - L + i`` and, when ``causal``, sees keys ``0 .. S - L + i`` (bottom-right alignment, as flash-attn
does when S > L; with S == L this is the usual lower triangle). A query that sees no key (causal with
S < L) gets zeros. GQA: query head h uses KV head ``h // G``, ``G = H // H_kv``.

Backends (``backend=``):

* ``"torch"`` — the tiled reference of chapter 09, one sequence at a time through
  :func:`miniinfer.kernels.online_softmax.blocked_attention`: a loop over key tiles with the online
  softmax, one score tile alive at a time, float32 math. Readable, not fast; syncs with the host.
* ``"triton"`` — our forward kernel (:mod:`miniinfer.kernels.flash_attention_triton`), dense or paged,
  varlen, causal, GQA-packed (a program serves all G query heads of one KV head, so each K/V tile is
  loaded once per group); fp16/bf16 (fp32 math) on a GPU, fp32 in the CPU interpreter.
* ``"cuda"`` — our CUDA kernel (:mod:`miniinfer.kernels.flash_attention_cuda`, ``csrc/flash_attention.cu``):
  mma.sync + ldmatrix + cp.async, FA2-style, dense or paged, varlen, causal, GQA-packed; fp16/bf16,
  head dims 64 and 128, CUDA tensors only (built on first use).
* ``"flash_attn"`` — the flash-attn library: FA4 (``flash_attn.cute``, ``pip install flash-attn-4``,
  Hopper/Blackwell) when importable, else FA2 (``flash_attn``); fp16/bf16 CUDA tensors only.
* ``"auto"`` — Triton on CUDA tensors, torch otherwise.

Host syncs: the Triton, CUDA and flash_attn paths size their grids from ``max_seqlen_q`` / ``max_seqlen_k``
(upper bounds of the query / key lengths, which the caller usually knows); when absent they are computed
with one ``.item()`` each (for paged K/V, ``max_seqlen_k`` defaults to the block table's capacity
``M * P``, no sync). Pass both to keep a call free of syncs (e.g. under CUDA graph capture).
"""

from __future__ import annotations

import inspect

import torch

from miniinfer.kernels import triton_available, triton_interpreted
from miniinfer.kernels.online_softmax import blocked_attention

__all__ = ["flash_attention", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton", "cuda", "flash_attn")
FLASH_ATTN_INSTALL = "pip install flash-attn-4 (FA4, Hopper/Blackwell) or flash-attn (FA2)"

# Tile sizes of the torch reference: small enough to show the tiling, large enough not to crawl.
TORCH_BLOCK_M = 64
TORCH_BLOCK_N = 64


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# --------------------------------------------------------------------------------------------------
# Input checks (shapes, dtypes, devices: never values, which would synchronise with the GPU)
# --------------------------------------------------------------------------------------------------

def _check_cu_seqlens(name: str, cu: torch.Tensor, batch: int | None, device: torch.device) -> None:
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"flash_attention: {name} must be 1-D [B + 1] with B >= 1, got shape {tuple(cu.shape)}")
    if batch is not None and cu.shape[0] != batch + 1:
        raise ValueError(f"flash_attention: {name} must be [B + 1 = {batch + 1}], got shape {tuple(cu.shape)}")
    if cu.dtype.is_floating_point or cu.dtype == torch.bool:
        raise ValueError(f"flash_attention: {name} must be an integer tensor, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"flash_attention: {name} is on {cu.device}, q on {device}: put them on one device")


def _prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, seq_lens):
    """Check the inputs and bring them to the packed layout.

    Returns (q [T, H, D], k, v, cu_seqlens_q [B + 1], cu_seqlens_k [B + 1] (None when paged), paged).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise ValueError(f"flash_attention: {name} must be a floating-point tensor")
        if t.device != q.device:
            raise ValueError(f"flash_attention: {name} is on {t.device}, q on {q.device}: put them on one device")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"flash_attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    paged = block_table is not None or seq_lens is not None
    if paged and (block_table is None or seq_lens is None):
        raise ValueError("flash_attention: paged K/V needs both block_table [B, M] and seq_lens [B]")
    if paged and cu_seqlens_k is not None:
        raise ValueError("flash_attention: give cu_seqlens_k (packed K/V) or block_table + seq_lens (paged), "
                         "not both")
    if q.dim() not in (3, 4):
        raise ValueError(f"flash_attention: q must be [T, H, D] or [B, L, H, D], got shape {tuple(q.shape)}")
    if q.dim() == 4:  # [B, L, H, D]: B sequences of L queries each, packed as [B * L, H, D]
        if cu_seqlens_q is not None:
            raise ValueError("flash_attention: cu_seqlens_q is for packed q [T, H, D], not [B, L, H, D]")
        B, L = q.shape[0], q.shape[1]
        cu_seqlens_q = torch.arange(B + 1, device=q.device, dtype=torch.int32) * L
        q = q.reshape(B * L, *q.shape[2:])
        if not paged:
            if k.dim() != 4 or k.shape[0] != B:
                raise ValueError(f"flash_attention: with q [B={B}, L, H, D], k and v must be [B, S, H_kv, D], "
                                 f"got shape {tuple(k.shape)}")
            S = k.shape[1]
            cu_seqlens_k = torch.arange(B + 1, device=q.device, dtype=torch.int32) * S
            k, v = k.reshape(B * S, *k.shape[2:]), v.reshape(B * S, *v.shape[2:])
    elif cu_seqlens_q is None:  # one sequence
        # arange, not torch.tensor([0, T]): a kernel, not a copy from host memory (allowed in graph capture)
        cu_seqlens_q = torch.arange(2, device=q.device, dtype=torch.int32) * q.shape[0]
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, None, q.device)
    B = cu_seqlens_q.shape[0] - 1
    H, D = q.shape[1], q.shape[2]
    if paged:
        if k.dim() != 4:
            raise ValueError(f"flash_attention: paged k, v must be [num_blocks, P, H_kv, D], got {tuple(k.shape)}")
        if block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"flash_attention: block_table must be [B={B}, M], got shape {tuple(block_table.shape)}")
        if seq_lens.dim() != 1 or seq_lens.shape[0] != B:
            raise ValueError(f"flash_attention: seq_lens must be [B={B}], got shape {tuple(seq_lens.shape)}")
        for name, t in (("block_table", block_table), ("seq_lens", seq_lens)):
            if t.dtype.is_floating_point or t.dtype == torch.bool:
                raise ValueError(f"flash_attention: {name} must be an integer tensor, got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"flash_attention: {name} is on {t.device}, q on {q.device}: put them on one device")
    else:
        if k.dim() != 3:
            raise ValueError(f"flash_attention: packed k, v must be [S, H_kv, D], got shape {tuple(k.shape)} "
                             "(paged pools need block_table and seq_lens)")
        if cu_seqlens_k is None:
            if B != 1:
                raise ValueError(f"flash_attention: q holds B={B} sequences: give cu_seqlens_k [B + 1] for k, v")
            cu_seqlens_k = torch.arange(2, device=q.device, dtype=torch.int32) * k.shape[0]
        _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, B, q.device)
    H_kv, D_k = k.shape[-2], k.shape[-1]
    if D_k != D:
        raise ValueError(f"flash_attention: head dim of q ({D}) differs from k's and v's ({D_k})")
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"flash_attention: query heads H={H} must be a multiple of KV heads H_kv={H_kv}")
    return q, k, v, cu_seqlens_q, cu_seqlens_k, paged


# --------------------------------------------------------------------------------------------------
# torch: the tiled reference
# --------------------------------------------------------------------------------------------------

def _gather_pages(pool: torch.Tensor, table_row: torch.Tensor, length: int) -> torch.Tensor:
    """A sequence's first ``length`` tokens, [length, H_kv, D], read through its block table row.

    (This copies the sequence's K or V, O(S·D) — not a score matrix; the kernel reads pages in place.)
    """
    P = pool.shape[1]
    blocks = table_row[:_cdiv(length, P)].long()  # only the blocks the sequence uses: the rest is garbage
    return pool[blocks].reshape(-1, *pool.shape[2:])[:length]


def flash_attention_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, seq_lens, causal, scale, *,
                          block_m: int = TORCH_BLOCK_M, block_n: int = TORCH_BLOCK_N) -> torch.Tensor:
    """The reference, one sequence at a time: packed q [T, H, D] -> [T, H, D] (q's dtype).

    K/V are packed by ``cu_seqlens_k``, or paged (``block_table``/``seq_lens``; cu_seqlens_k None).
    """
    out = torch.zeros_like(q)
    q_starts = cu_seqlens_q.tolist()  # host syncs: this path is for reading, not for speed
    if block_table is None:
        k_starts = cu_seqlens_k.tolist()
        k_lens = [k_starts[b + 1] - k_starts[b] for b in range(len(q_starts) - 1)]
    else:
        k_lens = seq_lens.tolist()
    for b in range(len(q_starts) - 1):
        q0, q1, S = q_starts[b], q_starts[b + 1], k_lens[b]
        if q1 == q0 or S <= 0:
            continue  # no queries, or no keys: zeros
        if block_table is None:
            kb, vb = k[k_starts[b]:k_starts[b] + S], v[k_starts[b]:k_starts[b] + S]
        else:
            kb, vb = _gather_pages(k, block_table[b], S), _gather_pages(v, block_table[b], S)
        out[q0:q1] = blocked_attention(q[q0:q1], kb, vb, causal, scale, block_m, block_n)
    return out


# --------------------------------------------------------------------------------------------------
# triton
# --------------------------------------------------------------------------------------------------

def _max_len(cu_seqlens: torch.Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # one host sync


def flash_attention_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, seq_lens, causal, scale, *,
                           max_seqlen_q=None, max_seqlen_k=None, block_m=None, block_n=None, num_warps=None,
                           num_stages=None) -> torch.Tensor:
    """Launch :func:`~miniinfer.kernels.flash_attention_triton.flash_attention_kernel` (packed q, [T, H, D]).

    Grid ``(cdiv(max_seqlen_q · G, block_m), B, H_kv)``: program (tile, b, hk) computes rows
    ``[tile · block_m, (tile + 1) · block_m)`` of sequence b's (query, head of group hk) pairs.
    """
    if not triton_available():
        raise RuntimeError("flash_attention(backend='triton'): triton is not installed; use backend='torch'")
    from miniinfer.kernels.flash_attention_triton import LOG2E, flash_attention_kernel

    T, H, D = q.shape
    paged = block_table is not None
    H_kv = k.shape[-2]
    G = H // H_kv
    B = cu_seqlens_q.shape[0] - 1
    out = torch.empty_like(q)
    if T == 0:
        return out
    if D > 256:
        raise ValueError(f"flash_attention(backend='triton'): head dim {D} > 256 is not supported")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"flash_attention(backend='triton'): dtype {q.dtype} is not supported (float16, bfloat16, "
                         "float32); use backend='torch'")
    if not q.is_cuda and not triton_interpreted():
        raise ValueError("flash_attention(backend='triton') needs CUDA tensors (or TRITON_INTERPRET=1 on a CPU)")
    # The kernel indexes rows and heads with strides; only the D dimension must be contiguous, and the
    # small integer tensors are read as flat arrays.
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    cu_seqlens_q = cu_seqlens_q.contiguous()
    if paged:
        block_table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
        seq_lens = seq_lens.contiguous()
    else:
        cu_seqlens_k = cu_seqlens_k.contiguous()
    if max_seqlen_q is None:
        max_seqlen_q = _max_len(cu_seqlens_q)
    if max_seqlen_k is None:
        max_seqlen_k = block_table.shape[1] * k.shape[1] if paged else _max_len(cu_seqlens_k)
    max_seqlen_q, max_seqlen_k = max(1, int(max_seqlen_q)), max(1, int(max_seqlen_k))
    interpreted = triton_interpreted()
    small = interpreted or q.dtype == torch.float32  # fp32 "ieee" dots spill registers with big tiles
    if block_m is None:
        block_m = 16 if interpreted else 64 if small else 128 if D <= 64 else 64
    if block_n is None:
        block_n = 32 if small else 64
    if block_m & (block_m - 1) or block_n & (block_n - 1) or block_m < 16 or block_n < 16:
        raise ValueError(f"flash_attention: block_m ({block_m}) and block_n ({block_n}) must be powers of two >= 16")
    if num_warps is None and not small and block_m >= 128:
        num_warps = 8  # a 128-row tile: two warps per 16-row MMA slab keep the accumulator in registers
    options = {"num_warps": num_warps, "num_stages": num_stages}
    options = {name: value for name, value in options.items() if value is not None}
    if paged:
        stride_kb, stride_kt, stride_kh = k.stride(0), k.stride(1), k.stride(2)
        stride_vb, stride_vt, stride_vh = v.stride(0), v.stride(1), v.stride(2)
        P = k.shape[1]
        table, stride_bt, lens, cu_k = block_table, block_table.stride(0), seq_lens, seq_lens  # cu_k unused
    else:
        stride_kb, stride_kt, stride_kh = 0, k.stride(0), k.stride(1)
        stride_vb, stride_vt, stride_vh = 0, v.stride(0), v.stride(1)
        P = 1
        table, stride_bt, lens, cu_k = cu_seqlens_k, 0, cu_seqlens_k, cu_seqlens_k  # table, lens unused
    grid = (_cdiv(max_seqlen_q * G, block_m), B, H_kv)
    flash_attention_kernel[grid](
        q, k, v, out, cu_seqlens_q, cu_k, table, lens, scale * LOG2E,
        q.stride(0), q.stride(1), stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
        out.stride(0), out.stride(1), G,
        PAGED=paged, CAUSAL=bool(causal), P=P, D=D, D_PAD=max(16, _next_pow2(D)), BLOCK_M=block_m,
        BLOCK_N=block_n, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        INTERPRETER_KV_TILES=_cdiv(max_seqlen_k, block_n) if interpreted else 0, **options)
    return out


# --------------------------------------------------------------------------------------------------
# flash_attn (the library)
# --------------------------------------------------------------------------------------------------

def flash_attn_library() -> tuple[str, object] | None:
    """("fa4", flash_attn.cute) or ("fa2", flash_attn) — whichever imports first — or None."""
    try:
        import flash_attn.cute as fa4  # FA4 (CuTe DSL); its wheel makes `flash_attn` a namespace package

        if hasattr(fa4, "flash_attn_varlen_func"):
            return "fa4", fa4
    except Exception:  # noqa: BLE001 - a broken install (missing CUDA libs) is "not available"
        pass
    try:
        import flash_attn as fa2

        if hasattr(fa2, "flash_attn_varlen_func"):
            return "fa2", fa2
    except Exception:  # noqa: BLE001
        pass
    return None


def _call(fn, *args, **kwargs):
    """Call fn with the keyword arguments its signature has (the flash-attn APIs differ by version)."""
    try:
        params = inspect.signature(fn).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            kwargs = {name: value for name, value in kwargs.items() if name in params}
    except (TypeError, ValueError):  # no signature (a compiled function): pass everything
        pass
    result = fn(*args, **kwargs)
    return result[0] if isinstance(result, tuple) else result  # FA4 returns (out, lse)


def flash_attention_flash_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, seq_lens, causal, scale, *,
                               max_seqlen_q=None, max_seqlen_k=None) -> torch.Tensor:
    """The flash-attn library on packed q [T, H, D]: FA4 if importable, else FA2."""
    found = flash_attn_library()
    if found is None:
        raise RuntimeError(f"flash_attention(backend='flash_attn'): flash-attn is not installed; {FLASH_ATTN_INSTALL}")
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"flash_attention(backend='flash_attn') needs float16/bfloat16 CUDA tensors, got {q.dtype} "
                         f"on {q.device}; use backend='triton' or 'torch'")
    kind, lib = found
    int32 = lambda t: None if t is None else t.to(torch.int32)  # noqa: E731 - no sync, a device-side cast
    if kind == "fa4":
        if block_table is not None:  # FA4 reads pages through page_table, lengths from seqused_k
            return _call(lib.flash_attn_varlen_func, q, k, v, cu_seqlens_q=int32(cu_seqlens_q),
                         seqused_k=int32(seq_lens), page_table=int32(block_table), max_seqlen_q=max_seqlen_q,
                         softmax_scale=scale, causal=causal)
        return _call(lib.flash_attn_varlen_func, q, k, v, cu_seqlens_q=int32(cu_seqlens_q),
                     cu_seqlens_k=int32(cu_seqlens_k), max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                     softmax_scale=scale, causal=causal)
    # FA2 needs the maximum lengths as ints, and paged K/V as cumulative lengths + block_table.
    if max_seqlen_q is None:
        max_seqlen_q = _max_len(cu_seqlens_q)
    if block_table is not None:
        if "block_table" not in inspect.signature(lib.flash_attn_varlen_func).parameters:
            raise RuntimeError("flash_attention(backend='flash_attn'): this flash-attn has no paged varlen "
                               f"(block_table); upgrade it, or {FLASH_ATTN_INSTALL}")
        cu_seqlens_k = torch.nn.functional.pad(seq_lens.to(torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
        if max_seqlen_k is None:
            max_seqlen_k = block_table.shape[1] * k.shape[1]
        return _call(lib.flash_attn_varlen_func, q, k, v, int32(cu_seqlens_q), cu_seqlens_k, int(max_seqlen_q),
                     int(max_seqlen_k), softmax_scale=scale, causal=causal, block_table=int32(block_table))
    if max_seqlen_k is None:
        max_seqlen_k = _max_len(cu_seqlens_k)
    return _call(lib.flash_attn_varlen_func, q, k, v, int32(cu_seqlens_q), int32(cu_seqlens_k), int(max_seqlen_q),
                 int(max_seqlen_k), softmax_scale=scale, causal=causal)


# --------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------

def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    scale: float | None = None, cu_seqlens_q: torch.Tensor | None = None,
                    cu_seqlens_k: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                    seq_lens: torch.Tensor | None = None, backend: str = "auto",
                    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None) -> torch.Tensor:
    """Exact attention ``softmax(q·kᵀ·scale [+ causal mask])·v`` of variable-length sequences, tiled.

    Layouts (see the module docstring):

    * ``q [T, H, D]`` packed by ``cu_seqlens_q [B + 1]`` (absent: one sequence), ``k, v [S_total, H_kv, D]``
      packed by ``cu_seqlens_k [B + 1]`` (absent: one sequence);
    * ``q [B, L, H, D]``, ``k, v [B, S, H_kv, D]``: B sequences of equal lengths;
    * paged: ``k, v [num_blocks, P, H_kv, D]`` with ``block_table [B, M]`` and ``seq_lens [B]`` (keys
      = cached prefix + new tokens, already written), q packed or [B, L, H, D].

    Query i of a sequence with L queries and S keys sits at position ``S - L + i``; ``causal`` lets it see
    keys ``0 .. S - L + i``. ``scale`` defaults to ``1/sqrt(D)``. Returns q's shape and dtype.
    ``max_seqlen_q`` / ``max_seqlen_k``: upper bounds of the query / key lengths for the GPU backends
    (computed with a host sync when absent; for paged K/V ``max_seqlen_k`` defaults to ``M * P``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"flash_attention: backend must be one of {BACKENDS}, got {backend!r}")
    shape = q.shape
    # Lengths known from the shapes cost no sync: one sequence (no cu_seqlens), or a [B, L, ...] batch.
    if max_seqlen_q is None and cu_seqlens_q is None and q.dim() in (3, 4):
        max_seqlen_q = q.shape[-3]
    if max_seqlen_k is None and cu_seqlens_k is None and block_table is None and k.dim() == q.dim():
        max_seqlen_k = k.shape[-3]
    q, k, v, cu_seqlens_q, cu_seqlens_k, paged = _prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table,
                                                          seq_lens)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend == "auto":
        backend = "triton" if q.is_cuda and triton_available() else "torch"
    tables = (block_table, seq_lens) if paged else (None, None)
    if backend == "torch":
        out = flash_attention_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, *tables, causal, scale)
    elif backend == "triton":
        out = flash_attention_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, *tables, causal, scale,
                                     max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    elif backend == "cuda":
        from miniinfer.kernels.flash_attention_cuda import flash_attention_cuda

        out = flash_attention_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, *tables, causal, scale,
                                   max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    else:
        out = flash_attention_flash_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, *tables, causal, scale,
                                         max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    return out.reshape(shape)
