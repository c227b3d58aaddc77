"""Paged attention on the CPU: the torch reference against an independent dense oracle, then the Triton
kernels (under TRITON_INTERPRET=1) against the reference, plus write_kv and the argument checks.

Inputs are random: block tables are shuffled, non-contiguous, share blocks between sequences, and hold
garbage (-1 and out-of-range ids) past each sequence's end, which no function may read. Lengths are
awkward (1, P - 1, P, P + 1, a few hundred). Outputs are poisoned with NaN before every kernel run, so
an element a kernel forgets to write fails the comparison. Shapes stay small: the interpreter runs each
program in NumPy and is slow. Inputs are fresh each run (the ``seed`` fixture of conftest.py prints the
seed; replay a failure with ``MINIINFER_TEST_SEED=<seed>``).

Tolerances, and why:
* reference (float32 math) vs the float64 oracle: sums of a few hundred float32 products, ~1e-6
  relative; we allow atol = rtol = 1e-5.
* Triton float32 vs reference: the interpreter's dots are float32 NumPy matmuls, a different
  summation order from torch's: ~1e-6; allow atol = rtol = 2e-5.
* Triton float16 vs the reference on the same fp16 inputs upcast to float32: the kernel rounds the
  softmax weights p to fp16 before the p @ v dot (relative 2^-11 each) and its output to fp16
  (half an ulp, <= 2^-11 relative = 4.9e-4 for |out| < 1): allow atol = rtol = 3e-3.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from miniinfer.kernels import triton_available
from miniinfer.kernels.paged_attention import (
    paged_decode_attention,
    paged_decode_attention_torch,
    paged_decode_attention_triton,
    paged_prefill_attention,
    paged_prefill_attention_torch,
    paged_prefill_attention_triton,
    write_kv,
)

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}


# ------------------------------------------------------------------------------------------------
# Random paged inputs
# ------------------------------------------------------------------------------------------------

def make_paged(lengths, P, H_kv, D, dtype=torch.float32, seed=0, share_prefix=True, spare_blocks=3):
    """A random paged cache holding sequences of the given lengths.

    Returns (k_cache, v_cache [num_blocks, P, H_kv, D], block_tables [B, max_blocks] int32). Block ids
    are a random permutation (non-contiguous, out of order); when ``share_prefix`` the second sequence
    reuses the first sequence's full blocks (a shared prefix, as the radix cache produces). Entries past
    a sequence's blocks are garbage: -1 or ids past the end of the cache.
    """
    gen = torch.Generator().manual_seed(seed)
    needed = [math.ceil(n / P) for n in lengths]
    num_blocks = sum(needed) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(needed) + 2
    tables = []
    cursor = 0
    for b, n in enumerate(needed):
        row = perm[cursor:cursor + n]
        cursor += n
        if share_prefix and b == 1 and len(lengths) > 1:
            shared = min(lengths[0] // P, n - 1)  # full blocks only: a partial block is never shared
            row = tables[0][:shared] + row[shared:]
        garbage = [-1 if i % 2 == 0 else num_blocks + 1000 + i for i in range(max_blocks - n)]
        tables.append(row + garbage)
    k_cache = torch.randn(num_blocks, P, H_kv, D, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, P, H_kv, D, generator=gen).to(dtype)
    return k_cache, v_cache, torch.tensor(tables, dtype=torch.int32)


def dense_kv(cache, block_tables, b, length):
    """Oracle gather, built another way than the reference's: per-token slots of the flat cache."""
    P = cache.shape[1]
    pos = torch.arange(length)
    slots = block_tables[b].long()[pos // P] * P + pos % P
    return cache.reshape(-1, *cache.shape[2:])[slots].double()  # [S, H_kv, D]


def oracle_attention(q, k, v, q_positions, scale):
    """float64 SDPA of q [L, H, D] over k, v [S, H_kv, D] (KV heads repeated for GQA), causal by position."""
    G = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(G, dim=1).transpose(0, 1)  # [H, S, D]: query head h reads KV head h // G
    v = v.repeat_interleave(G, dim=1).transpose(0, 1)
    mask = torch.arange(k.shape[1])[None, :] <= q_positions[:, None]  # [L, S]
    out = F.scaled_dot_product_attention(q.double().transpose(0, 1), k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)  # [L, H, D]


def nan_like(q):
    return torch.full_like(q, float("nan"))


def assert_close(out, ref, dtype, what):
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (an element was not written?)"
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype], msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------------
# The reference against the dense float64 oracle
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("P", [1, 16, 64])
@pytest.mark.parametrize("H,H_kv", [(4, 4), (4, 2), (14, 2), (4, 1)])
def test_decode_reference_matches_dense_oracle(P, H, H_kv, seed):
    D = 16
    lengths = [1, max(1, P - 1), P, P + 1, 300]
    k_cache, v_cache, tables = make_paged(lengths, P, H_kv, D, seed=seed)
    q = torch.randn(len(lengths), H, D, generator=torch.Generator().manual_seed(seed + 1))
    scale = D ** -0.5
    out = paged_decode_attention_torch(q, k_cache, v_cache, tables, torch.tensor(lengths, dtype=torch.int32), scale)
    for b, n in enumerate(lengths):
        k, v = dense_kv(k_cache, tables, b, n), dense_kv(v_cache, tables, b, n)
        ref = oracle_attention(q[b:b + 1], k, v, torch.tensor([n - 1]), scale)[0]
        torch.testing.assert_close(out[b].double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("P", [1, 16])
@pytest.mark.parametrize("H,H_kv", [(4, 2), (14, 2)])
def test_prefill_reference_matches_dense_oracle(P, H, H_kv, seed):
    D = 16
    # (cached prefix, new tokens): plain prefill, prefix + suffix, decode rows, one odd long one
    prefix = [0, 5, 31, 0, 17, 100]
    new = [7, 1, 1, 33, 16, 20]
    lengths = [p + n for p, n in zip(prefix, new)]
    k_cache, v_cache, tables = make_paged(lengths, P, H_kv, D, seed=seed)
    cu = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), H, D, generator=torch.Generator().manual_seed(seed + 1))
    scale = 0.3
    out = paged_prefill_attention_torch(q, k_cache, v_cache, tables, cu, torch.tensor(lengths, dtype=torch.int32),
                                        scale)
    for b, n in enumerate(lengths):
        k, v = dense_kv(k_cache, tables, b, n), dense_kv(v_cache, tables, b, n)
        positions = torch.arange(prefix[b], n)
        ref = oracle_attention(q[cu[b]:cu[b + 1]], k, v, positions, scale)
        torch.testing.assert_close(out[cu[b]:cu[b + 1]].double(), ref, atol=1e-5, rtol=1e-5)


