"""Our CUDA flash-attention kernel (csrc/flash_attention.cu, ``flash_attention(backend="cuda")``) on a
CUDA GPU against a float64 oracle.

Run on a CUDA machine: ``python -m pytest -m gpu tests/gpu/test_flash_attention_cuda_gpu.py -q``, or as a
script, ``python tests/gpu/test_flash_attention_cuda_gpu.py`` (through pytest when installed, else the
built-in runner of tests/gpu/standalone.py). The first test builds the extension (about a minute).

Inputs: random bf16/fp16 tensors, head dims 64 and 128, GQA ratios 1, 2, 7 and 8, varlen batches with a
single query, S > L (a cached prefix), S < L (early queries see nothing: zeros), an empty sequence and
sequences of several 64-key tiles with ragged ends; paged K/V through permuted block tables (P 16, 64,
256) with garbage entries past each sequence's end; q as a strided slice of a fused QKV tensor; CUDA
graph capture. The oracle is ``softmax(QKᵀ)V`` in float64 on the same 16-bit inputs, so the tolerances
cover only the kernel's roundings (p rounded to the value dtype before the P·V MMA, the output rounded
to the dtype): bf16 atol = rtol = 1e-2, fp16 2e-3. Inputs are fresh each run (the ``seed`` fixture
prints the seed; replay with ``MINIINFER_TEST_SEED=<seed>``).
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, when run as a script

from standalone import pytest, run_file  # noqa: E402 - pytest itself when installed

from miniinfer.kernels.flash_attention import flash_attention  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {torch.bfloat16: dict(atol=1e-2, rtol=1e-2), torch.float16: dict(atol=2e-3, rtol=2e-3)}
DTYPES = [torch.bfloat16, torch.float16]
SHAPES = [(8, 8, 64), (16, 8, 128), (14, 2, 128), (28, 4, 64), (32, 4, 128)]  # (H, H_kv, D): G = 1, 2, 7, 7, 8
# One query, L == S (odd), S > L, an empty sequence, several tiles, a long prefix + short suffix, S < L.
Q_LENS = [1, 97, 300, 0, 513, 64, 40]
K_LENS = [1, 97, 1000, 5, 513, 1500, 10]


def oracle(q, k, v, causal, scale):
    """q [L, H, D], k, v [S, H_kv, D] -> [L, H, D] float64 (zeros for a query that sees no key)."""
    L, H, _ = q.shape
    S, H_kv = k.shape[0], k.shape[1]
    k, v = (t.double().repeat_interleave(H // H_kv, dim=1) for t in (k, v))
    scores = torch.einsum("lhd,shd->hls", q.double(), k) * scale
    if causal:
        visible = torch.arange(S, device=q.device)[None, :] <= (torch.arange(L, device=q.device) + S - L)[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True).clamp(min=-1e300))
    total = weights.sum(-1, keepdim=True)
    return torch.einsum("hls,shd->lhd", weights / torch.where(total > 0, total, torch.ones_like(total)), v)


def cumulative(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device="cuda")


def make_varlen(q_lens, k_lens, H, H_kv, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), H, D, generator=gen).to(dtype).cuda()
    k = torch.randn(sum(k_lens), H_kv, D, generator=gen).to(dtype).cuda()
    v = torch.randn(sum(k_lens), H_kv, D, generator=gen).to(dtype).cuda()
    return q, k, v, cumulative(q_lens), cumulative(k_lens)


def make_paged(lengths, P, H_kv, D, dtype, seed):
    """Pools [num_blocks, P, H_kv, D] and a permuted int32 block table with garbage past each sequence."""
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


def check(out, q, pieces, cu_q, causal, scale, what):
    assert out.shape == q.shape and out.dtype == q.dtype, what
    assert not torch.isnan(out).any(), f"{what}: NaN in the output"
    cu_q = cu_q.tolist()
    for b, (kb, vb) in enumerate(pieces):
        ref = oracle(q[cu_q[b]:cu_q[b + 1]], kb, vb, causal, scale)
        torch.testing.assert_close(out[cu_q[b]:cu_q[b + 1]].double(), ref, **TOL[q.dtype],
                                   msg=lambda m, b=b: f"{what}, sequence {b}: {m}")


def varlen_pieces(k, v, cu_k):
    cu_k = cu_k.tolist()
    return [(k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]]) for b in range(len(cu_k) - 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,H_kv,D", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_varlen_matches_oracle(dtype, H, H_kv, D, causal, seed):
    q, k, v, cu_q, cu_k = make_varlen(Q_LENS, K_LENS, H, H_kv, D, dtype, seed)
    out = flash_attention(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="cuda")
    check(out, q, varlen_pieces(k, v, cu_k), cu_q, causal, D ** -0.5,
          f"cuda H={H} H_kv={H_kv} D={D} {dtype} causal={causal}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,H_kv,D", SHAPES)
@pytest.mark.parametrize("P", [16, 64, 256])
def test_cuda_paged_matches_oracle(dtype, H, H_kv, D, P, seed):
    prefix, new = [0, 700, 31, 1200, 3], [300, 1, 97, 64, 20]
    lengths = [p + n for p, n in zip(prefix, new)]
    k_pool, v_pool, table = make_paged(lengths, P, H_kv, D, dtype, seed)
    cu_q = cumulative(new)
    q = torch.randn(sum(new), H, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).cuda()
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    for causal in (True, False):
        out = flash_attention(q, k_pool, v_pool, causal=causal, cu_seqlens_q=cu_q, block_table=table,
                              seq_lens=seq_lens, backend="cuda")
        pieces = [(dense(k_pool, table, b, n), dense(v_pool, table, b, n)) for b, n in enumerate(lengths)]
        check(out, q, pieces, cu_q, causal, D ** -0.5, f"cuda paged P={P} H={H} H_kv={H_kv} D={D} {dtype} "
              f"causal={causal}")


@pytest.mark.parametrize("D", [64, 128])
def test_cuda_batched_long_sequence(D, seed):
    """[B, L, H, D] layout, L = S = 2048, G = 4: many full tiles; equals the Triton kernel closely."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2048, 16, D, generator=gen).bfloat16().cuda()
    k = torch.randn(2, 2048, 4, D, generator=gen).bfloat16().cuda()
    v = torch.randn(2, 2048, 4, D, generator=gen).bfloat16().cuda()
    out = flash_attention(q, k, v, backend="cuda")
    assert out.shape == q.shape
    for b in range(2):
        torch.testing.assert_close(out[b].double(), oracle(q[b], k[b], v[b], True, D ** -0.5), **TOL[torch.bfloat16])
    torch.testing.assert_close(out, flash_attention(q, k, v, backend="triton"), atol=1e-2, rtol=1e-2)


