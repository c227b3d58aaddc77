"""Paged attention kernels on a CUDA GPU: the CUDA and Triton kernels against the torch reference.

Run on a CUDA machine: ``python -m pytest -m gpu tests/gpu -q``.

Inputs: random caches, shuffled non-contiguous block tables with garbage (-1, stale ids) past each
sequence's end, odd lengths (1, P - 1, P, P + 1, a few hundred, several partitions' worth), GQA
ratios 1, 2, 7, 16 (MQA) and 18 (> 16 query heads per KV head: the CUDA kernel's head chunks).
Outputs are poisoned with NaN before each run. The reference runs in float32 on the same 16-bit
inputs upcast, so the tolerances only cover the kernels' own roundings: p rounded to the value dtype
before the p @ v MMA (2^-9 relative for bf16, 2^-11 for fp16) and the output rounded to the dtype:
bf16 atol = rtol = 1e-2 (~2.5 bf16 ulps), fp16 atol = rtol = 2e-3.

Inputs are fresh each run (the ``seed`` fixture of tests/conftest.py prints the seed; replay with
``MINIINFER_TEST_SEED=<seed>``). Also runs as a script, ``python tests/gpu/test_paged_attention_gpu.py``:
through pytest when it is installed, else through a small built-in runner (the GPU image may have no
pytest), which draws one seed for the whole run.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, when run as a script

from standalone import pytest, run_file  # noqa: E402 - pytest itself when installed

from miniinfer.kernels.paged_attention import (  # noqa: E402
    paged_decode_attention,
    paged_decode_attention_cuda,
    paged_decode_attention_torch,
    paged_decode_attention_triton,
    paged_prefill_attention_torch,
    paged_prefill_attention_triton,
    write_kv,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {torch.bfloat16: dict(atol=1e-2, rtol=1e-2), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.float32: dict(atol=1e-4, rtol=1e-4)}
SHAPES = [(14, 2, 64), (28, 4, 128), (8, 8, 64), (16, 1, 128), (36, 2, 64)]  # (H, H_kv, D)


def make_paged(lengths, P, H_kv, D, dtype, seed=0):
    """Random paged cache on the GPU: (k_cache, v_cache [num_blocks, P, H_kv, D], block_tables int32)."""
    gen = torch.Generator().manual_seed(seed)
    needed = [math.ceil(n / P) for n in lengths]
    num_blocks = sum(needed) + 7
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(needed) + 3
    tables, cursor = [], 0
    for b, n in enumerate(needed):
        row = perm[cursor:cursor + n]
        cursor += n
        if b == 1 and len(lengths) > 1:  # share the first sequence's full blocks (a common prefix)
            shared = min(lengths[0] // P, n - 1)
            row = tables[0][:shared] + row[shared:]
        tables.append(row + [-1 if i % 2 else num_blocks + 99 for i in range(max_blocks - n)])
    k_cache = torch.randn(num_blocks, P, H_kv, D, generator=gen).to(dtype).cuda()
    v_cache = torch.randn(num_blocks, P, H_kv, D, generator=gen).to(dtype).cuda()
    return k_cache, v_cache, torch.tensor(tables, dtype=torch.int32, device="cuda")


def lengths_for(P):
    return [1, max(1, P - 1), P, P + 1, 333, 1500, 4100]


def reference(q, k_cache, v_cache, tables, seq_lens, scale):
    return paged_decode_attention_torch(q.float(), k_cache, v_cache, tables, seq_lens, scale)  # fp32 math


def check(out, ref, dtype, what):
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (unwritten elements?)"
    err = float((out.float() - ref).norm() / ref.norm())
    torch.testing.assert_close(out.float(), ref, **TOL[dtype], msg=lambda m: f"{what} (rel err {err:.2e}): {m}")


def decode_case(P, H, H_kv, D, dtype, seed=0):
    lengths = lengths_for(P)
    k_cache, v_cache, tables = make_paged(lengths, P, H_kv, D, dtype, seed)
    q = torch.randn(len(lengths), H, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).cuda()
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    return q, k_cache, v_cache, tables, seq_lens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("P", [1, 16, 64])
@pytest.mark.parametrize("H,H_kv,D", SHAPES)
def test_cuda_decode_matches_reference(H, H_kv, D, P, dtype, seed):
    q, k_cache, v_cache, tables, seq_lens = decode_case(P, H, H_kv, D, dtype, seed=seed)
    ref = reference(q, k_cache, v_cache, tables, seq_lens, D ** -0.5)
    out = paged_decode_attention_cuda(q, k_cache, v_cache, tables, seq_lens, D ** -0.5,
                                      out=torch.full_like(q, float("nan")))
    check(out, ref, dtype, f"cuda H={H} H_kv={H_kv} D={D} P={P} {dtype}")


@pytest.mark.parametrize("partition_size", [16, 64, 256, 1024])
def test_cuda_decode_partition_sizes(partition_size, seed):
    q, k_cache, v_cache, tables, seq_lens = decode_case(16, 14, 2, 64, torch.bfloat16, seed=seed)
    ref = reference(q, k_cache, v_cache, tables, seq_lens, 0.125)
    out = paged_decode_attention_cuda(q, k_cache, v_cache, tables, seq_lens, 0.125, max_seq_len=4100,
                                      partition_size=partition_size, out=torch.full_like(q, float("nan")))
    check(out, ref, torch.bfloat16, f"cuda partition_size={partition_size}")


def test_cuda_decode_deterministic_counters_reset_and_zero_length(seed):
    """Same inputs, same bits (the split-KV combine has a fixed order); interleaving launches of other
    shapes checks that the kernel leaves its counters at zero; a length-0 row gives zeros."""
    q, k_cache, v_cache, tables, seq_lens = decode_case(16, 28, 4, 128, torch.bfloat16, seed=seed)
    first = paged_decode_attention_cuda(q, k_cache, v_cache, tables, seq_lens, 0.1, partition_size=64)
    other = decode_case(64, 14, 2, 64, torch.bfloat16, seed=seed + 2)
    for _ in range(3):
        paged_decode_attention_cuda(*other, 0.1, partition_size=32)
        again = paged_decode_attention_cuda(q, k_cache, v_cache, tables, seq_lens, 0.1, partition_size=64)
        assert torch.equal(first, again)
    check(first, reference(q, k_cache, v_cache, tables, seq_lens, 0.1), torch.bfloat16, "cuda after reuse")
    zero = seq_lens.clone()
    zero[2] = 0
    out = paged_decode_attention_cuda(q, k_cache, v_cache, tables, zero, 0.1, out=torch.full_like(q, float("nan")))
    assert torch.all(out[2] == 0)
    check(out, reference(q, k_cache, v_cache, tables, zero, 0.1), torch.bfloat16, "cuda with a length-0 row")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_decode_in_cuda_graph(backend, seed):
    """Capture once, then change q and the lengths in place and replay: the engine's decode pattern."""
    q, k_cache, v_cache, tables, seq_lens = decode_case(16, 14, 2, 64, torch.bfloat16, seed=seed)
    fn = paged_decode_attention_cuda if backend == "cuda" else paged_decode_attention_triton
    out = torch.empty_like(q)
    for _ in range(2):  # warm up outside the graph (build, compile, allocate the counters)
        fn(q, k_cache, v_cache, tables, seq_lens, 0.125, max_seq_len=4100, out=out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(q, k_cache, v_cache, tables, seq_lens, 0.125, max_seq_len=4100, out=out)
    for step in range(3):
        q.copy_(torch.randn_like(q))
        seq_lens.copy_(torch.clamp(seq_lens - 7 * step, min=1))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(out, reference(q, k_cache, v_cache, tables, seq_lens, 0.125), torch.bfloat16, f"{backend} graph {step}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("P", [1, 16, 64])
@pytest.mark.parametrize("H,H_kv,D", [(14, 2, 64), (28, 4, 128)])
def test_triton_decode_matches_reference(H, H_kv, D, P, dtype, seed):
    q, k_cache, v_cache, tables, seq_lens = decode_case(P, H, H_kv, D, dtype, seed=seed)
    ref = reference(q, k_cache, v_cache, tables, seq_lens, D ** -0.5)
    out = paged_decode_attention_triton(q, k_cache, v_cache, tables, seq_lens, D ** -0.5,
                                        out=torch.full_like(q, float("nan")))
    check(out, ref, dtype, f"triton H={H} H_kv={H_kv} D={D} P={P} {dtype}")


def test_triton_decode_float32_and_odd_head_dim(seed):
    q, k_cache, v_cache, tables, seq_lens = decode_case(16, 12, 4, 80, torch.float32, seed=seed)
    out = paged_decode_attention_triton(q, k_cache, v_cache, tables, seq_lens, 0.1,
                                        out=torch.full_like(q, float("nan")))
    check(out, reference(q, k_cache, v_cache, tables, seq_lens, 0.1), torch.float32, "triton fp32 D=80")


def test_auto_backend_uses_cuda_for_bf16(seed):
    q, k_cache, v_cache, tables, seq_lens = decode_case(16, 14, 2, 64, torch.bfloat16, seed=seed)
    auto = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.125)
    cuda = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.125, backend="cuda")
    assert torch.equal(auto, cuda)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("P", [1, 16])