def test_decode_reference_equals_prefill_reference_for_one_query(seed):
    """A decode is a prefill row with q_len 1: the two references agree."""
    lengths = [9, 40, 1]
    k_cache, v_cache, tables = make_paged(lengths, 16, 2, 16, seed=seed)
    q = torch.randn(3, 6, 16)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    decode = paged_decode_attention_torch(q, k_cache, v_cache, tables, seq_lens, 0.25)
    prefill = paged_prefill_attention_torch(q, k_cache, v_cache, tables, torch.tensor([0, 1, 2, 3]), seq_lens, 0.25)
    torch.testing.assert_close(decode, prefill)


# ------------------------------------------------------------------------------------------------
# Triton decode (interpreter) against the reference
# ------------------------------------------------------------------------------------------------

# (P, H, H_kv, D, dtype, partition_size, block_n): every block size, GQA ratio (1, 2, 7, MQA) and dtype,
# several partitions per sequence (split-KV + reduce) and a single partition (direct write).
DECODE_CASES = [
    (1, 4, 2, 16, torch.float32, 32, 16),
    (16, 14, 2, 32, torch.float16, 64, 16),
    (16, 4, 4, 16, torch.float32, 512, 64),   # one partition: the first kernel writes the output
    (64, 4, 1, 32, torch.float16, 64, 32),
    (64, 14, 2, 16, torch.float32, 128, 64),
    (1, 2, 2, 64, torch.float16, 128, 32),
    (16, 6, 2, 24, torch.float32, 64, 32),    # D not a power of two: padded and masked
]


