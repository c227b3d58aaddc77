"""Triton kernels of paged attention: decode (split-KV), prefill over a paged prefix, and ``write_kv``.

Shapes as in :mod:`miniinfer.kernels.paged_attention`: caches ``[num_blocks, P, H_kv, D]``, a token at
position ``pos`` of sequence ``b`` lives at block ``block_tables[b, pos // P]``, offset ``pos % P``.

Decode is memory-bound (each K/V element is used by only G = H / H_kv query heads), so the kernel is
built to read every K/V byte once and to keep the whole GPU busy:

* one program serves one (sequence, KV head, partition of the context) and *all* G query heads of
  that KV head: the G heads (padded to >= 16, the smallest ``tl.dot`` M) form the rows of
  ``q @ k^T``, so a K/V tile is loaded once, not G times;
* split-KV (flash-decoding): batch x H_kv alone is far too few programs for 132 SMs at batch 64 and
  2 KV heads, so the context is cut into partitions; each writes a partial (normalised output, max,
  sum of exponentials) and a second small kernel combines the partials in a fixed order
  (deterministic). With a single partition the first kernel writes the output itself;
* K/V tiles of ``BLOCK_N`` tokens are gathered through the block table row by row: each row is D
  contiguous elements, which Triton turns into 16-byte vector loads.

Scores are kept in log2 units (``scale * log2(e)`` folded into one multiply) so the softmax uses
``exp2``. Everything accumulates in float32; p is rounded to the value dtype for the ``p @ v`` dot,
as flash-attention does (for float32 inputs the dots run in exact "ieee" precision, not tf32).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def paged_decode_partition_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, tmp_out_ptr, tmp_ml_ptr,
    scale_log2, stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_bt, stride_ob, stride_oh, H, G, max_parts, max_seq_len,
    P: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, G_PAD: tl.constexpr, PARTITION: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (B, H_kv, partitions). Attention of G query heads over tokens [start, start + PARTITION)."""
    b = tl.program_id(0)
    hk = tl.program_id(1)
    part = tl.program_id(2)
    # Clamped to the bound the grid was sized for: a longer length (a caller bug) stays memory-safe.
    seq_len = tl.minimum(tl.load(seq_lens_ptr + b), max_seq_len)
    start = part * PARTITION
    if start < seq_len:  # partitions past the end have nothing to do (and write nothing)
        end = tl.minimum(start + PARTITION, seq_len)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        heads = hk * G + g
        g_ok = g < G
        d_ok = d < D
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        l = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        table = block_tables_ptr + b * stride_bt
        # A compile-time trip count: tiles past `end` (only in a sequence's last partition) are fully
        # masked, cost no memory traffic and leave m, l, acc unchanged. (Runtime loop bounds derived
        # from a loaded value also break Triton 3.6's CPU interpreter under NumPy >= 2.3.)
        for it in range(0, PARTITION // BLOCK_N):
            tokens = start + it * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = tokens < end  # never read a block-table entry past the sequence's end
            blocks = tl.load(table + tokens // P, mask=valid, other=0).to(tl.int64)
            offset = tokens % P
            if D == D_PAD:  # a mask constant along D keeps the loads 16-byte vectors
                kv_mask = valid[:, None]
            else:
                kv_mask = valid[:, None] & d_ok[None, :]
            k = tl.load(k_cache_ptr + (blocks * stride_kb + offset * stride_kt + hk * stride_kh)[:, None] + d[None, :],
                        mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + (blocks * stride_vb + offset * stride_vt + hk * stride_vh)[:, None] + d[None, :],
                        mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [G_PAD, BLOCK_N]
            s = tl.where(valid[None, :], s, float("-inf"))
            # The first tile holds token `start` < seq_len, so m is finite from then on: no -inf - -inf.
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m = m_new
        out = acc / l[:, None]
        mask = g_ok[:, None] & d_ok[None, :]
        if SINGLE:
            tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            row = (b * H + heads) * max_parts + part  # [G_PAD] index into [B, H, max_parts]
            tl.store(tmp_out_ptr + row[:, None] * D + d[None, :], out, mask=mask)
            tl.store(tmp_ml_ptr + row * 2, m, mask=g_ok)
            tl.store(tmp_ml_ptr + row * 2 + 1, l, mask=g_ok)
    elif SINGLE:
        if part == 0:  # seq_len 0 (e.g. a padding row): attend to nothing, output zeros, never garbage
            g = tl.arange(0, G_PAD)
            d = tl.arange(0, D_PAD)
            tl.store(out_ptr + b * stride_ob + (hk * G + g)[:, None] * stride_oh + d[None, :],
                     tl.zeros([G_PAD, D_PAD], tl.float32).to(out_ptr.dtype.element_ty),
                     mask=(g < G)[:, None] & (d < D)[None, :])


@triton.jit
def paged_decode_reduce_kernel(
    tmp_out_ptr, tmp_ml_ptr, seq_lens_ptr, out_ptr, stride_ob, stride_oh, H, max_parts, max_seq_len,
    D: tl.constexpr, D_PAD: tl.constexpr, PARTITION: tl.constexpr, PARTS_PAD: tl.constexpr,
):
    """Grid (B, H). out = sum_p w_p o_p / sum_p w_p with w_p = exp2(m_p - max m) * l_p, p in order."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.minimum(tl.load(seq_lens_ptr + b), max_seq_len)
    num_parts = tl.cdiv(seq_len, PARTITION)
    p = tl.arange(0, PARTS_PAD)
    p_ok = p < num_parts  # only partitions that were written
    d = tl.arange(0, D_PAD)
    row = (b * H + h) * max_parts + p
    m = tl.load(tmp_ml_ptr + row * 2, mask=p_ok, other=float("-inf"))
    l = tl.load(tmp_ml_ptr + row * 2 + 1, mask=p_ok, other=0.0)
    m_max = tl.maximum(tl.max(m, 0), -1e30)  # finite even when no partition was written (seq_len 0)
    w = tl.where(p_ok, tl.exp2(m - m_max) * l, 0.0)
    o = tl.load(tmp_out_ptr + row[:, None] * D + d[None, :], mask=p_ok[:, None] & (d < D)[None, :], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0)  # seq_len 0: zeros, not NaN
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def _prefill_kv_tile(q, m, l, acc, n0, kv_end, pos, table, k_cache_ptr, v_cache_ptr, hk, scale_log2,
                     stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, d, d_ok,
                     P: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     D_PAD: tl.constexpr, D: tl.constexpr):
    """One online-softmax step of prefill: keys [n0, n0 + BLOCK_N) of one sequence, causal mask."""
    keys = n0 + tl.arange(0, BLOCK_N)
    key_ok = keys < kv_end  # never read a block-table entry past the keys this tile may see
    blocks = tl.load(table + keys // P, mask=key_ok, other=0).to(tl.int64)
    offset = keys % P
    if D_PAD == D:  # a mask constant along D keeps the loads 16-byte vectors
        kv_mask = key_ok[:, None]
    else:
        kv_mask = key_ok[:, None] & d_ok[None, :]
    k = tl.load(k_cache_ptr + (blocks * stride_kb + offset * stride_kt + hk * stride_kh)[:, None] + d[None, :],
                mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    # Key 0 is visible to every row (padding rows too), so each row's max is finite after the first tile.
    s = tl.where(key_ok[None, :] & (keys[None, :] <= pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + (blocks * stride_vb + offset * stride_vt + hk * stride_vh)[:, None] + d[None, :],
                mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l, acc


@triton.jit
def paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_seqlens_q_ptr, seq_lens_ptr, out_ptr, scale_log2,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
    stride_ot, stride_oh, G,
    P: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETER_KV_TILES: tl.constexpr,
):
    """Grid (query tiles, B, H). Flash attention of BLOCK_M new queries over the paged keys, causal.

    The new queries of sequence b are the last q_len of its seq_len positions: query i sits at
    position seq_len - q_len + i and sees keys 0..position (cached prefix + new tokens so far).
    """
    tile = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + b)
    q_len = tl.load(cu_seqlens_q_ptr + b + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + b)
    if tile * BLOCK_M < q_len:
        hk = h // G
        i = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = i < q_len
        pos = seq_len - q_len + i  # absolute positions of the queries
        d = tl.arange(0, D_PAD)
        d_ok = d < D
        q = tl.load(q_ptr + (q_start + i)[:, None] * stride_qt + h * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        table = block_tables_ptr + b * stride_bt
        # Keys this tile can see: 0 .. (position of its last real query), never past seq_len.
        kv_end = tl.minimum(seq_len, seq_len - q_len + tl.minimum(q_len, (tile + 1) * BLOCK_M))
        if INTERPRETER_KV_TILES > 0:
            # The CPU interpreter cannot loop to a bound computed in the kernel (Triton 3.6 with NumPy
            # >= 2.3), so there the host passes the trip count (a constexpr costs nothing when nothing
            # is compiled) and tiles past kv_end are skipped.
            for it in range(0, INTERPRETER_KV_TILES):
                if it * BLOCK_N < kv_end:
                    m, l, acc = _prefill_kv_tile(
                        q, m, l, acc, it * BLOCK_N, kv_end, pos, table, k_cache_ptr, v_cache_ptr, hk, scale_log2,
                        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, d, d_ok,
                        P, BLOCK_N, DOT_PRECISION, D_PAD, D)
        else:
            for n0 in range(0, kv_end, BLOCK_N):
                m, l, acc = _prefill_kv_tile(
                    q, m, l, acc, n0, kv_end, pos, table, k_cache_ptr, v_cache_ptr, hk, scale_log2,
                    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, d, d_ok,
                    P, BLOCK_N, DOT_PRECISION, D_PAD, D)
        out = acc / l[:, None]
        tl.store(out_ptr + (q_start + i)[:, None] * stride_ot + h * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
    H_kv, D: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    """Grid (T,). Copy token t's [H_kv, D] keys and values to cache slot slot_mapping[t] (-1: skip).

    The caches are contiguous, viewed as [num_blocks * P, H_kv, D]: slot s starts at s * H_kv * D.
    """
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot >= 0:
        hh = tl.arange(0, H_PAD)
        d = tl.arange(0, D_PAD)
        mask = (hh < H_kv)[:, None] & (d < D)[None, :]
        k = tl.load(k_ptr + t * stride_kt + hh[:, None] * stride_kh + d[None, :], mask=mask)
        v = tl.load(v_ptr + t * stride_vt + hh[:, None] * stride_vh + d[None, :], mask=mask)
        dst = slot * (H_kv * D) + hh[:, None] * D + d[None, :]
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)
