"""The int4 dequant-matmul kernels on the CPU: Triton under TRITON_INTERPRET=1 (set by
``miniinfer.kernels``) against the torch reference, which is itself checked against a float64
dequantization written from the layout's definition. fp32 and fp16, M = 1 … 17, odd N and K, group
sizes 16 … 128 (tiles inside one group, and groups that are not a multiple of the tile).

Tolerances: fp32, the same products summed in another order: 1e-5 relative. fp16: the weights are
rounded to fp16 identically in both; the kernel accumulates in float32, the CPU reference in its own
order: 2e-3.
"""

from __future__ import annotations

import pytest
import torch

from miniinfer.kernels import triton_available
from miniinfer.kernels.int4_matmul import dequantize_int4, int4_matmul, int4_matmul_torch, int4_matmul_triton
from miniinfer.quant import GroupQuantLinear

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def layer_tensors(K: int, N: int, g: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (K, N), generator=gen)
    zeros = torch.randint(0, 16, (K // g, N), generator=gen)
    scales = (torch.rand(K // g, N, generator=gen) * 0.02 + 0.001).to(dtype)
    layer = GroupQuantLinear(q, scales, zeros, 4, g)
    return layer, q, zeros, scales


def test_dequantize_int4_matches_the_layout_definition():
    K, N, g = 48, 24, 16
    layer, q, zeros, scales = layer_tensors(K, N, g, torch.float32, 0)
    w = dequantize_int4(layer.qweight, layer.qzeros, layer.scales, g, torch.float64)
    expected = torch.empty(K, N, dtype=torch.float64)
    for k in range(K):
        for n in range(0, N, 5):
            expected[k, n] = scales[k // g, n].double() * (q[k, n] - zeros[k // g, n])
    torch.testing.assert_close(w[:, ::5], expected[:, ::5], atol=1e-9, rtol=1e-6)  # one float32 product


@needs_triton
@pytest.mark.parametrize("M,K,N,g", [(1, 96, 40, 32), (3, 192, 72, 48), (7, 128, 24, 16), (16, 256, 136, 128),
                                     (17, 64, 16, 64), (2, 384, 56, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_int4_matmul(M, K, N, g, dtype):
    layer, *_ = layer_tensors(K, N, g, dtype, M * 7 + K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
    reference = int4_matmul_torch(x.float(), layer.qweight, layer.qzeros, layer.scales.float(), g)
    got = int4_matmul_triton(x, layer.qweight, layer.qzeros, layer.scales, g)
    assert got.dtype == dtype and got.shape == (M, N)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    scale = reference.abs().max().item()
    torch.testing.assert_close(got.float(), reference, atol=tol * scale, rtol=tol)


@needs_triton
def test_triton_split_k_and_blocks():
    layer, *_ = layer_tensors(256, 48, 32, torch.float32, 3)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(5))
    reference = int4_matmul_torch(x, layer.qweight, layer.qzeros, layer.scales, 32)
    for split_k, block_k in ((1, 32), (3, 16), (8, 32)):
        got = int4_matmul_triton(x, layer.qweight, layer.qzeros, layer.scales, 32, split_k=split_k,
                                 block_k=block_k, block_n=32)
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)


@needs_triton
def test_layer_runs_the_triton_kernel_with_act_order():
    K, N, g = 64, 32, 16
    gen = torch.Generator().manual_seed(9)
    q, zeros = torch.randint(0, 16, (K, N), generator=gen), torch.randint(0, 16, (K // g, N), generator=gen)
    scales = torch.rand(K // g, N, generator=gen) * 0.1
    g_idx = torch.empty(K, dtype=torch.long).index_copy_(0, torch.randperm(K, generator=gen), torch.arange(K) // g)
    layer = GroupQuantLinear(q, scales, zeros, 4, g, bias=torch.randn(N, generator=gen), g_idx=g_idx)
    x = torch.randn(2, 3, K, generator=gen)
    expected = layer(x)  # CPU default: the torch path
    layer.backend = "triton"
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_int4_matmul_checks_its_inputs():
    layer, *_ = layer_tensors(64, 16, 32, torch.float32, 1)
    with pytest.raises(ValueError, match="qweight"):
        int4_matmul(torch.randn(1, 72), layer.qweight, layer.qzeros, layer.scales, 32)
    with pytest.raises(ValueError, match="backend"):
        int4_matmul(torch.randn(1, 64), layer.qweight, layer.qzeros, layer.scales, 32, backend="cutlass")
    # auto on a CPU: the torch reference
    x = torch.randn(1, 64)
    torch.testing.assert_close(int4_matmul(x, layer.qweight, layer.qzeros, layer.scales, 32),
                               int4_matmul_torch(x, layer.qweight, layer.qzeros, layer.scales, 32))


def _bits_to(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint32 words (held as int64) -> their two 16-bit halves read as ``dtype`` [..., 2], low half first."""
    lo = (words & 0xFFFF).to(torch.int32)
    hi = ((words >> 16) & 0xFFFF).to(torch.int32)
    pair = torch.stack([lo, hi], dim=-1)
    pair = torch.where(pair >= 2**15, pair - 2**16, pair).to(torch.int16)  # the same 16 bits, signed
    return pair.view(dtype)


def _emulated_group_params(scales, zwords, group, columns, col_ok):
    """A group's scales (float) [32 lanes, 4 columns] and zero words [32 lanes], as each lane loads them."""
    sc = torch.stack([scales[group, columns + j] for j in range(4)], 1).float() * col_ok[:, None]
    zw = (zwords[group, columns // 8] >> ((columns % 8) * 4)) * col_ok
    return sc, zw


def _emulated_fold(acc, part, sc):
    """acc += scale · part, then part = 0: C rows g / g+8 of column pair cp are lane (g, ·)'s columns 2cp / 2cp+1."""
    for cp in range(2):
        for i in range(16):
            col_scale = sc[4 * (i % 8), 2 * cp + i // 8].double()  # lane (g, t=0)
            acc[cp, i] += col_scale * part[cp, i]
    part.zero_()


def emulate_int4_cuda(x, qweight, qzeros, scales, group_size, warps_n, warps_k, rows_per_split):
    """csrc/int4_gemv.cu re-stated with torch on the CPU (no GPU here), one warp at a time, vectorised
    over its 32 lanes: the same index maps (lane (g, t) loads packed row r0+t of columns 4g … 4g+3; each
    of the CTA's warps_k warps takes a contiguous run of 4-row steps), the same bit tricks (LOP3 of the
    nibble pairs (k, k+4) into 1024 / 128, HSUB2 of the zero, in x's dtype), the m16n8k16 fragment
    layouts of the PTX ISA for A, B and C, the per-group float32 sums scaled when the group changes, the
    K-lane sum and the split sum. Returns out [M, N] float32 (before the final rounding)."""
    dtype = x.dtype
    magic = 0x64006400 if dtype == torch.float16 else 0x43004300
    M, K = x.shape
    N = qweight.shape[1]
    rows = K // 8
    group_rows = group_size // 8
    splits = -(-rows // rows_per_split)
    tile_n = 32 * warps_n
    words_all = qweight.to(torch.int64) & 0xFFFFFFFF           # [K/8, N]
    zwords_all = qzeros.to(torch.int64) & 0xFFFFFFFF           # [G, N/8]
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    out = torch.zeros(M, N, dtype=torch.float64)
    for tile in range(-(-N // tile_n)):
        for split in range(splits):
            row_begin = split * rows_per_split
            row_end = min(row_begin + rows_per_split, rows)
            split_steps = -(-(row_end - row_begin) // 4)
            per_warp = -(-split_steps // warps_k)
            for wn in range(warps_n):
                col0 = tile * tile_n + wn * 32 + 4 * g                  # [32]
                col_ok = col0 < N
                c = col0.clamp(max=N - 4)
                acc = torch.zeros(2, 16, 16, dtype=torch.float64)       # [cp][A row][token]
                for wk in range(warps_k):
                    s_begin, s_end = wk * per_warp, min(wk * per_warp + per_warp, split_steps)
                    if s_begin >= s_end:
                        continue
                    group = (row_begin + 4 * s_begin) // group_rows
                    group_end = (group + 1) * group_rows
                    part = torch.zeros_like(acc)

                    sc, zw = _emulated_group_params(scales, zwords_all, group, c, col_ok)
                    for s in range(s_begin, s_end):
                        row0 = row_begin + 4 * s
                        if row0 >= group_end:
                            _emulated_fold(acc, part, sc)
                            group += 1
                            group_end += group_rows
                            sc, zw = _emulated_group_params(scales, zwords_all, group, c, col_ok)
                        row = row0 + t
                        row_ok = row < row_end
                        ok = col_ok & row_ok
                        r = row.clamp(max=rows - 1)
                        words = torch.stack([words_all[r, c + j] for j in range(4)], 1)  # [32 lanes, 4 columns]
                        words = torch.where(ok[:, None], words, torch.zeros_like(words))
                        deq = torch.empty(32, 4, 4, 2, dtype=dtype)     # [lane, column j, pair p, half]
                        for j in range(4):
                            z = (zw >> (4 * j)) & 0xF
                            zero2 = _bits_to(magic | z | (z << 16), dtype)
                            for p in range(4):
                                deq[:, j, p] = _bits_to(((words[:, j] >> (4 * p)) & 0x000F000F) | magic, dtype) - zero2
                        # B: lane (g, t) holds x of token mt·8 + g at its row (zero past M or the slice)
                        xs = torch.zeros(32, 2, 8, dtype=torch.float64)  # [lane, token tile, k of the row]
                        for mt in range(2):
                            token = mt * 8 + g
                            use = row_ok & (token < M)
                            for ln in torch.nonzero(use).flatten().tolist():
                                xs[ln, mt] = x[int(token[ln]), int(r[ln]) * 8:int(r[ln]) * 8 + 8].double()
                        # The fragments of the PTX ISA (m16n8k16): A row i, k kk; B k kk, token column n.
                        for cp in range(2):
                            for kb in range(2):
                                A = torch.zeros(16, 16, dtype=torch.float64)
                                B = torch.zeros(2, 16, 8, dtype=torch.float64)
                                regs = [(2 * cp, 2 * kb, 0, 0), (2 * cp + 1, 2 * kb, 8, 0), (2 * cp, 2 * kb + 1, 0, 8),
                                        (2 * cp + 1, 2 * kb + 1, 8, 8)]
                                for j, p, drow, dk in regs:
                                    A[g + drow, 2 * t + dk] = deq[:, j, p, 0].double()
                                    A[g + drow, 2 * t + dk + 1] = deq[:, j, p, 1].double()
                                for mt in range(2):
                                    for half, p in ((0, 2 * kb), (8, 2 * kb + 1)):
                                        B[mt, 2 * t + half, g] = xs[:, mt, p]
                                        B[mt, 2 * t + half + 1, g] = xs[:, mt, p + 4]
                                for mt in range(2):
                                    part[cp, :, mt * 8:mt * 8 + 8] += A @ B[mt]
                    _emulated_fold(acc, part, sc)
                # C fragment: A row i <-> column (row g: col0 + 2cp, row g+8: col0 + 2cp + 1)
                for cp in range(2):
                    for i in range(16):
                        column = tile * tile_n + wn * 32 + 4 * (i % 8) + 2 * cp + i // 8
                        if column < N:
                            out[:, column] += acc[cp, i, :M]
    return out.float()


CUDA_EMULATED = [(1, 256, 72, 32, 1, 8, 8), (3, 384, 200, 128, 4, 2, 16), (9, 192, 40, 64, 8, 1, 4),
                 (16, 256, 64, 32, 2, 4, 12), (2, 96, 40, 32, 1, 8, 100), (5, 640, 48, 64, 1, 3, 1000)]


@pytest.mark.parametrize("M,K,N,g,warps_n,warps_k,rows_per_split", CUDA_EMULATED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_int4_index_maps_emulated(M, K, N, g, warps_n, warps_k, rows_per_split, dtype):
    """The CUDA kernel's lane / fragment / bit-trick arithmetic, emulated, equals the torch reference:
    partial tiles (N = 40, 72, 200 are not multiples of the tile), M across one and two token tiles,
    K split across CTAs (rows_per_split < K/8) and not, every CTA shape kind."""
    layer, *_ = layer_tensors(K, N, g, dtype, K + N + M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M + K)).to(dtype)
    got = emulate_int4_cuda(x, layer.qweight, layer.qzeros, layer.scales, g, warps_n, warps_k, rows_per_split)
    # the kernel multiplies x by the exact integers q − z and scales each group's float32 sum: the
    # weights it uses are s·(q − z) without rounding to x's dtype
    weights = dequantize_int4(layer.qweight, layer.qzeros, layer.scales, g, torch.float64)
    reference = (x.double() @ weights).float()
    torch.testing.assert_close(got, reference, atol=1e-5 * reference.abs().max().item(), rtol=1e-5)


def _guarded(t: torch.Tensor, rows: int, fill) -> torch.Tensor:
    """``t`` as the first rows of a bigger contiguous tensor whose extra rows hold ``fill``: a kernel that
    reads a row past the end sees NaN / junk instead of (on a GPU) faulting or (here) reading heap."""
    big = torch.full((t.shape[0] + rows, *t.shape[1:]), fill, dtype=t.dtype)
    big[: t.shape[0]] = t
    view = big[: t.shape[0]]
    assert view.is_contiguous() and view.data_ptr() == big.data_ptr()
    return view


@needs_triton
@pytest.mark.parametrize("M,K,N,g,split_k,block_k", [(2, 256, 48, 64, 3, 32), (16, 512, 40, 128, 3, 64),
                                                     (1, 1024, 24, 128, 3, 64)])
def test_triton_last_split_reads_no_group_past_the_end(M, K, N, g, split_k, block_k):
    """The H200 fault (M = 16, K = N = 8192, g128: split_k 5 of 1664 inputs, so the last split has two whole
    tiles at k0 = 8192, 8256 past K): those tiles loaded scales / zeros row k0 // g = G, past the end.
    Here the rows past the end are NaN: any such load shows up in the output."""
    layer, *_ = layer_tensors(K, N, g, torch.float32, K + N + M)
    def cdiv(a, b):
        return (a + b - 1) // b

    k_per_split = cdiv(cdiv(K, split_k), block_k) * block_k  # as the wrapper computes it
    assert cdiv(K, k_per_split) * k_per_split - K >= block_k, "the case must have a whole tile past K"
    scales = _guarded(layer.scales, 2, float("nan"))
    qzeros = _guarded(layer.qzeros, 2, -1)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    reference = int4_matmul_torch(x, layer.qweight, layer.qzeros, layer.scales, g)
    got = int4_matmul_triton(x, layer.qweight, qzeros, scales, g, split_k=split_k, block_k=block_k, block_n=32)
    assert torch.isfinite(got).all(), "the kernel read scales past the last group"
    torch.testing.assert_close(got, reference, atol=1e-5 * reference.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("K,N", [(8192, 8192), (3584, 4608), (3584, 3584), (3584, 37888), (18944, 3584),
                                 (4096, 4096), (96, 40)])
@pytest.mark.parametrize("split_k", [None, 1, 3, 1000])
@pytest.mark.parametrize("shape", [0, 3])
def test_cuda_split_covers_k_in_whole_steps(K, N, split_k, shape):
    """Every K slice of the CUDA kernel is a whole number of warp steps (4 packed rows), none is empty,
    and together they cover K/8 rows exactly."""
    from miniinfer.kernels.int4_matmul import cuda_split

    rows = K // 8
    rows_per_split, splits = cuda_split(N, K, 132, split_k, shape)
    assert rows_per_split % 4 == 0 and splits >= 1
    assert (splits - 1) * rows_per_split < rows <= splits * rows_per_split


@pytest.mark.parametrize("K,N", [(64, 96), (256, 32), (384, 4608)])
def test_tiled_int4_layout_matches_the_kernels_index(K, N):
    """tile_int4_weight puts packed row 4s+t, columns 4g … 4g+3 of column block b where the CUDA kernel's
    tiled path reads lane (g, t) of step s: 16-byte vector (b · K/32 + s) · 32 + 4g + t."""
    from miniinfer.kernels.int4_matmul import tile_int4_weight

    qweight = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32,
                            generator=torch.Generator().manual_seed(K + N))
    vectors = tile_int4_weight(qweight).view(-1, 4)
    assert vectors.shape[0] * 4 == qweight.numel()
    steps = K // 32
    for block in range(N // 32):
        for step in range(steps):
            for g in range(8):
                for t in range(4):
                    row, col = 4 * step + t, 32 * block + 4 * g
                    assert torch.equal(vectors[(block * steps + step) * 32 + 4 * g + t], qweight[row, col:col + 4])
    with pytest.raises(ValueError, match="N % 32"):
        tile_int4_weight(qweight[:, :N - 8])