@needs_triton
@pytest.mark.parametrize("P,H,H_kv,D,dtype,partition_size,block_n", DECODE_CASES)
def test_triton_decode_matches_reference(P, H, H_kv, D, dtype, partition_size, block_n, seed):
    lengths = [1, max(1, P - 1), P, P + 1, 230]
    k_cache, v_cache, tables = make_paged(lengths, P, H_kv, D, dtype, seed=seed)
    q = torch.randn(len(lengths), H, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    ref = paged_decode_attention_torch(q.float(), k_cache.float(), v_cache.float(), tables, seq_lens, D ** -0.5)
    out = paged_decode_attention_triton(q, k_cache, v_cache, tables, seq_lens, D ** -0.5, max_seq_len=max(lengths),
                                        partition_size=partition_size, block_n=block_n, out=nan_like(q))
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref, dtype, f"triton decode P={P} H={H} H_kv={H_kv} D={D} {dtype}")


@needs_triton
def test_triton_decode_default_grid_and_zero_length(seed):
    """Default max_seq_len (the block-table capacity) and partition size; a padding row of length 0
    gives zeros (single-partition and split paths)."""
    lengths = [0, 3, 40]
    k_cache, v_cache, tables = make_paged(lengths, 16, 2, 16, seed=seed, share_prefix=False)
    q = torch.randn(3, 4, 16)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    ref = paged_decode_attention_torch(q, k_cache, v_cache, tables, seq_lens, 0.25)
    assert torch.all(ref[0] == 0)
    for partition_size in (None, 16):
        out = paged_decode_attention_triton(q, k_cache, v_cache, tables, seq_lens, 0.25,
                                            partition_size=partition_size, out=nan_like(q))
        assert_close(out, ref, torch.float32, f"triton decode, partition_size={partition_size}")


# ------------------------------------------------------------------------------------------------
# Triton prefill (interpreter) against the reference
# ------------------------------------------------------------------------------------------------

PREFILL_CASES = [  # (P, H, H_kv, D, dtype)
    (16, 4, 2, 16, torch.float32),
    (1, 7, 1, 16, torch.float16),
    (64, 2, 2, 32, torch.float16),
]


@needs_triton
@pytest.mark.parametrize("P,H,H_kv,D,dtype", PREFILL_CASES)
def test_triton_prefill_matches_reference(P, H, H_kv, D, dtype, seed):
    # cached prefix lengths incl. 0, decode rows (1 new token), a sequence with no new tokens, and
    # suffixes longer than one query tile (16 rows in the interpreter)
    prefix = [0, 40, 0, 17, 70, 5]
    new = [20, 1, 0, 1, 35, 16]
    lengths = [p + n for p, n in zip(prefix, new)]
    k_cache, v_cache, tables = make_paged([max(1, n) for n in lengths], P, H_kv, D, dtype, seed=seed)
    cu = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), H, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    ref = paged_prefill_attention_torch(q.float(), k_cache.float(), v_cache.float(), tables, cu, seq_lens, 0.2)
    out = paged_prefill_attention_triton(q, k_cache, v_cache, tables, cu, seq_lens, 0.2, out=nan_like(q))
    assert_close(out, ref, dtype, f"triton prefill P={P} H={H} H_kv={H_kv} D={D} {dtype}")
    # the public entry point with an explicit backend gives the same thing
    again = paged_prefill_attention(q, k_cache, v_cache, tables, cu, seq_lens, 0.2, backend="triton",
                                    max_q_len=max(new))
    torch.testing.assert_close(again, out)


