"""Flash attention on a CUDA GPU: the Triton kernel (and flash-attn, when installed) against a float64 oracle.

Run on a CUDA machine: ``python -m pytest -m gpu tests/gpu/test_flash_attention_gpu.py -q``, or as a
script, ``python tests/gpu/test_flash_attention_gpu.py`` (through pytest when installed, else a small
built-in runner that draws one seed for the whole run).

Inputs: random bf16/fp16 tensors, head dims 64 and 128, GQA ratios 1, 2, 7 and 8, varlen batches with a
single query, S > L (a cached prefix), an empty sequence and sequences longer than several tiles; paged
K/V through shuffled block tables with garbage past each sequence's end. The oracle is plain
``softmax(QKᵀ)V`` in float64 on the same 16-bit inputs, so the tolerances cover only the kernels' own
roundings: p rounded to the value dtype before the p @ v MMA (2^-9 relative for bf16, 2^-11 for fp16)
and the output rounded to the dtype: bf16 atol = rtol = 1e-2, fp16 atol = rtol = 2e-3 (as the paged
attention GPU tests). Inputs are fresh each run (the ``seed`` fixture of tests/conftest.py prints the
seed; replay with ``MINIINFER_TEST_SEED=<seed>``).
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, when run as a script

from standalone import pytest, run_file  # noqa: E402 - pytest itself when installed

from miniinfer.kernels.flash_attention import flash_attention, flash_attn_library  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {torch.bfloat16: dict(atol=1e-2, rtol=1e-2), torch.float16: dict(atol=2e-3, rtol=2e-3)}
DTYPES = [torch.bfloat16, torch.float16]
SHAPES = [(8, 8, 64), (14, 2, 128), (28, 4, 64), (32, 4, 128)]  # (H, H_kv, D): G = 1, 7, 7, 8
GQA_2 = (16, 8, 128)  # G = 2
# One query, L == S, S > L, an empty sequence, several tiles, a long prefix with a short suffix.
Q_LENS = [1, 97, 300, 0, 513, 64]
K_LENS = [1, 97, 1000, 5, 513, 1500]


def oracle(q, k, v, causal, scale):
    """q [L, H, D], k, v [S, H_kv, D] -> [L, H, D] float64 (zeros for a query that sees no key)."""
    L, H, _ = q.shape
    S, H_kv = k.shape[0], k.shape[1]
    k = k.double().repeat_interleave(H // H_kv, dim=1)
    v = v.double().repeat_interleave(H // H_kv, dim=1)
    scores = torch.einsum("lhd,shd->hls", q.double(), k) * scale
    if causal:
        visible = (torch.arange(S, device=q.device)[None, :]
                   <= (torch.arange(L, device=q.device) + S - L)[:, None])
        scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True).clamp(min=-1e300))
    total = weights.sum(-1, keepdim=True)
    return torch.einsum("hls,shd->lhd", weights / torch.where(total > 0, total, torch.ones_like(total)), v)


def cumulative(lengths):
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device="cuda")


def make_varlen(q_lens, k_lens, H, H_kv, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), H, D, generator=gen).to(dtype).cuda()
    k = torch.randn(sum(k_lens), H_kv, D, generator=gen).to(dtype).cuda()
    v = torch.randn(sum(k_lens), H_kv, D, generator=gen).to(dtype).cuda()
    return q, k, v, cumulative(q_lens), cumulative(k_lens)


def make_paged(lengths, P, H_kv, D, dtype, seed):
    """Pools [num_blocks, P, H_kv, D] and a shuffled int32 block table with garbage past each sequence."""
    gen = torch.Generator().manual_seed(seed)
    needed = [math.ceil(n / P) for n in lengths]
    num_blocks = sum(needed) + 5
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(needed) + 2
    tables, cursor = [], 0
    for n in needed:
        tables.append(perm[cursor:cursor + n] + [-1 if j % 2 else num_blocks + 999 for j in range(width - n)])
        cursor += n
    k_pool = torch.randn(num_blocks, P, H_kv, D, generator=gen).to(dtype).cuda()
    v_pool = torch.randn(num_blocks, P, H_kv, D, generator=gen).to(dtype).cuda()
    return k_pool, v_pool, torch.tensor(tables, dtype=torch.int32, device="cuda")


def dense(pool, table, b, length):
    P = pool.shape[1]
    pos = torch.arange(length, device=pool.device)
    return pool[table[b].long()[pos // P], pos % P]


def check_varlen(out, q, k, v, cu_q, cu_k, causal, scale, what):
    assert out.shape == q.shape and out.dtype == q.dtype, what
    assert not torch.isnan(out).any(), f"{what}: NaN in the output"
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cu_q) - 1):
        ref = oracle(q[cu_q[b]:cu_q[b + 1]], k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]], causal, scale)
        torch.testing.assert_close(out[cu_q[b]:cu_q[b + 1]].double(), ref, **TOL[q.dtype],
                                   msg=lambda m, b=b: f"{what}, sequence {b}: {m}")


def check_paged(out, q, k_pool, v_pool, table, cu_q, lengths, causal, scale, what):
    assert out.shape == q.shape and not torch.isnan(out).any(), what
    cu_q = cu_q.tolist()
    for b, n in enumerate(lengths):
        ref = oracle(q[cu_q[b]:cu_q[b + 1]], dense(k_pool, table, b, n), dense(v_pool, table, b, n), causal, scale)
        torch.testing.assert_close(out[cu_q[b]:cu_q[b + 1]].double(), ref, **TOL[q.dtype],
                                   msg=lambda m, b=b: f"{what}, sequence {b}: {m}")


# ------------------------------------------------------------------------------------------------
# Triton
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,H_kv,D", SHAPES + [GQA_2])
@pytest.mark.parametrize("causal", [True, False])
def test_triton_varlen_matches_oracle(dtype, H, H_kv, D, causal, seed):
    q, k, v, cu_q, cu_k = make_varlen(Q_LENS, K_LENS, H, H_kv, D, dtype, seed)
    out = flash_attention(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="triton")
    check_varlen(out, q, k, v, cu_q, cu_k, causal, D ** -0.5, f"triton H={H} H_kv={H_kv} D={D} {dtype} causal={causal}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,H_kv,D", SHAPES)
@pytest.mark.parametrize("P", [16, 64, 256])
def test_triton_paged_matches_oracle(dtype, H, H_kv, D, P, seed):
    prefix, new = [0, 700, 31, 1200], [300, 1, 97, 64]
    lengths = [p + n for p, n in zip(prefix, new)]
    k_pool, v_pool, table = make_paged(lengths, P, H_kv, D, dtype, seed)
    cu_q = cumulative(new)
    q = torch.randn(sum(new), H, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).cuda()
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    out = flash_attention(q, k_pool, v_pool, cu_seqlens_q=cu_q, block_table=table, seq_lens=seq_lens,
                          backend="triton")
    check_paged(out, q, k_pool, v_pool, table, cu_q, lengths, True, D ** -0.5, f"triton paged P={P} D={D} {dtype}")


def test_triton_batched_long_sequence(seed):
    """[B, L, H, D] layout, L = S = 2048, D = 128, G = 4; auto picks Triton on CUDA."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2048, 32, 128, generator=gen).bfloat16().cuda()
    k = torch.randn(2, 2048, 8, 128, generator=gen).bfloat16().cuda()
    v = torch.randn(2, 2048, 8, 128, generator=gen).bfloat16().cuda()
    out = flash_attention(q, k, v)
    assert out.shape == q.shape
    assert torch.equal(out, flash_attention(q, k, v, backend="triton"))
    for b in range(2):
        torch.testing.assert_close(out[b].double(), oracle(q[b], k[b], v[b], True, 128 ** -0.5),
                                   **TOL[torch.bfloat16])


