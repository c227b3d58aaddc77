"""Quantization on a CUDA GPU: our int4 kernels (Triton and CUDA, M = 1 … 16) against the torch
reference in fp16/bf16 on odd shapes and group sizes, inside a CUDA graph; W8A8 through torch._int_mm and
FP8 through torch._scaled_mm against their float emulations; the quantized bundled model in the engine.

    python -m pytest -m gpu tests/gpu/test_quant_gpu.py -q

Tolerances: the kernels and the reference multiply the same fp16/bf16-rounded weights and accumulate
in float32 in different orders; outputs are rounded once to the storage dtype: one or two ulps of it
relative to the output's scale (bf16 2^-7, fp16 2^-10, times a few for the summation order).
"""

from __future__ import annotations

import pytest
import torch

from miniinfer.quant import FP8Linear, GroupQuantLinear, W8A8Linear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}
SHAPES = [(1, 4096, 4096, 128), (1, 8192, 8192, 128), (1, 3584, 4608, 128), (1, 96, 40, 32), (1, 448, 104, 64),
          (3, 384, 200, 128), (16, 1024, 520, 32), (1, 18944, 3584, 128), (13, 2048, 2048, 128),
          # the benchmark's shapes: the H200 fault (M = 16, 8192², g128: the last K split had whole tiles
          # past K that read scales/zeros row G) and Qwen2.5-7B's four matmuls (qkv, o, gate_up, down)
          (16, 8192, 8192, 128),
          *[(m, k, n, 128) for m in (1, 16) for k, n in ((3584, 4608), (3584, 3584), (3584, 37888), (18944, 3584))]]
SHAPES = list(dict.fromkeys(SHAPES))