@pytest.mark.parametrize("H,H_kv,D", [(14, 2, 64), (28, 4, 128)])
def test_triton_prefill_matches_reference(H, H_kv, D, P, dtype, seed):
    prefix = [0, 300, 0, 17, 1000, 64]  # cached prefix lengths, incl. 0 (plain prefill)
    new = [150, 1, 0, 1, 333, 64]       # decode rows (1), an empty row, multi-tile suffixes
    lengths = [p + n for p, n in zip(prefix, new)]
    k_cache, v_cache, tables = make_paged([max(1, n) for n in lengths], P, H_kv, D, dtype, seed=seed)
    cu = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q = torch.randn(int(cu[-1]), H, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).cuda()
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    ref = paged_prefill_attention_torch(q.float(), k_cache, v_cache, tables, cu, seq_lens, D ** -0.5)
    out = paged_prefill_attention_triton(q, k_cache, v_cache, tables, cu, seq_lens, D ** -0.5,
                                         out=torch.full_like(q, float("nan")))
    check(out, ref, dtype, f"triton prefill H={H} H_kv={H_kv} D={D} P={P} {dtype}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_write_kv_gpu(backend, seed):
    k_cache = torch.randn(6, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    k, v = torch.randn(5, 2, 64, device="cuda"), torch.randn(5, 2, 64, device="cuda")
    slots = torch.tensor([3, -1, 95, 17, -1], device="cuda")
    want_k, want_v = k_cache.clone().view(-1, 2, 64), v_cache.clone().view(-1, 2, 64)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s], want_v[s] = k[t].bfloat16(), v[t].bfloat16()
    write_kv(k, v, k_cache, v_cache, slots, backend=backend)
    assert torch.equal(k_cache.view(-1, 2, 64), want_k) and torch.equal(v_cache.view(-1, 2, 64), want_v)


if __name__ == "__main__":
    run_file(__file__, globals())
