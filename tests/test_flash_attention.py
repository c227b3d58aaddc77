"""Flash attention on the CPU: every backend available here (the torch tiled reference; Triton under
TRITON_INTERPRET=1, float32) against a float64 oracle, plus the online-softmax pieces of chapter 09.

The oracle is the definition, written out: ``softmax(q·kᵀ·scale)·v`` in float64 over one sequence, the
KV heads repeated for GQA, query i at position ``S - L + i`` seeing keys ``0 .. S - L + i`` when causal,
and zeros for a query that sees no key. Inputs are random (fresh each run; the ``seed`` fixture of
conftest.py prints the seed, replay with ``MINIINFER_TEST_SEED=<seed>``), with odd lengths: a sequence of
one query, sequences with S > L (a cached prefix), an empty one, GQA ratios 1, 2, 7 and 8, and paged K/V
read through shuffled block tables that share blocks and hold garbage past each sequence's end.

Tolerances: float32 math against float64 over at most ~100 keys is ~1e-6 relative; allow 2e-5.
Shapes stay small: the interpreter runs every program in NumPy.
"""

from __future__ import annotations

import math

import pytest
import torch

import miniinfer.kernels.flash_attention as fa_module
from miniinfer.kernels import triton_available
from miniinfer.kernels.flash_attention import flash_attention, flash_attn_library
from miniinfer.kernels.online_softmax import (
    blocked_attention,
    causal_tile_range,
    merge_partials,
    tile_needs_mask,
)

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
TOL = dict(atol=2e-5, rtol=2e-5)
GQA = [(4, 4), (4, 2), (14, 2), (8, 1)]  # (H, H_kv): G = 1, 2, 7, 8


# ------------------------------------------------------------------------------------------------
# The float64 oracle and random inputs
# ------------------------------------------------------------------------------------------------

def oracle(q, k, v, causal, scale):
    """q [L, H, D], k, v [S, H_kv, D] -> [L, H, D] float64: plain softmax(QKᵀ)V with the mask."""
    L, H, _ = q.shape
    S, H_kv = k.shape[0], k.shape[1]
    k = k.double().repeat_interleave(H // H_kv, dim=1)  # query head h reads KV head h // G
    v = v.double().repeat_interleave(H // H_kv, dim=1)
    scores = torch.einsum("lhd,shd->hls", q.double(), k) * scale  # [H, L, S]
    if causal:
        visible = torch.arange(S)[None, :] <= (torch.arange(L) + S - L)[:, None]  # [L, S]
    else:
        visible = torch.ones(L, S, dtype=torch.bool)
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True).clamp(min=-1e300))  # all masked: exp(-inf) = 0
    total = weights.sum(-1, keepdim=True)
    weights = weights / torch.where(total > 0, total, torch.ones_like(total))  # a query seeing nothing: zeros
    return torch.einsum("hls,shd->lhd", weights, v)


def cumulative(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def make_varlen(q_lens, k_lens, H, H_kv, D, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), H, D, generator=gen)
    k = torch.randn(sum(k_lens), H_kv, D, generator=gen)
    v = torch.randn(sum(k_lens), H_kv, D, generator=gen)
    return q, k, v, cumulative(q_lens), cumulative(k_lens)