def layer_tensors(K, N, g, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (K, N), generator=gen)
    zeros = torch.randint(0, 16, (K // g, N), generator=gen)
    scales = (torch.rand(K // g, N, generator=gen) * 0.02 + 0.001).to(dtype)
    return GroupQuantLinear(q, scales, zeros, 4, g).cuda()


def guarded(t, fill, rows=2):
    big = torch.full((t.shape[0] + rows, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    big[: t.shape[0]] = t
    return big[: t.shape[0]]


def close(got, reference, dtype):
    assert torch.isfinite(got).all(), "non-finite output (a read past the end of scales/qzeros?)"
    scale = reference.abs().max().item()
    err = (got.float() - reference.float()).abs().max().item()
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} > {TOL[dtype]} x {scale:.3g}"


@pytest.mark.parametrize("M,K,N,g", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_int4_matmul(M, K, N, g, dtype):
    from miniinfer.kernels.int4_matmul import int4_matmul_torch, int4_matmul_triton

    layer = layer_tensors(K, N, g, dtype, K + N)
    x = torch.randn(M, K, device="cuda").to(dtype)
    reference = int4_matmul_torch(x.float(), layer.qweight, layer.qzeros, layer.scales.float(), g)
    # scales / qzeros as the first rows of bigger tensors whose extra rows are NaN / junk: a kernel that
    # reads a group past the end shows NaN here instead of passing by luck (or faulting later).
    got = int4_matmul_triton(x, layer.qweight, guarded(layer.qzeros, -1), guarded(layer.scales, float("nan")), g)
    assert got.dtype == dtype and got.shape == (M, N)
    close(got, reference, dtype)
    torch.cuda.synchronize()


@pytest.mark.parametrize("M,K,N,g", [s for s in SHAPES if s[2] % 8 == 0] + [(8, 448, 104, 64), (9, 384, 200, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_int4_kernel(M, K, N, g, dtype):
    """Our CUDA kernel, M = 1 … 16 (one and two token tiles), without and with K split across CTAs."""
    from miniinfer.kernels.int4_matmul import (
        CUDA_SHAPES,
        _split_counters,
        int4_gemv_cuda,
        int4_matmul_torch,
        tile_int4_weight,
    )

    layer = layer_tensors(K, N, g, dtype, K * 3 + N)
    x = torch.randn(M, K, device="cuda").to(dtype)
    reference = int4_matmul_torch(x.float(), layer.qweight, layer.qzeros, layer.scales.float(), g)
    tiled = tile_int4_weight(layer.qweight) if N % 32 == 0 else None
    for shape in CUDA_SHAPES:  # every CTA shape the launcher has
        qweight = tiled if CUDA_SHAPES[shape][4] else layer.qweight
        if qweight is None:  # the tiled layout needs whole 32-column blocks
            continue
        for split_k in (None, 1, 3):
            got = int4_gemv_cuda(x, qweight, guarded(layer.qzeros, -1), guarded(layer.scales, float("nan")),
                                 g, split_k=split_k, shape=shape)
            assert got.dtype == dtype and got.shape == (M, N), (shape, split_k)
            close(got, reference, dtype)
    torch.cuda.synchronize()
    # every launch leaves the split-K tickets at zero for the next one
    assert int(_split_counters(x.device, 1).abs().sum()) == 0


def test_cuda_int4_kernel_is_deterministic_and_exact_on_integers():
    """Split K adds the slices' float32 sums in a fixed order: the same bits on every run. With integer
    x, q − z and scales 1 every product and partial sum is an exact integer: the result must be exact."""
    from miniinfer.kernels.int4_matmul import int4_gemv_cuda

    K, N, g = 1024, 1024, 128
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(0, 16, (K, N), generator=gen)
    zeros = torch.randint(0, 16, (K // g, N), generator=gen)
    layer = GroupQuantLinear(q, torch.ones(K // g, N, dtype=torch.float16), zeros, 4, g).cuda()
    x = torch.randint(-1, 2, (5, K), generator=gen).to(torch.float16).cuda()
    w = (q - zeros.repeat_interleave(g, 0)).double()
    exact = (x.double().cpu() @ w)
    assert exact.abs().max() < 2048  # fp16 holds every integer up to 2048 exactly
    runs = [int4_gemv_cuda(x, layer.qweight, layer.qzeros, layer.scales, g, split_k=4) for _ in range(3)]
    for got in runs:
        assert torch.equal(got, runs[0])
        assert torch.equal(got.double().cpu(), exact)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_int4_in_a_cuda_graph(backend):
    from miniinfer.kernels.int4_matmul import int4_matmul, int4_matmul_torch

    dtype = torch.bfloat16
    layer = layer_tensors(2048, 1024, 128, dtype, 1)
    x = torch.randn(1, 2048, device="cuda", dtype=dtype)
    out = int4_matmul(x, layer.qweight, layer.qzeros, layer.scales, 128, backend=backend)  # warm-up / build
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = int4_matmul(x, layer.qweight, layer.qzeros, layer.scales, 128, backend=backend)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    close(out, int4_matmul_torch(x.float(), layer.qweight, layer.qzeros, layer.scales.float(), 128), dtype)


@pytest.mark.parametrize("split_k", [1, 4])
@pytest.mark.parametrize("shape", [0, 13, 8, 18])
def test_programmatic_dependent_launch_waits_for_its_input(shape, split_k):
    """pdl=True lets each call start streaming its weights before the previous kernel is done; it must still
    read x only once that kernel has written it. A chain y_{i+1} = f(y_i) of square layers in one CUDA graph
    (each call's input is the previous call's output; one elementwise kernel in the middle) gives
    the same bits with and without pdl, and the reference's values; so do split-K tickets reused back to
    back. The register double buffer, the tiled layout, the cp.async ring and the rolling queue each place
    the wait in their own prologue."""
    from miniinfer.kernels.int4_matmul import CUDA_SHAPES, _supports_pdl, int4_gemv_cuda, tile_int4_weight

    if not _supports_pdl(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs sm_90")
    dtype, K, g = torch.float16, 2048, 128
    layers = [layer_tensors(K, K, g, dtype, 40 + i) for i in range(3)]
    weights = [tile_int4_weight(layer.qweight) if CUDA_SHAPES[shape][4] else layer.qweight for layer in layers]

    def chain(x, pdl):
        y = x
        for i in range(6):
            layer = layers[i % 3]
            y = int4_gemv_cuda(y, weights[i % 3], layer.qzeros, layer.scales, g, split_k=split_k, shape=shape,
                               pdl=pdl)
            if i == 2:  # keep values in fp16's range; the other calls follow each other directly
                y = y / y.abs().amax().clamp_min(1e-3)
        return y

    x = torch.randn(1, K, device="cuda", dtype=dtype)
    results = {}
    for pdl in (False, True):
        chain(x, pdl)  # build, allocate
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(x, pdl)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        results[pdl] = out.clone()
        eager = chain(x, pdl)
        torch.cuda.synchronize()
        assert torch.equal(eager, results[pdl]), pdl
    assert torch.equal(results[True], results[False])
    from miniinfer.kernels.int4_matmul import int4_matmul_torch

    y = x.float()
    for i in range(6):
        layer = layers[i % 3]
        y = int4_matmul_torch(y.to(dtype).float(), layer.qweight, layer.qzeros, layer.scales.float(), g)
        y = y.to(dtype).float()
        if i == 2:
            y = y / y.abs().amax().clamp_min(1e-3)
    close(results[True], y, torch.bfloat16)  # six layers of fp16 rounding: the looser bf16 tolerance


def test_w8a8_int_mm_matches_emulation():
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 520, bias=True).cuda()
    layer = W8A8Linear.from_linear(linear)
    for M in (1, 5, 17, 64):
        x = torch.randn(M, 1024, device="cuda", dtype=torch.bfloat16)
        got = layer(x)
        layer_cpu = W8A8Linear.from_linear(linear.cpu())
        linear.cuda()
        expected = layer_cpu(x.float().cpu())
        close(got.cpu(), expected, torch.bfloat16)


def test_fp8_scaled_mm_matches_emulation():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmul needs sm_89+")
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 512, bias=False).cuda()
    layer = FP8Linear.from_linear(linear)
    x = torch.randn(32, 1024, device="cuda", dtype=torch.bfloat16)
    got = layer(x)  # torch._scaled_mm
    qx, sx = layer._activation(x)
    expected = (qx.float() * sx) @ layer.dequantized_weight().t()
    close(got, expected, torch.bfloat16)


@pytest.mark.parametrize("quantization", ["int8", "w8a8", "int4", "fp8", "gptq"])
def test_engine_generates_with_quantization(quantization):
    from miniinfer import LLM, SamplingParams

    llm = LLM(device="cuda", dtype=torch.bfloat16, quantization=quantization, max_num_seqs=4)
    outs = llm.generate(["ROMEO:", "KING:"], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)
    assert all(len(o.token_ids) == 24 for o in outs)
    print(quantization, repr(outs[0].text[:60]))


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from standalone import run_file

    run_file(__file__, globals())
