"""Triton kernels of the fused elementwise glue: add + RMSNorm, in-place RoPE on q and k, SiLU-and-mul.

The launchers, input checks and torch references are in :mod:`miniinfer.kernels.fused`.

Each of these operations reads and writes a few kilobytes per token and does almost no arithmetic, so
their cost is memory traffic plus one kernel launch each. Written in plain PyTorch they are several
launches each (a bf16 RMSNorm is a cast, the statistics, a cast back and a multiply; RoPE is chunk,
four products, two sums and a cat), and every launch re-reads what the previous one just wrote. Here
each is one launch that reads its inputs once and writes its outputs once.

Numerics follow the teaching functions (:mod:`miniinfer.layers`, :mod:`miniinfer.rope`): loads are
upcast to float32, all arithmetic is float32, and results are rounded to the storage dtype where the
unfused model rounds them (the residual sum; the normalised value before the RMSNorm gain) or, where
the unfused model rounds after every op in bf16 (RoPE with bf16 tables, ``silu(gate) * up``), once at
the end.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fused_add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    stride_x, stride_r, stride_o, stride_ro, E, eps,
    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROUND_BEFORE_WEIGHT: tl.constexpr,
):
    """Grid (T,). Row t: s = x + residual (rounded to x's dtype, stored), out = rms_norm(s) * weight.

    The whole row (E <= BLOCK) sits in registers, so it is read once: the sum of squares and the
    normalisation use the same loaded values.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < E
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # Rounded to the storage dtype exactly like the unfused ``x + residual`` (fp32 add, one rounding):
        # the residual stream the next layer reads must be the same numbers.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    s = x.to(tl.float32)
    variance = tl.sum(s * s, axis=0) / E  # masked columns are 0: they add nothing
    normed = s * (1.0 / tl.sqrt(variance + eps))
    if ROUND_BEFORE_WEIGHT:
        normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)  # HF: cast back before the gain
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rope_qk_kernel(
    qkv_ptr, cos_ptr, sin_ptr, positions_ptr, stride_t, stride_h, stride_d, stride_cos, stride_sin,
    num_heads, num_rows,
    HALF: tl.constexpr, HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr, GATHER: tl.constexpr,
):
    """Grid (T,). Rotate the first ``num_heads`` heads of token t in place (half-split pairs i, i + D/2).

    GATHER: the cos/sin row is ``positions[t]`` of the full tables (clamped to the table, so a bad
    position cannot read out of bounds); else row t of per-token cos/sin. One program loads the token's
    cos/sin row once and applies it to all its heads.
    """
    t = tl.program_id(0).to(tl.int64)
    if GATHER:
        row = tl.load(positions_ptr + t).to(tl.int64)
        row = tl.minimum(tl.maximum(row, 0), num_rows - 1)
    else:
        row = t
    i = tl.arange(0, HALF_PAD)
    i_ok = i < HALF
    cos = tl.load(cos_ptr + row * stride_cos + i, mask=i_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + row * stride_sin + i, mask=i_ok, other=0.0).to(tl.float32)[None, :]
    h = tl.arange(0, HEADS_PAD)
    mask = (h < num_heads)[:, None] & i_ok[None, :]
    first = qkv_ptr + t * stride_t + h[:, None] * stride_h + i[None, :] * stride_d  # [HEADS_PAD, HALF_PAD]
    second = first + HALF * stride_d
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(second, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(qkv_ptr.dtype.element_ty), mask=mask)
    tl.store(second, (x2 * cos + x1 * sin).to(qkv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, I, BLOCK: tl.constexpr):
    """Grid (T, cdiv(I, BLOCK)). out[t, j] = silu(x[t, j]) * x[t, I + j] for one block of j."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(x_ptr + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    # silu(g) = g / (1 + exp(-g)), the formula torch uses; exp overflowing to inf gives -0, not NaN.
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + t * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)
