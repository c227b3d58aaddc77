"""Chapter 02: RoPE tables, both pairings, their equivalence, the relative-position property, positions."""

from __future__ import annotations

import random

import pytest
import torch

from miniinfer import rope


def _table64(max_positions: int, D: int, theta: float):
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq
    return angles.cos(), angles.sin()


def test_tables_equal_hf_rotary_embedding():
    """Bit-for-bit the same float32 tables as transformers' Qwen2RotaryEmbedding (needed for parity)."""
    import transformers
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    for D, theta in ((16, 10000.0), (64, 1e6), (6, 500.0)):
        config = transformers.Qwen2Config(hidden_size=4 * D, num_attention_heads=4, rope_theta=theta,
                                          max_position_embeddings=4096)
        positions = torch.tensor([[0, 1, 2, 17, 999, 4095]])
        hf_cos, hf_sin = Qwen2RotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
        cos, sin = rope.rope_cos_sin(4096, D, theta)
        assert cos.shape == (4096, D // 2) and cos.dtype == torch.float32
        assert torch.equal(cos[positions[0]], hf_cos[0, :, : D // 2])
        assert torch.equal(sin[positions[0]], hf_sin[0, :, : D // 2])
        assert torch.equal(hf_cos[..., : D // 2], hf_cos[..., D // 2 :])  # HF duplicates the halves


def test_apply_rope_matches_hf(seed):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    rng = random.Random(seed)
    B, L, H, D = rng.randint(1, 3), rng.randint(1, 11), rng.randint(1, 5), 2 * rng.randint(1, 20)
    cos, sin = _table64(64, D, rng.choice([100.0, 10000.0, 1e6]))
    positions = torch.randint(0, 64, (B, L))
    q = torch.randn(B, L, H, D, dtype=torch.float64)
    full_cos, full_sin = torch.cat([cos, cos], -1)[positions], torch.cat([sin, sin], -1)[positions]
    expected, _ = apply_rotary_pos_emb(q.transpose(1, 2), q.transpose(1, 2), full_cos, full_sin)
    got = rope.apply_rope(q, cos[positions], sin[positions])
    torch.testing.assert_close(got, expected.transpose(1, 2))


def test_interleaved_matches_complex_rotation(seed):
    """Meta's original formulation: view pairs (2i, 2i+1) as complex numbers, multiply by e^{i p θ}."""
    T, H, D = 9, 3, 14
    cos, sin = _table64(32, D, 10000.0)
    positions = torch.randint(0, 32, (T,))
    x = torch.randn(T, H, D, dtype=torch.float64)
    rotation = torch.polar(torch.ones_like(cos[positions]), torch.atan2(sin[positions], cos[positions]))
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(T, H, D // 2, 2)) * rotation[:, None, :])
    got = rope.apply_rope_interleaved(x, cos[positions], sin[positions])
    torch.testing.assert_close(got, expected.reshape(T, H, D))


def test_interleaved_equals_half_split_under_permutation(seed):
    T, H, D = 7, 2, 22
    cos, sin = _table64(20, D, 10000.0)
    c, s = cos[torch.arange(3, 10)], sin[torch.arange(3, 10)]
    x = torch.randn(T, H, D, dtype=torch.float64)
    perm = rope.interleaved_to_half_split
    torch.testing.assert_close(rope.apply_rope(perm(x), c, s), perm(rope.apply_rope_interleaved(x, c, s)))
    torch.testing.assert_close(rope.half_split_to_interleaved(perm(x)), x)
    assert not torch.allclose(rope.apply_rope(x, c, s), rope.apply_rope_interleaved(x, c, s))


@pytest.mark.parametrize("apply", [rope.apply_rope, rope.apply_rope_interleaved])
def test_relative_position_property(seed, apply):
    """q·k after RoPE depends only on the position difference (and rotations keep norms)."""
    rng = random.Random(seed)
    D = 2 * rng.randint(2, 40)
    cos, sin = rope.rope_cos_sin(4096, D, rng.choice([10000.0, 1e6]))
    q, k = torch.randn(1, D), torch.randn(1, D)
    m, n = rng.randrange(0, 2000), rng.randrange(0, 2000)
    shift = rng.randrange(0, 2000)

    def score(pq, pk):
        rq = apply(q.double(), cos[pq : pq + 1].double(), sin[pq : pq + 1].double())
        rk = apply(k.double(), cos[pk : pk + 1].double(), sin[pk : pk + 1].double())
        return (rq * rk).sum().item()

    reference = score(m, n)
    scale = q.norm().item() * k.norm().item()
    assert abs(score(m + shift, n + shift) - reference) <= 1e-5 * scale, (m, n, shift)
    assert abs(score(m - min(m, n), n - min(m, n)) - reference) <= 1e-5 * scale
    rotated = apply(q.double(), cos[m : m + 1].double(), sin[m : m + 1].double())
    assert abs(rotated.norm().item() - q.double().norm().item()) <= 1e-6 * q.norm().item()


def test_make_positions():
    assert rope.make_positions(5, 3).tolist() == [5, 6, 7]
    assert rope.make_positions(slice(2, 9, 3)).tolist() == [2, 5, 8]
    assert rope.make_positions(slice(None, 4)).tolist() == [0, 1, 2, 3]
    t = torch.tensor([[0, 1], [7, 8]], dtype=torch.int32)
    assert rope.make_positions(t).dtype == torch.long and rope.make_positions(t).tolist() == t.tolist()
    with pytest.raises(ValueError, match="length"):
        rope.make_positions(4)
    with pytest.raises(ValueError, match=">= 0"):
        rope.make_positions(-1, 2)
    with pytest.raises(ValueError, match="stop"):
        rope.make_positions(slice(3, None))
    with pytest.raises(TypeError):
        rope.make_positions(2.5, 3)


def test_rotary_embedding_offsets_slices_and_packed(seed):
    """Rotating a block at an offset equals the matching rows of rotating the whole sequence, whatever
    the layout: [B, L] with per-row positions, or packed [T]."""
    H, H_kv, D, S = 4, 2, 16, 40
    emb = rope.RotaryEmbedding(D, max_positions=64, theta=10000.0)
    q, k = torch.randn(S, H, D), torch.randn(S, H_kv, D)
    full_q, full_k = emb(q, k, torch.arange(S))
    offset, L = 23, 9
    part_q, part_k = emb(q[offset : offset + L], k[offset : offset + L], rope.make_positions(offset, L))
    torch.testing.assert_close(part_q, full_q[offset : offset + L], rtol=0, atol=0)
    torch.testing.assert_close(part_k, full_k[offset : offset + L], rtol=0, atol=0)
    sl = slice(5, 17)
    torch.testing.assert_close(emb(q[sl], k[sl], rope.make_positions(sl))[0], full_q[sl], rtol=0, atol=0)
    # [B, L] layout: row 0 at positions 0..L-1, row 1 at offset..offset+L-1
    positions = torch.stack([torch.arange(L), torch.arange(offset, offset + L)])
    batch_q = torch.stack([q[:L], q[offset : offset + L]])
    batch_k = torch.stack([k[:L], k[offset : offset + L]])
    out_q, out_k = emb(batch_q, batch_k, positions)
    torch.testing.assert_close(out_q[1], full_q[offset : offset + L], rtol=0, atol=0)
    torch.testing.assert_close(out_k[0], full_k[:L], rtol=0, atol=0)
    assert emb.cos.shape == (64, D // 2)
    assert "cos" not in emb.state_dict()  # recomputed, never saved with the weights


def test_odd_head_dim_rejected():
    with pytest.raises(ValueError, match="even"):
        rope.rope_cos_sin(8, 7, 10000.0)