@pytest.mark.parametrize("paged", [False, True])
def test_triton_in_cuda_graph(paged, seed):
    """With max_seqlen_q/k given, the call never syncs with the host: it can be captured and replayed."""
    H, H_kv, D, dtype = 14, 2, 128, torch.bfloat16
    q_lens, k_lens = [5, 1, 200], [50, 77, 200]
    q, k, v, cu_q, cu_k = make_varlen(q_lens, k_lens, H, H_kv, D, dtype, seed)
    kwargs = dict(cu_seqlens_q=cu_q, backend="triton", max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens))
    if paged:
        k, v, table = make_paged(k_lens, 16, H_kv, D, dtype, seed)
        kwargs.update(block_table=table, seq_lens=torch.tensor(k_lens, dtype=torch.int32, device="cuda"))
    else:
        kwargs.update(cu_seqlens_k=cu_k)
    eager = flash_attention(q, k, v, **kwargs)  # compiles the kernel outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = flash_attention(q, k, v, **kwargs)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, flash_attention(q, k, v, **kwargs))
    assert not torch.equal(captured, eager)


# ------------------------------------------------------------------------------------------------
# flash-attn (FA4 or FA2), when installed
# ------------------------------------------------------------------------------------------------

def _needs_flash_attn():
    if flash_attn_library() is None:
        pytest.skip("flash-attn is not installed (pip install flash-attn-4)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,H_kv,D", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attn_varlen_matches_oracle(dtype, H, H_kv, D, causal, seed):
    _needs_flash_attn()
    q, k, v, cu_q, cu_k = make_varlen(Q_LENS, K_LENS, H, H_kv, D, dtype, seed)
    out = flash_attention(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="flash_attn",
                          max_seqlen_q=max(Q_LENS), max_seqlen_k=max(K_LENS))
    check_varlen(out, q, k, v, cu_q, cu_k, causal, D ** -0.5, f"flash_attn H={H} H_kv={H_kv} D={D} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P", [128, 256])
def test_flash_attn_paged_matches_oracle(dtype, P, seed):
    _needs_flash_attn()
    if flash_attn_library()[0] == "fa2" and P % 256:
        pytest.skip("FA2's paged KV needs a block size divisible by 256")
    H, H_kv, D = 28, 4, 128
    prefix, new = [0, 700, 31, 1200], [300, 1, 97, 64]
    lengths = [p + n for p, n in zip(prefix, new)]
    k_pool, v_pool, table = make_paged(lengths, P, H_kv, D, dtype, seed)
    cu_q = cumulative(new)
    q = torch.randn(sum(new), H, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).cuda()
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    table = table.clamp(min=0, max=k_pool.shape[0] - 1)  # flash-attn may read whole pages of the table
    out = flash_attention(q, k_pool, v_pool, cu_seqlens_q=cu_q, block_table=table, seq_lens=seq_lens,
                          backend="flash_attn", max_seqlen_q=max(new), max_seqlen_k=max(lengths))
    check_paged(out, q, k_pool, v_pool, table, cu_q, lengths, True, D ** -0.5, f"flash_attn paged P={P} {dtype}")


if __name__ == "__main__":
    run_file(__file__, globals())
