"""Chapter 01 building blocks against float64 formulas and HF transformers' own modules."""

from __future__ import annotations

import random

import pytest
import torch

from miniinfer import layers
from miniinfer.models.config import Qwen2Config
from miniinfer.models.qwen2 import Qwen2ForCausalLM


def _sizes(rng: random.Random) -> tuple[int, int, int]:
    return rng.randint(1, 5), rng.randint(1, 13), rng.randint(3, 67)


def test_linear_matches_formula(seed):
    rng = random.Random(seed)
    B, L, E = _sizes(rng)
    out = rng.randint(1, 41)
    x, w, b = torch.randn(B, L, E, dtype=torch.float64), torch.randn(out, E, dtype=torch.float64), torch.randn(out, dtype=torch.float64)
    torch.testing.assert_close(layers.linear(x, w, b), x @ w.T + b)
    torch.testing.assert_close(layers.linear(x, w), x @ w.T)


def test_silu_and_swiglu(seed):
    x = torch.randn(3, 7, 29, dtype=torch.float64) * 5
    torch.testing.assert_close(layers.silu(x), x * torch.sigmoid(x))
    gate, up = torch.randn(2, 5, 31, dtype=torch.float64), torch.randn(2, 5, 31, dtype=torch.float64)
    torch.testing.assert_close(layers.swiglu(gate, up), gate * torch.sigmoid(gate) * up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_matches_formula(seed, dtype):
    rng = random.Random(seed)
    B, L, E = _sizes(rng)
    eps = rng.choice([1e-6, 1e-5, 0.1])
    x = torch.randn(B, L, E, dtype=torch.float64) * rng.uniform(0.01, 100)
    w = torch.randn(E, dtype=torch.float64)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    got = layers.rms_norm(x.to(dtype), w.to(dtype), eps)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_matches_hf_module(dtype):
    """Same float32 statistics and the same cast-then-scale order as HF's Qwen2RMSNorm."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    E = 203
    hf = Qwen2RMSNorm(E, eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(E))
    x = (torch.randn(4, 9, E) * 30).to(dtype)
    expected = hf(x)
    got = layers.rms_norm(x, hf.weight.detach(), 1e-6)
    assert got.dtype == expected.dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


def test_embedding_and_lm_head(seed):
    V, E = 37, 11
    table = torch.randn(V, E, dtype=torch.float64)
    ids = torch.randint(0, V, (3, 8))
    torch.testing.assert_close(layers.embedding(ids, table), table[ids])
    h = torch.randn(3, 8, E, dtype=torch.float64)
    torch.testing.assert_close(layers.lm_head(h, table), h @ table.T)


def test_modules_call_their_functions(seed):
    norm = layers.RMSNorm(19, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 19)
    torch.testing.assert_close(norm(x), layers.rms_norm(x, norm.weight, 1e-5))
    mlp = layers.SwiGLUMLP(19, 23)
    gate, up = mlp.gate_up_proj(x).split(23, dim=-1)
    torch.testing.assert_close(mlp(x), mlp.down_proj(layers.swiglu(gate, up)))
    calls = []
    custom = layers.RMSNorm(19, 1e-5, fn=lambda x, w, eps: calls.append(eps) or x)
    custom(x)
    assert calls == [1e-5]


@pytest.mark.parametrize("tie", [True, False])
def test_tied_and_untied_head(tie):
    config = Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=tie,
                         max_position_embeddings=32)
    model = Qwen2ForCausalLM(config)
    names = dict(model.named_parameters())
    if tie:
        assert model.lm_head is None and "lm_head.weight" not in names
        assert model.lm_head_weight is model.model.embed_tokens.weight
    else:
        assert model.lm_head_weight is model.lm_head.weight
        assert model.lm_head_weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    qkv = (2 + 2 * 1) * 8 * 16 + (2 + 2 * 1) * 8  # [(H + 2·H_kv)·D, E] weight and its bias
    n_expected = 50 * 16 * (1 if tie else 2) + 2 * 16 + 16 + qkv + 16 * 16 + 3 * 16 * 24
    assert model.num_parameters() == n_expected
