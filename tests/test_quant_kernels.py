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


def emulate_int4_gemv_cuda(x, qweight, qzeros, scales, group_size, groups_per_split):
    """csrc/int4_gemv.cu re-stated in NumPy (no GPU here): the same index maps — 16-byte vectors of 4
    packed words per thread, the K slice per blockIdx.y, the 2^23 mantissa trick, scale and zero applied
    once per group — vectorised over the threads (columns). Returns the float32 partial sums [splits, N]."""
    import numpy as np

    K, N = x.numel(), qweight.shape[1]
    G = K // group_size
    splits = -(-G // groups_per_split)
    xs_all = x.float().numpy().reshape(-1)
    words = qweight.numpy().view(np.uint32).reshape(K // 8, N // 4, 4)  # [row, thread, j]: one int4 per thread
    zwords = qzeros.numpy().view(np.uint32)
    sc = scales.float().numpy()
    n = np.arange(0, N, 4)  # the first column of every thread
    partial = np.zeros((splits, N), dtype=np.float32)
    for split in range(splits):
        g_begin, g_end = split * groups_per_split, min(split * groups_per_split + groups_per_split, G)
        k_begin = g_begin * group_size
        xs = xs_all[k_begin:g_end * group_size]  # shared memory
        acc = np.zeros((N // 4, 4), dtype=np.float32)
        for g in range(g_begin, g_end):
            dot = np.zeros((N // 4, 4), dtype=np.float32)
            x_sum = np.float32(0)
            for r in range(g * group_size // 8, (g + 1) * group_size // 8):
                packed = words[r]  # [threads, 4]
                for i in range(8):
                    xv = np.float32(xs[r * 8 - k_begin + i])
                    x_sum += xv
                    nib = (((packed >> np.uint32(4 * i)) & np.uint32(0xF)) | np.uint32(0x4B000000)).view(np.float32)
                    dot += xv * (nib - np.float32(8388608.0))
            zword = zwords[g, n // 8]  # [threads]
            shift = ((n % 8) * 4)[:, None] + 4 * np.arange(4)[None, :]
            z = ((zword[:, None] >> shift.astype(np.uint32)) & np.uint32(0xF)).astype(np.float32)
            s = sc[g, n[:, None] + np.arange(4)[None, :]]
            acc += s * (dot - z * x_sum)
        partial[split] = acc.reshape(-1)
    return torch.from_numpy(partial)


@pytest.mark.parametrize("K,N,g,groups_per_split", [(64, 40, 16, 1), (256, 96, 128, 1), (192, 24, 32, 4),
                                                    (384, 520, 64, 2)])
def test_cuda_gemv_index_maps_emulated(K, N, g, groups_per_split):
    layer, *_ = layer_tensors(K, N, g, torch.float16, K + N)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(K)).to(torch.float16)
    partial = emulate_int4_gemv_cuda(x, layer.qweight, layer.qzeros, layer.scales, g, groups_per_split)
    reference = int4_matmul_torch(x.float(), layer.qweight, layer.qzeros, layer.scales.float(), g)
    torch.testing.assert_close(partial.sum(0)[None], reference, atol=1e-3 * reference.abs().max().item(),
                               rtol=1e-4)


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
                                 (4096, 4096)])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("split_k", [None, 1, 3])
def test_cuda_split_fits_shared_memory(K, N, g, split_k):
    """The H200 failure (K = 18944, N = 3584, split_k = 1): the K slice of x (float32 in shared memory) must
    fit in 48 KiB whatever split is asked for; no slice may be empty."""
    from miniinfer.kernels.int4_matmul import CUDA_SMEM_BYTES, cuda_split

    groups = K // g
    groups_per_split, splits = cuda_split(N, K, g, 132, split_k)
    assert groups_per_split * g * 4 <= CUDA_SMEM_BYTES
    assert (splits - 1) * groups_per_split < groups <= splits * groups_per_split
