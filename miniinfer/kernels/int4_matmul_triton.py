"""Triton kernel: int4 dequant + matmul for few rows (decode: M = 1 … 16 tokens), GPTQ layout.

``out[m, n] = Σ_k x[m, k] · scales[k // g, n] · (q[k, n] − zeros[k // g, n])``, q packed 8 per int32
along K (``qweight`` [K/8, N]), zeros packed 8 per int32 along N (``qzeros`` [G, N/8]).

At M ≤ 16 a matmul is a matrix–vector product in disguise: every weight is used M times, so the time
is the time to *read* the weights. int4 weights are a quarter of bf16's bytes, and the dequantization
(a shift, a mask, a subtract, a multiply) happens in registers, hidden under the loads. The grid is
(N / BLOCK_N, SPLIT_K, M / BLOCK_M): a square 8192 × 8192 matrix has only 64 column tiles of 128, too
few to keep 132 SMs reading, so K is split as well and the float32 partial sums are added afterwards.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def int4_matmul_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, partial_ptr,
    M, N, K, group_size,
    stride_xm, stride_qk, stride_zg, stride_sg, stride_ps, stride_pm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    K_TILES: tl.constexpr, ONE_GROUP_PER_TILE: tl.constexpr, IEEE: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M)); writes float32 partial[split, m, n].

    ONE_GROUP_PER_TILE: group_size is a multiple of BLOCK_K (and splits start on tile boundaries), so a
    K-tile lies in one group: its scales and zeros are one row [BLOCK_N], loaded once per tile.
    """
    pid_n, pid_s, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    zero_shift = (offs_n % 8) * 4
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Each split covers K_TILES tiles of BLOCK_K inputs. The trip count is a compile-time constant: fixed
    # per layer shape anyway, and the CPU interpreter cannot loop to a bound passed at run time.
    k_begin = pid_s * (K_TILES * BLOCK_K)
    for k_tile in range(0, K_TILES):
        k0 = k_begin + k_tile * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        kn_ok = k_ok[:, None] & n_ok[None, :]
        packed = tl.load(qweight_ptr + (offs_k // 8)[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                         mask=kn_ok, other=0)
        q = (packed >> ((offs_k % 8) * 4)[:, None]) & 0xF  # [BLOCK_K, BLOCK_N]
        if ONE_GROUP_PER_TILE:
            # The last split may end in whole tiles past K (k0 >= K): their group k0 // group_size is G or
            # more, a row past the end of scales / qzeros. Mask those loads by the tile too (x and the
            # weights are already masked to 0 there, so the tile adds nothing).
            group = k0 // group_size
            gn_ok = n_ok & (k0 < K)
            s = tl.load(scales_ptr + group * stride_sg + offs_n, mask=gn_ok, other=0.0).to(tl.float32)[None, :]
            zp = tl.load(qzeros_ptr + group * stride_zg + offs_n // 8, mask=gn_ok, other=0)
            z = ((zp >> zero_shift) & 0xF)[None, :]
        else:
            group = offs_k // group_size
            s = tl.load(scales_ptr + group[:, None] * stride_sg + offs_n[None, :], mask=kn_ok, other=0.0)
            s = s.to(tl.float32)
            zp = tl.load(qzeros_ptr + group[:, None] * stride_zg + (offs_n // 8)[None, :], mask=kn_ok, other=0)
            z = (zp >> zero_shift[None, :]) & 0xF
        w = ((q - z).to(tl.float32) * s).to(x_ptr.dtype.element_ty)  # rounded like the torch reference
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    out = partial_ptr + pid_s * stride_ps + offs_m[:, None].to(tl.int64) * stride_pm + offs_n[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])
