"""Chapter 03: softmax, the causal mask, SDPA, GQA (MHA/GQA/MQA), against torch's SDPA in float64."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from miniinfer import attention


def _reference(q, k, v, causal, scale=None):
    """torch SDPA with the KV heads repeated (HF's repeat_kv order) and a bottom-right causal mask."""
    H, H_kv = q.shape[2], k.shape[2]
    k = k.repeat_interleave(H // H_kv, dim=2)
    v = v.repeat_interleave(H // H_kv, dim=2)
    L, S = q.shape[1], k.shape[1]
    mask = torch.ones(L, S, dtype=torch.bool).tril(S - L) if causal else None
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         scale=scale)
    return out.transpose(1, 2)


def test_softmax_is_stable(seed):
    x = torch.randn(3, 5, 17, dtype=torch.float64) * 1000  # exp(1000) overflows without the max shift
    got = attention.softmax(x, dim=-1)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.softmax(x, dim=-1))
    torch.testing.assert_close(attention.softmax(x, dim=1), torch.softmax(x, dim=1))
    with_inf = torch.tensor([0.0, float("-inf"), 1.0])
    torch.testing.assert_close(attention.softmax(with_inf, 0), torch.softmax(with_inf, 0))


def test_causal_mask_definition():
    for L, S in ((1, 1), (1, 7), (5, 5), (3, 8), (6, 9)):
        mask = attention.causal_mask(L, S)
        assert mask.shape == (L, S) and mask.dtype == torch.bool
        for i in range(L):
            for j in range(S):
                assert mask[i, j].item() == (j <= i + (S - L)), (L, S, i, j)
    assert attention.causal_mask(4, 4).equal(torch.ones(4, 4, dtype=torch.bool).tril())
    assert attention.causal_mask(1, 9).all()


def test_scaled_dot_product_attention_mha(seed):
    rng = random.Random(seed)
    B, L, S, H, D = rng.randint(1, 3), rng.randint(1, 9), 0, rng.randint(1, 4), rng.randint(1, 33)
    S = L + rng.randint(0, 6)
    q = torch.randn(B, L, H, D, dtype=torch.float64)
    k, v = torch.randn(B, S, H, D, dtype=torch.float64), torch.randn(B, S, H, D, dtype=torch.float64)
    mask = attention.causal_mask(L, S)
    torch.testing.assert_close(attention.scaled_dot_product_attention(q, k, v, mask), _reference(q, k, v, True))
    torch.testing.assert_close(attention.scaled_dot_product_attention(q, k, v), _reference(q, k, v, False))
    torch.testing.assert_close(attention.scaled_dot_product_attention(q, k, v, scale=0.3),
                               _reference(q, k, v, False, scale=0.3))


@pytest.mark.parametrize("fn", [attention.grouped_query_attention, attention.sdpa_attention])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (5, 1), (8, 2)], ids=["MHA", "GQA3", "MQA", "GQA4"])
def test_grouped_query_attention(seed, fn, heads):
    rng = random.Random(seed)
    H, H_kv = heads
    B, D = rng.randint(1, 3), rng.randint(1, 40)
    for L, S in ((1, 1), (1, rng.randint(2, 20)), (7, 7), (rng.randint(2, 9), rng.randint(10, 25))):
        q = torch.randn(B, L, H, D, dtype=torch.float64)
        k, v = torch.randn(B, S, H_kv, D, dtype=torch.float64), torch.randn(B, S, H_kv, D, dtype=torch.float64)
        for causal in (True, False):
            got = fn(q, k, v, causal=causal)
            assert got.shape == (B, L, H, D)
            torch.testing.assert_close(got, _reference(q, k, v, causal), msg=f"L={L} S={S} causal={causal}")
        torch.testing.assert_close(fn(q, k, v, scale=0.7), _reference(q, k, v, True, scale=0.7))


def test_query_block_after_cache_equals_last_rows_of_full_attention(seed):
    """The bottom-right mask: attending the last L queries to all S keys gives the last L rows of full
    causal attention — what a KV cache relies on."""
    B, S, H, H_kv, D, L = 2, 13, 6, 3, 8, 4
    q = torch.randn(B, S, H, D, dtype=torch.float64)
    k, v = torch.randn(B, S, H_kv, D, dtype=torch.float64), torch.randn(B, S, H_kv, D, dtype=torch.float64)
    full = attention.grouped_query_attention(q, k, v)
    block = attention.grouped_query_attention(q[:, -L:], k, v)
    torch.testing.assert_close(block, full[:, -L:])


def test_gqa_reads_strided_inputs(seed):
    """The model passes q, k, v as slices of one fused qkv tensor (non-contiguous views)."""
    B, L, H, H_kv, D = 2, 5, 4, 2, 16
    qkv = torch.randn(B, L, H + 2 * H_kv, D, dtype=torch.float64)
    q, k, v = qkv[:, :, :H], qkv[:, :, H : H + H_kv], qkv[:, :, H + H_kv :]
    torch.testing.assert_close(attention.grouped_query_attention(q, k, v),
                               _reference(q.contiguous(), k.contiguous(), v.contiguous(), True))