# ------------------------------------------------------------------------------------------------
# write_kv
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_write_kv_skips_padding_slots(backend, seed):
    num_blocks, P, H_kv, D = 5, 4, 3, 8
    k_cache = torch.randn(num_blocks, P, H_kv, D).half()
    v_cache = torch.randn(num_blocks, P, H_kv, D).half()
    k, v = torch.randn(6, H_kv, D), torch.randn(6, H_kv, D)  # float32 in, cast to the cache's fp16
    slots = torch.tensor([13, -1, 0, 19, -1, 6])
    want_k, want_v = k_cache.clone().view(-1, H_kv, D), v_cache.clone().view(-1, H_kv, D)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s], want_v[s] = k[t].half(), v[t].half()
    write_kv(k, v, k_cache, v_cache, slots, backend=backend)
    assert torch.equal(k_cache.view(-1, H_kv, D), want_k)
    assert torch.equal(v_cache.view(-1, H_kv, D), want_v)


def test_write_then_decode_reads_what_was_written(seed):
    """The engine's order: write the new token's k/v at its slot, then attend over seq_len tokens."""
    k_cache, v_cache, tables = make_paged([5], 4, 2, 16, seed=seed, share_prefix=False)
    k_new, v_new = torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    pos = 5  # the 6th token: block tables[0, 1], offset 1
    slot = int(tables[0, pos // 4]) * 4 + pos % 4
    write_kv(k_new, v_new, k_cache, v_cache, torch.tensor([slot]))
    q = torch.randn(1, 4, 16)
    out = paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor([6], dtype=torch.int32), 0.25)
    k, v = dense_kv(k_cache, tables, 0, 6), dense_kv(v_cache, tables, 0, 6)
    assert torch.equal(k[5].float(), k_new[0])
    torch.testing.assert_close(out[0].double(), oracle_attention(q, k, v, torch.tensor([5]), 0.25)[0],
                               atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Backend choice and argument checks
# ------------------------------------------------------------------------------------------------

def test_auto_backend_on_cpu_is_the_reference(seed):
    k_cache, v_cache, tables = make_paged([7, 20], 16, 2, 16, seed=seed)
    q = torch.randn(2, 4, 16)
    seq_lens = torch.tensor([7, 20], dtype=torch.int32)
    ref = paged_decode_attention_torch(q, k_cache, v_cache, tables, seq_lens, 0.25)
    assert torch.equal(paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.25), ref)
    out = nan_like(q)
    assert paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.25, backend="torch", out=out) is out
    assert torch.equal(out, ref)


def test_bad_arguments_raise_clear_errors():
    k_cache, v_cache, tables = make_paged([7, 20], 16, 2, 16, seed=4)
    q = torch.randn(2, 4, 16)
    seq_lens = torch.tensor([7, 20], dtype=torch.int32)
    with pytest.raises(ValueError, match="backend"):
        paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.25, backend="flash")
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_decode_attention(torch.randn(2, 3, 16), k_cache, v_cache, tables, seq_lens, 0.25)
    with pytest.raises(ValueError, match="head dim"):
        paged_decode_attention(torch.randn(2, 4, 8), k_cache, v_cache, tables, seq_lens, 0.25)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(q, k_cache, v_cache, tables[:1], seq_lens, 0.25)
    with pytest.raises(ValueError, match="CUDA"):
        paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.25, backend="cuda")
    with pytest.raises(ValueError, match="out must be"):
        paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.25, backend="torch", out=torch.empty(2, 4))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        paged_prefill_attention(q, k_cache, v_cache, tables, torch.tensor([0, 1, 2]), seq_lens, 0.25, backend="cuda")
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_prefill_attention(q, k_cache, v_cache, tables, torch.tensor([0, 2]), seq_lens, 0.25)
    with pytest.raises(ValueError, match="new queries"):  # more new tokens than keys
        paged_prefill_attention(torch.randn(9, 4, 16), k_cache, v_cache, tables, torch.tensor([0, 8, 9]),
                                seq_lens, 0.25, backend="torch")
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(torch.randn(3, 2, 16), torch.randn(3, 2, 16), k_cache, v_cache, torch.tensor([0, 1]))


