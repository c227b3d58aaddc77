"""Triton forward kernel of flash attention: varlen, causal or not, GQA-packed, dense or paged K/V.

Shapes and semantics as in :mod:`miniinfer.kernels.flash_attention`: packed ``q, out [T, H, D]``
(``cu_seqlens_q [B + 1]``); K/V packed ``[S_total, H_kv, D]`` (``cu_seqlens_k``) or paged
``[num_blocks, P, H_kv, D]`` (``block_table [B, M]``, ``seq_lens [B]``). Query i of a sequence with L
queries and S keys sits at position ``S - L + i`` (bottom-right causal alignment).

How the work is cut:

* **GQA packing.** A program serves one sequence, one KV head ``hk`` and ``BLOCK_M`` rows of the
  sequence's (query, head) pairs of that group: row ``r`` is query ``r // G``, head ``hk·G + r % G``.
  All G heads of the group are rows of one ``q @ kᵀ``, so each K/V tile is loaded once per group, not
  once per query head, and a decode-like call (few queries, G = 7 heads) still fills the MMA's M rows.
* **Online softmax over key tiles** of ``BLOCK_N`` keys (chapter 09, :mod:`miniinfer.kernels.online_softmax`):
  running max m, sum l and an unnormalised float32 accumulator, rescaled by ``alpha = exp2(m - m_new)``.
* **Causal tile skipping.** Key tiles after the last key the tile's last query may see are never
  visited. Tiles every row sees in full (before the first query's position, and inside the sequence)
  run without the mask; only the few tiles along the diagonal pay for it.

Scores are kept in log2 units (``scale · log2(e)`` folded into one multiply) so the softmax uses
``exp2``; everything accumulates in float32 and p is rounded to the value dtype for the ``p @ v`` dot,
as flash-attention does (float32 inputs: exact "ieee" dots, for the CPU interpreter tests).

Rows that see no key (causal with S < L, or padding rows past a sequence's end) must not produce NaN:
m starts at a large *finite* negative number, so a fully masked tile gives ``alpha = exp2(0) = 1`` and
``p = exp2(-inf) = 0`` (not ``exp2(-inf - -inf)``), and the output is 0 where ``l == 0``.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634



@triton.jit
def _kv_tile(q, m, l, acc, n0, S, k_start, pos, table, k_ptr, v_ptr, hk, scale_log2,
             stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, d, d_ok,
             PAGED: tl.constexpr, MASKED: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr,
             D: tl.constexpr, D_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over keys [n0, n0 + BLOCK_N). MASKED: apply key bounds + the causal mask
    (pos = each row's position; pass a huge pos for non-causal). Unmasked tiles lie wholly inside the
    sequence and are visible to every row."""
    keys = n0 + tl.arange(0, BLOCK_N)
    key_ok = keys < S  # never read a block-table entry or a key past the sequence's end
    if PAGED:
        if MASKED:
            blocks = tl.load(table + keys // P, mask=key_ok, other=0).to(tl.int64)
        else:
            blocks = tl.load(table + keys // P).to(tl.int64)
        k_rows = blocks * stride_kb + (keys % P) * stride_kt
        v_rows = blocks * stride_vb + (keys % P) * stride_vt
    else:
        k_rows = (k_start + keys).to(tl.int64) * stride_kt
        v_rows = (k_start + keys).to(tl.int64) * stride_vt
    k_addr = k_ptr + (k_rows + hk * stride_kh)[:, None] + d[None, :]
    v_addr = v_ptr + (v_rows + hk * stride_vh)[:, None] + d[None, :]
    if MASKED:
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_addr, mask=kv_mask, other=0.0)
        v = tl.load(v_addr, mask=kv_mask, other=0.0)
    elif D == D_PAD:  # no mask at all: the loads stay 16-byte vectors
        k = tl.load(k_addr)
        v = tl.load(v_addr)
    else:
        k = tl.load(k_addr, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_addr, mask=d_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    if MASKED:
        s = tl.where(key_ok[None, :] & (keys[None, :] <= pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))  # finite: m starts at -1e30, not -inf
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l, acc


@triton.jit
def flash_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr, block_table_ptr, seq_lens_ptr, scale_log2,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
    stride_ot, stride_oh, G,
    PAGED: tl.constexpr, CAUSAL: tl.constexpr, P: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETER_KV_TILES: tl.constexpr,
):
    """Grid (row tiles, B, H_kv). Rows ``[tile·BLOCK_M, (tile+1)·BLOCK_M)`` of sequence b's L·G
    (query, head) pairs of KV head hk; dense K/V (stride_kb unused) or paged (PAGED)."""
    tile = tl.program_id(0)
    b = tl.program_id(1)
    hk = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + b)
    L = tl.load(cu_seqlens_q_ptr + b + 1) - q_start
    if PAGED:
        k_start = 0
        S = tl.load(seq_lens_ptr + b)
    else:
        k_start = tl.load(cu_seqlens_k_ptr + b)
        S = tl.load(cu_seqlens_k_ptr + b + 1) - k_start
    if tile * BLOCK_M < L * G:  # row tiles past this sequence's end: nothing to do
        r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        i = r // G  # the query of each row ...
        head = hk * G + r % G  # ... and its query head
        row_ok = i < L
        d = tl.arange(0, D_PAD)
        d_ok = d < D
        q_rows = (q_start + i).to(tl.int64) * stride_qt + head * stride_qh
        q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite "minus infinity": see the docstring
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        table = block_table_ptr + b * stride_bt
        first_i = tile * BLOCK_M // G
        last_i = tl.minimum(L, ((tile + 1) * BLOCK_M - 1) // G + 1) - 1  # the tile's last real query
        if CAUSAL:
            pos = S - L + i  # absolute positions (padding rows past L: beyond S, never stored)
            # Keys up to the last query's position (causal_tile_range), and the tiles the first query
            # sees in full need no mask.
            kv_end = tl.maximum(tl.minimum(S, S - L + last_i + 1), 0)
            full_end = tl.maximum(tl.minimum(S - L + first_i + 1, kv_end), 0) // BLOCK_N * BLOCK_N
        else:
            pos = S + i  # every key is visible
            kv_end = S
            full_end = S // BLOCK_N * BLOCK_N
        if INTERPRETER_KV_TILES > 0:
            # The CPU interpreter cannot loop to a bound loaded in the kernel (Triton 3.6 with NumPy
            # >= 2.3), so there the host passes the trip count and tiles past kv_end are skipped.
            for it in range(0, INTERPRETER_KV_TILES):
                if it * BLOCK_N < full_end:
                    m, l, acc = _kv_tile(q, m, l, acc, it * BLOCK_N, S, k_start, pos, table, k_ptr, v_ptr, hk,
                                         scale_log2, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                         stride_vh, d, d_ok, PAGED, False, P, BLOCK_N, D, D_PAD, DOT_PRECISION)
                elif it * BLOCK_N < kv_end:
                    m, l, acc = _kv_tile(q, m, l, acc, it * BLOCK_N, S, k_start, pos, table, k_ptr, v_ptr, hk,
                                         scale_log2, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                         stride_vh, d, d_ok, PAGED, True, P, BLOCK_N, D, D_PAD, DOT_PRECISION)
        else:
            for n0 in range(0, full_end, BLOCK_N):  # tiles every row sees in full: no mask
                m, l, acc = _kv_tile(q, m, l, acc, n0, S, k_start, pos, table, k_ptr, v_ptr, hk,
                                     scale_log2, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                     stride_vh, d, d_ok, PAGED, False, P, BLOCK_N, D, D_PAD, DOT_PRECISION)
            for n0 in range(full_end, kv_end, BLOCK_N):  # the diagonal (and the sequence's last tile)
                m, l, acc = _kv_tile(q, m, l, acc, n0, S, k_start, pos, table, k_ptr, v_ptr, hk,
                                     scale_log2, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                     stride_vh, d, d_ok, PAGED, True, P, BLOCK_N, D, D_PAD, DOT_PRECISION)
        out = acc / tl.where(l > 0, l, 1.0)[:, None]  # a row that saw no key: zeros, not NaN
        out_rows = (q_start + i).to(tl.int64) * stride_ot + head * stride_oh
        tl.store(out_ptr + out_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