def test_cuda_strided_q_from_fused_qkv(seed):
    """q, k, v as column slices of one [T, (H + 2 H_kv) · D] projection (the engine's layout)."""
    H, H_kv, D, dtype = 14, 2, 64, torch.float16
    lengths = [33, 200, 1]
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lengths), (H + 2 * H_kv) * D, generator=gen).to(dtype).cuda()
    q = qkv[:, :H * D].view(-1, H, D)
    k = qkv[:, H * D:(H + H_kv) * D].view(-1, H_kv, D)
    v = qkv[:, (H + H_kv) * D:].view(-1, H_kv, D)
    cu = cumulative(lengths)
    out = flash_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, backend="cuda")
    check(out, q, varlen_pieces(k, v, cu), cu, True, D ** -0.5, "cuda strided qkv")


def test_cuda_scale_and_all_masked_rows(seed):
    """A custom scale; causal S < L: the first L - S queries see no key and come out exactly zero."""
    q, k, v, cu_q, cu_k = make_varlen([100], [30], 4, 4, 128, torch.bfloat16, seed)
    out = flash_attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, scale=0.3, backend="cuda")
    assert torch.all(out[:70] == 0)
    check(out, q, varlen_pieces(k, v, cu_k), cu_q, True, 0.3, "cuda scale=0.3, S < L")


@pytest.mark.parametrize("paged", [False, True])
def test_cuda_in_cuda_graph(paged, seed):
    """With max_seqlen_q given, the call never syncs with the host: it can be captured and replayed."""
    H, H_kv, D, dtype = 14, 2, 128, torch.bfloat16
    q_lens, k_lens = [5, 1, 200], [50, 77, 200]
    q, k, v, cu_q, cu_k = make_varlen(q_lens, k_lens, H, H_kv, D, dtype, seed)
    kwargs = dict(cu_seqlens_q=cu_q, backend="cuda", max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens))
    if paged:
        k, v, table = make_paged(k_lens, 16, H_kv, D, dtype, seed)
        kwargs.update(block_table=table, seq_lens=torch.tensor(k_lens, dtype=torch.int32, device="cuda"))
    else:
        kwargs.update(cu_seqlens_k=cu_k)
    eager = flash_attention(q, k, v, **kwargs)  # builds the extension and sets the kernel's attributes
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = flash_attention(q, k, v, **kwargs)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, flash_attention(q, k, v, **kwargs))
    assert not torch.equal(captured, eager)


def test_cuda_is_deterministic(seed):
    q, k, v, cu_q, cu_k = make_varlen([300, 77], [900, 77], 16, 2, 128, torch.bfloat16, seed)
    first = flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="cuda")
    assert torch.equal(first, flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="cuda"))


if __name__ == "__main__":
    run_file(__file__, globals())