@pytest.mark.parametrize("capacity,long_context", [(4096, 4096), (32768, 32768), (1024, 2048)])
def test_backend_timing_workloads_keep_the_cuda_kernels_contract(capacity, long_context):
    """The engine times the decode kernels at start-up on these workloads. The CUDA kernel refuses a
    max_seq_len past the block tables' width (max_blocks · P): tables as narrow as the context with the
    engine's capacity as max_seq_len failed that check on every workload (on the H200 the failed check
    took the process down while a 0.5B model loaded with max_model_len 4096). Each workload must be one
    the kernel accepts, and the torch reference must run it."""
    from miniinfer.engine.attention_backends import decode_workloads

    P = 16
    for q, k_cache, v_cache, tables, lengths, max_seq_len in decode_workloads(
            "cpu", torch.float32, 4, 2, 8, P, long_context=long_context, capacity=capacity):
        assert tables.dtype == torch.int32 and lengths.dtype == torch.int32
        assert max_seq_len <= tables.shape[1] * P, "the CUDA kernel's TORCH_CHECK would refuse this"
        assert max_seq_len >= capacity and int(lengths.max()) <= max_seq_len
        assert 0 <= int(tables.min()) and int(tables.max()) < k_cache.shape[0]
        if q.shape[0] == 1 and max_seq_len <= 4096:
            out = paged_decode_attention(q, k_cache, v_cache, tables, lengths, 8 ** -0.5, backend="torch")
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("P", [1, 16])
@pytest.mark.parametrize("H,H_kv", [(4, 2), (14, 2), (4, 1)])
def test_sdpa_backend_mixed_step_matches_dense_oracle(P, H, H_kv, seed):
    """A mixed step of continuous batching: decode rows (one new token) beside new prompts and a cached
    prefix's suffix. The sdpa backend sends the decode rows through its batched decode path and only the
    others through the reference's loop; every row must still equal the float64 oracle."""
    from miniinfer.engine.attention_backends import SdpaBackend
    from miniinfer.engine.attention_context import PagedAttentionMetadata

    D = 16
    prefix = [40, 0, 5, 31, 0, 17, 2, 100, 9]
    new = [1, 7, 1, 1, 33, 0, 1, 20, 1]   # decodes, prompts, a sequence with nothing new this step
    lengths = [p + n for p, n in zip(prefix, new)]
    k_cache, v_cache, tables = make_paged(lengths, P, H_kv, D, seed=seed)
    # The engine zero-fills the entries past a sequence's blocks (the sdpa decode path gathers them, masked)
    tables = torch.where((tables < 0) | (tables >= k_cache.shape[0]), 0, tables)
    cu = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), H, D, generator=torch.Generator().manual_seed(seed + 1))
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    metadata = PagedAttentionMetadata(
        slot_mapping=torch.zeros(int(cu[-1]), dtype=torch.int32), block_tables=tables, seq_lens=seq_lens,
        cu_seqlens_q=cu, decode_only=False, max_seq_len=max(lengths), max_q_len=max(new))
    split = metadata.split_single_token_rows()
    assert split is not None and split.decode_rows.tolist() == [0, 8, 9, 43, 64]
    scale = 0.3
    out = SdpaBackend().prefill(q, k_cache, v_cache, metadata, scale)
    reference = paged_prefill_attention_torch(q, k_cache, v_cache, tables, cu, seq_lens, scale)
    for b, n in enumerate(lengths):
        if new[b] == 0:
            continue
        k, v = dense_kv(k_cache, tables, b, n), dense_kv(v_cache, tables, b, n)
        ref = oracle_attention(q[cu[b]:cu[b + 1]], k, v, torch.arange(prefix[b], n), scale)
        torch.testing.assert_close(out[cu[b]:cu[b + 1]].double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, reference, atol=2e-6, rtol=2e-6)
    # a step without decode rows, or with nothing but them, keeps one path
    only_prompts = PagedAttentionMetadata(
        slot_mapping=torch.zeros(7, dtype=torch.int32), block_tables=tables[1:2], seq_lens=seq_lens[1:2],
        cu_seqlens_q=torch.tensor([0, 7], dtype=torch.int32), decode_only=False, max_seq_len=7, max_q_len=7)
    assert only_prompts.split_single_token_rows() is None