def make_paged(lengths, P, H_kv, D, seed, share=True):
    """Pools [num_blocks, P, H_kv, D] and a shuffled block table [B, M] int32; when ``share`` sequence 1
    shares sequence 0's full blocks (a common prefix); entries past a sequence's blocks are garbage."""
    gen = torch.Generator().manual_seed(seed)
    needed = [math.ceil(n / P) for n in lengths]
    num_blocks = sum(needed) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(needed) + 2
    tables, cursor = [], 0
    for b, n in enumerate(needed):
        row = perm[cursor:cursor + n]
        cursor += n
        if b == 1 and share:
            shared = min(lengths[0] // P, n - 1)
            row = tables[0][:shared] + row[shared:]
        tables.append(row + [-1 if j % 2 else num_blocks + 999 for j in range(width - n)])
    k_pool = torch.randn(num_blocks, P, H_kv, D, generator=gen)
    v_pool = torch.randn(num_blocks, P, H_kv, D, generator=gen)
    return k_pool, v_pool, torch.tensor(tables, dtype=torch.int32)


def dense(pool, table, b, length):
    """The oracle's gather, per token: position pos is at block table[b, pos // P], offset pos % P."""
    P = pool.shape[1]
    pos = torch.arange(length)
    return pool[table[b].long()[pos // P], pos % P]  # [length, H_kv, D]


def check_varlen(out, q, k, v, cu_q, cu_k, causal, scale, what):
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any(), f"{what}: NaN in the output"
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        ref = oracle(q[q0:q1], k[k0:k1], v[k0:k1], causal, scale)
        torch.testing.assert_close(out[q0:q1].double(), ref, **TOL, msg=lambda m, b=b: f"{what}, sequence {b}: {m}")


# ------------------------------------------------------------------------------------------------
# Backends against the oracle
# ------------------------------------------------------------------------------------------------

# A single query, L == S, S > L (a cached prefix of 37), an empty sequence, lengths across tile edges.
Q_LENS = [1, 17, 33, 0, 5]
K_LENS = [1, 17, 70, 3, 12]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("H,H_kv", GQA)
def test_varlen_matches_float64_oracle(backend, causal, H, H_kv, seed):
    D = 32
    q, k, v, cu_q, cu_k = make_varlen(Q_LENS, K_LENS, H, H_kv, D, seed)
    out = flash_attention(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend)
    check_varlen(out, q, k, v, cu_q, cu_k, causal, D ** -0.5, f"{backend} causal={causal} H={H} H_kv={H_kv}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [24, 64, 128])
def test_head_dims_and_explicit_bounds(backend, D, seed):
    """D = 64, 128 and a padded D = 24; explicit max_seqlen_q/k (the no-sync path) and a custom scale."""
    q_lens, k_lens = [9, 20], [30, 20]
    q, k, v, cu_q, cu_k = make_varlen(q_lens, k_lens, 6, 2, D, seed)
    out = flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, scale=0.3, backend=backend,
                          max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens))
    check_varlen(out, q, k, v, cu_q, cu_k, True, 0.3, f"{backend} D={D}")


@needs_triton
def test_triton_small_tiles_cross_the_diagonal(seed):
    """16 x 16 tiles over L = 45, S = 61 with G = 7: many row tiles per query, unmasked tiles before the
    diagonal, masked ones on it, a ragged last tile."""
    q, k, v, cu_q, cu_k = make_varlen([45], [61], 7, 1, 32, seed)
    out = fa_module.flash_attention_triton(q, k, v, cu_q, cu_k, None, None, True, 0.2, block_m=16, block_n=16)
    check_varlen(out, q, k, v, cu_q, cu_k, True, 0.2, "triton 16x16 tiles")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("P,H,H_kv", [(16, 14, 2), (1, 4, 4), (8, 8, 1)])
def test_paged_matches_float64_oracle(backend, causal, P, H, H_kv, seed):
    """New queries over a cached prefix in a paged pool: prefill, prefix + suffix, decode rows."""
    D = 32
    prefix, new = [0, 23, 40, 9], [13, 6, 1, 1]
    lengths = [p + n for p, n in zip(prefix, new)]
    k_pool, v_pool, table = make_paged(lengths, P, H_kv, D, seed)
    cu_q = cumulative(new)
    q = torch.randn(int(cu_q[-1]), H, D, generator=torch.Generator().manual_seed(seed + 1))
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    out = flash_attention(q, k_pool, v_pool, causal=causal, cu_seqlens_q=cu_q, block_table=table,
                          seq_lens=seq_lens, backend=backend)
    assert out.shape == q.shape and not torch.isnan(out).any()
    for b, n in enumerate(lengths):
        ref = oracle(q[cu_q[b]:cu_q[b + 1]], dense(k_pool, table, b, n), dense(v_pool, table, b, n), causal,
                     D ** -0.5)
        torch.testing.assert_close(out[cu_q[b]:cu_q[b + 1]].double(), ref, **TOL,
                                   msg=lambda m, b=b: f"{backend} paged P={P}, sequence {b}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_equals_dense_and_paged_prefill_reference(backend, seed):
    """The paged path agrees with the dense path on the same keys, and with paged_prefill_attention."""
    from miniinfer.kernels.paged_attention import paged_prefill_attention_torch

    lengths, new = [20, 7], [4, 7]
    k_pool, v_pool, table = make_paged(lengths, 4, 2, 16, seed)
    cu_q = cumulative(new)
    q = torch.randn(sum(new), 4, 16)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    paged = flash_attention(q, k_pool, v_pool, cu_seqlens_q=cu_q, block_table=table, seq_lens=seq_lens,
                            backend=backend)
    k = torch.cat([dense(k_pool, table, b, n) for b, n in enumerate(lengths)])
    v = torch.cat([dense(v_pool, table, b, n) for b, n in enumerate(lengths)])
    packed = flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cumulative(lengths), backend=backend)
    torch.testing.assert_close(paged, packed, **TOL)
    prefill = paged_prefill_attention_torch(q, k_pool, v_pool, table, cu_q, seq_lens, 16 ** -0.5)
    torch.testing.assert_close(paged, prefill, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_layout_and_single_sequence(backend, seed):
    """q [B, L, H, D] with k, v [B, S, H_kv, D] equals the packed call; a 3-D call without cu_seqlens is
    one sequence."""
    B, L, S, H, H_kv, D = 3, 5, 11, 4, 2, 16
    q, k, v = torch.randn(B, L, H, D), torch.randn(B, S, H_kv, D), torch.randn(B, S, H_kv, D)
    out = flash_attention(q, k, v, backend=backend)
    assert out.shape == (B, L, H, D)
    packed = flash_attention(q.reshape(-1, H, D), k.reshape(-1, H_kv, D), v.reshape(-1, H_kv, D),
                             cu_seqlens_q=cumulative([L] * B), cu_seqlens_k=cumulative([S] * B), backend=backend)
    torch.testing.assert_close(out.reshape(-1, H, D), packed)
    single = flash_attention(q[1], k[1], v[1], backend=backend)
    torch.testing.assert_close(single.double(), oracle(q[1], k[1], v[1], True, D ** -0.5), **TOL)
    # [B, L, H, D] queries over paged K/V: the same keys, stored in a pool
    k_pool, v_pool, table = make_paged([S] * B, 4, H_kv, D, seed, share=False)
    for b in range(B):  # write sequence b's keys at its slots
        pos = torch.arange(S)
        k_pool[table[b].long()[pos // 4], pos % 4] = k[b]
        v_pool[table[b].long()[pos // 4], pos % 4] = v[b]
    paged = flash_attention(q, k_pool, v_pool, block_table=table, seq_lens=torch.full((B,), S), backend=backend)
    torch.testing.assert_close(paged, out, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_queries_before_the_first_key_get_zeros(backend, seed):
    """Causal with S < L (bottom-right aligned): the first L - S queries see no key and output zeros."""
    q, k, v, cu_q, cu_k = make_varlen([9], [4], 4, 2, 16, seed)
    out = flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend)
    assert torch.all(out[:5] == 0)
    check_varlen(out, q, k, v, cu_q, cu_k, True, 0.25, f"{backend} S < L")


def test_auto_is_the_torch_reference_on_cpu(seed):
    q, k, v, cu_q, cu_k = make_varlen([3, 8], [10, 8], 4, 2, 16, seed)
    auto = flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert torch.equal(auto, flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="torch"))


def test_torch_backend_keeps_its_dtype(seed):
    """bf16 in, bf16 out (float32 math): close to the oracle on the same bf16 inputs."""
    q, k, v, cu_q, cu_k = make_varlen([6, 13], [6, 20], 4, 1, 16, seed)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out = flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="torch")
    assert out.dtype == torch.bfloat16
    for b in range(2):
        ref = oracle(q[cu_q[b]:cu_q[b + 1]], k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]], True, 0.25)
        torch.testing.assert_close(out[cu_q[b]:cu_q[b + 1]].double(), ref, atol=1e-2, rtol=1e-2)


# ------------------------------------------------------------------------------------------------
# The online softmax
# ------------------------------------------------------------------------------------------------

def partial(scores, values):
    """(o, m, l) of one part: scores [N, K], values [K, D] -> o [N, D], m [N], l [N]."""
    m = scores.amax(-1)
    e = torch.exp(scores - m[:, None])
    return (e @ values) / e.sum(-1)[:, None], m, e.sum(-1)


def test_merge_partials_is_one_softmax_and_associative(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(5, 30, generator=gen, dtype=torch.float64) * 4
    scores[:, 10:20] += 30  # the middle part dominates: the other parts get rescaled hard
    values = torch.randn(30, 8, generator=gen, dtype=torch.float64)
    a, b, c = (partial(scores[:, s], values[s]) for s in (slice(0, 10), slice(10, 20), slice(20, 30)))
    left = merge_partials(*merge_partials(*a, *b), *c)
    right = merge_partials(*a, *merge_partials(*b, *c))
    whole = torch.softmax(scores, -1) @ values
    for got in (left, right):
        torch.testing.assert_close(got[0], whole, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(got[1], scores.amax(-1))
        torch.testing.assert_close(got[2], torch.exp(scores - scores.amax(-1, keepdim=True)).sum(-1))
    torch.testing.assert_close(merge_partials(*b, *a)[0], merge_partials(*a, *b)[0], atol=1e-12, rtol=1e-12)


def test_merge_with_an_empty_part_is_the_identity():
    o, m, l = partial(torch.randn(3, 7, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64))
    empty = (torch.full_like(o, float("nan")), torch.full_like(m, float("-inf")), torch.zeros_like(l))
    for merged in (merge_partials(o, m, l, *empty), merge_partials(*empty, o, m, l)):
        torch.testing.assert_close(merged[0], o)
        torch.testing.assert_close(merged[2], l)
    both = merge_partials(torch.zeros_like(o), *empty[1:], torch.zeros_like(o), *empty[1:])
    assert torch.all(both[0] == 0) and torch.all(both[2] == 0)


def test_causal_tile_range_and_mask_against_brute_force():
    for block_n in (1, 4, 16):
        for q_offset in (-5, 0, 3, 17):
            for q_start in range(0, 12, 3):
                for q_end in range(q_start, 14, 4):
                    seen = {j // block_n for i in range(q_start, q_end) for j in range(0, 60) if j <= q_offset + i}
                    first, last = causal_tile_range(q_start, q_end, q_offset, block_n)
                    assert set(range(first, last + 1)) == seen, (q_start, q_end, q_offset, block_n)
                    for t in seen:  # a tile needs the mask iff some (query, key) in it is hidden
                        hidden = any(j > q_offset + i for i in range(q_start, q_end)
                                     for j in range(t * block_n, (t + 1) * block_n))
                        assert tile_needs_mask(t, q_start, q_offset, block_n) == hidden


def test_blocked_attention_never_builds_more_than_one_tile(seed):
    """L = S = 200 in 32 x 32 tiles: every score tile is at most [H_kv, G, 32, 32], the causal skip
    visits 7·8/2 = 28 of the 49 tiles, and the result is the oracle's."""
    L = S = 200
    q, k, v = torch.randn(L, 6, 16), torch.randn(S, 2, 16), torch.randn(S, 2, 16)
    tiles = []
    out = blocked_attention(q, k, v, True, 0.25, 32, 32,
                            on_score_tile=lambda qt, kt, s: tiles.append((qt, kt, tuple(s.shape))))
    assert max(shape[2] * shape[3] for _, _, shape in tiles) == 32 * 32
    assert all(shape[:2] == (2, 3) and shape[2] <= 32 and shape[3] <= 32 for _, _, shape in tiles)
    assert sorted((qt, kt) for qt, kt, _ in tiles) == [(qt, kt) for qt in range(7) for kt in range(qt + 1)]
    torch.testing.assert_close(out.double(), oracle(q, k, v, True, 0.25), **TOL)


def test_torch_backend_goes_through_the_tiles(monkeypatch, seed):
    """flash_attention(backend='torch') computes only score tiles of at most block_m x block_n."""
    largest = []

    def recording(*args, **kwargs):
        return blocked_attention(*args, **kwargs, on_score_tile=lambda qt, kt, s: largest.append(s.shape[-2:]))

    monkeypatch.setattr(fa_module, "blocked_attention", recording)
    q, k, v, cu_q, cu_k = make_varlen([150, 3], [150, 140], 4, 2, 16, seed)
    out = flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="torch")
    assert largest and max(r * c for r, c in largest) <= fa_module.TORCH_BLOCK_M * fa_module.TORCH_BLOCK_N
    check_varlen(out, q, k, v, cu_q, cu_k, True, 0.25, "torch through tiles")


# ------------------------------------------------------------------------------------------------
# Argument checks
# ------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    q, k, v, cu_q, cu_k = make_varlen([3, 4], [3, 4], 4, 2, 16, 0)
    call = lambda **kw: flash_attention(**{"q": q, "k": k, "v": v, "cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k,
                                           "backend": "torch", **kw})
    with pytest.raises(ValueError, match="backend"):
        call(backend="cuda")
    with pytest.raises(ValueError, match="one dtype"):
        call(k=k.double())
    with pytest.raises(ValueError, match="differ in shape"):
        call(v=v[:, :1])
    with pytest.raises(ValueError, match="multiple of KV heads"):
        call(q=torch.randn(7, 3, 16))
    with pytest.raises(ValueError, match="head dim"):
        call(q=torch.randn(7, 4, 8))
    with pytest.raises(ValueError, match="cu_seqlens_k must be"):
        call(cu_seqlens_k=cu_k[:2])
    with pytest.raises(ValueError, match="integer"):
        call(cu_seqlens_q=cu_q.float())
    with pytest.raises(ValueError, match="give cu_seqlens_k"):
        call(cu_seqlens_k=None)
    with pytest.raises(ValueError, match="on one device"):
        call(cu_seqlens_q=cu_q.to("meta"))
    with pytest.raises(ValueError, match="both block_table"):
        call(cu_seqlens_k=None, seq_lens=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="not both"):
        call(block_table=torch.zeros(2, 1, dtype=torch.int32), seq_lens=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="paged k, v"):
        call(cu_seqlens_k=None, block_table=torch.zeros(2, 1, dtype=torch.int32), seq_lens=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="block_table must be"):
        flash_attention(q, k.view(7, 1, 2, 16), v.view(7, 1, 2, 16), cu_seqlens_q=cu_q,
                        block_table=torch.zeros(3, 1, dtype=torch.int32), seq_lens=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="not .B, L, H, D."):
        flash_attention(q.view(1, 7, 4, 16), k.view(1, 7, 2, 16), v.view(1, 7, 2, 16), cu_seqlens_q=cu_q)
    with pytest.raises(ValueError, match="must be .B, S, H_kv, D."):
        flash_attention(q.view(1, 7, 4, 16), k, v)
    expected = "pip install flash-attn-4" if flash_attn_library() is None else "float16/bfloat16 CUDA"
    with pytest.raises((RuntimeError, ValueError), match=expected):
        call(backend="flash_attn")
