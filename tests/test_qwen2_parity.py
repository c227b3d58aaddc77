"""Chapter 04: our Qwen2 equals HF transformers' logits (fp32, error <= 1e-5 x the logit range), on
random configs and on the bundled model; the attention-context and logits_indices paths agree with
the plain forward."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_hf_checkpoint

import miniinfer
from miniinfer.attention import grouped_query_attention, sdpa_attention
from miniinfer.components import Components
from miniinfer.loader import load_model

CONFIGS = {  # name: make_hf_checkpoint kwargs
    "MHA-untied": dict(num_heads=4, num_kv_heads=4, tie=False, rope_theta=10000.0),
    "GQA-tied-head_dim10": dict(num_heads=6, num_kv_heads=2, head_dim=10, tie=True, rope_theta=1e6),
    "MQA-untied-head_dim24": dict(num_heads=4, num_kv_heads=1, head_dim=24, tie=False, rope_theta=500.0),
    "GQA4-tied-3layers": dict(num_heads=8, num_kv_heads=2, head_dim=16, tie=True, rope_theta=20000.0, num_layers=3,
                              hidden_size=64, intermediate_size=40, vocab_size=211, rms_norm_eps=1e-5),
}


def assert_logits_match(got: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    """max |got - expected| <= 1e-5 * (max - min of expected); returns and prints the ratio."""
    error = (got.double() - expected.double()).abs().max().item()
    span = (expected.max() - expected.min()).item()
    print(f"{what}: max abs error {error:.3g}, logit range {span:.3g}, ratio {error / span:.3g}")
    assert error <= 1e-5 * span, f"{what}: max abs error {error} > 1e-5 x logit range {span}"
    return error / span


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_hf(tmp_path, seed, name):
    hf = make_hf_checkpoint(tmp_path, seed=seed, **CONFIGS[name])
    model, tokenizer = load_model(tmp_path)
    assert tokenizer is None  # no tokenizer files in this folder
    assert next(model.parameters()).dtype == torch.float32 and not next(model.parameters()).requires_grad
    rng = random.Random(seed)
    B, L = rng.randint(1, 3), rng.randint(1, 90)
    ids = torch.randint(0, hf.config.vocab_size, (B, L))
    with torch.no_grad():
        expected = hf(ids).logits
    got = model(ids)
    assert got.shape == (B, L, hf.config.vocab_size)
    assert_logits_match(got, expected, f"{name} B={B} L={L}")


def test_logits_equal_hf_at_large_positions(tmp_path, seed):
    """Explicit positions far from 0 (RoPE tables must match HF's float32 rounding there)."""
    hf = make_hf_checkpoint(tmp_path, seed=seed, max_position_embeddings=8192, rope_theta=1e6)
    model, _ = load_model(tmp_path)
    L = 17
    positions = torch.arange(5000, 5000 + L)[None]
    ids = torch.randint(0, hf.config.vocab_size, (1, L))
    with torch.no_grad():
        expected = hf(ids, position_ids=positions).logits
    assert_logits_match(model(ids, positions), expected, "positions 5000+")


def test_sharded_checkpoint_loads_the_same(tmp_path, seed):
    hf = make_hf_checkpoint(tmp_path / "sharded", seed=seed, max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    model, _ = load_model(tmp_path / "sharded")
    ids = torch.randint(0, hf.config.vocab_size, (2, 11))
    with torch.no_grad():
        assert_logits_match(model(ids), hf(ids).logits, "sharded")


def test_bf16_checkpoint_loads_as_float32(tmp_path, seed):
    """Weights stored in bf16 (as the bundled models are) are computed in float32 on CPU, as HF does
    with dtype=float32."""
    import transformers

    make_hf_checkpoint(tmp_path / "fp32", seed=seed).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    model, _ = load_model(tmp_path / "bf16")
    assert model.config.torch_dtype == "bfloat16" and model.model.embed_tokens.weight.dtype == torch.float32
    ids = torch.randint(0, hf.config.vocab_size, (2, 13))
    with torch.no_grad():
        assert_logits_match(model(ids), hf(ids).logits, "bf16-stored")


def test_bundled_model_matches_hf():
    try:
        path = miniinfer.bundled_model_path("shakespeare")
    except FileNotFoundError:
        pytest.skip("the bundled shakespeare model is not built yet")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model, tokenizer = load_model(path, device="cpu")
    ids = torch.tensor([tokenizer.encode("ROMEO: But, soft! what light through yonder window breaks?")])
    with torch.no_grad():
        assert_logits_match(model(ids), hf(ids).logits, "bundled shakespeare")


def test_logits_indices(small_checkpoint, seed):
    folder, hf = small_checkpoint
    model, _ = load_model(folder)
    ids = torch.randint(0, hf.config.vocab_size, (3, 10))
    full = model(ids)
    rows = torch.tensor([9, 19, 29, 4])
    torch.testing.assert_close(model(ids, logits_indices=rows), full.reshape(-1, full.shape[-1])[rows])


class ContiguousCache:
    """A test AttentionContext for [B, L] batches whose rows all hold the same number of tokens."""

    def __init__(self):
        self.k, self.v = {}, {}

    def attend(self, layer_index, q, k, v, scale):
        if layer_index in self.k:
            k = torch.cat([self.k[layer_index], k], dim=1)
            v = torch.cat([self.v[layer_index], v], dim=1)
        self.k[layer_index], self.v[layer_index] = k, v
        return grouped_query_attention(q, k, v, causal=True, scale=scale)


class PackedCache:
    """A test AttentionContext for packed [T] batches: ``new_lens`` says how many of the T tokens belong
    to each sequence; each sequence keeps its own k/v per layer."""

    def __init__(self, num_seqs):
        self.k = [{} for _ in range(num_seqs)]
        self.v = [{} for _ in range(num_seqs)]
        self.new_lens = []

    def attend(self, layer_index, q, k, v, scale):
        outs = []
        for seq, (qs, ks, vs) in enumerate(zip(q.split(self.new_lens), k.split(self.new_lens), v.split(self.new_lens))):
            cache_k, cache_v = self.k[seq], self.v[seq]
            if layer_index in cache_k:
                ks, vs = torch.cat([cache_k[layer_index], ks]), torch.cat([cache_v[layer_index], vs])
            cache_k[layer_index], cache_v[layer_index] = ks, vs
            outs.append(grouped_query_attention(qs[None], ks[None], vs[None], causal=True, scale=scale)[0])
        return torch.cat(outs)


def test_attention_context_prefill_then_decode(small_checkpoint, seed):
    folder, hf = small_checkpoint
    model, _ = load_model(folder)
    B, P, steps = 2, 7, 5
    ids = torch.randint(0, hf.config.vocab_size, (B, P + steps))
    full = model(ids)
    cache = ContiguousCache()
    logits = [model(ids[:, :P], torch.arange(P).expand(B, P), attention=cache)]
    for t in range(P, P + steps):
        logits.append(model(ids[:, t : t + 1], torch.full((B, 1), t), attention=cache))
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=1e-4, atol=1e-4 * full.abs().max().item())


def test_attention_context_packed(small_checkpoint, seed):
    """Two sequences packed into one [T] batch, in chunks of different sizes, with logits_indices."""
    folder, hf = small_checkpoint
    model, _ = load_model(folder)
    V = hf.config.vocab_size
    seqs = [torch.randint(0, V, (9,)), torch.randint(0, V, (12,))]
    full = [model(s[None])[0] for s in seqs]
    cache = PackedCache(2)
    done = [0, 0]
    for chunk in ([5, 8], [1, 1], [3, 3]):  # prefill, decode, a mixed chunk
        cache.new_lens = chunk
        ids = torch.cat([s[d : d + c] for s, d, c in zip(seqs, done, chunk)])
        positions = torch.cat([torch.arange(d, d + c) for d, c in zip(done, chunk)])
        got = model(ids, positions, attention=cache)
        assert got.shape == (sum(chunk), V)
        for i, (d, c) in enumerate(zip(done, chunk)):
            start = sum(chunk[:i])
            torch.testing.assert_close(got[start : start + c], full[i][d : d + c], rtol=1e-4, atol=1e-4)
        done = [d + c for d, c in zip(done, chunk)]


def test_logits_indices_with_packed_context(small_checkpoint):
    folder, hf = small_checkpoint
    model, _ = load_model(folder)
    ids = torch.randint(0, hf.config.vocab_size, (9,))
    cache = PackedCache(2)
    cache.new_lens = [4, 5]
    positions = torch.cat([torch.arange(4), torch.arange(5)])
    all_rows = model(ids, positions, attention=cache)
    cache = PackedCache(2)
    cache.new_lens = [4, 5]
    last = model(ids, positions, attention=cache, logits_indices=torch.tensor([3, 8]))
    torch.testing.assert_close(last, all_rows[[3, 8]])


def test_forward_argument_errors(small_checkpoint):
    folder, _ = small_checkpoint
    model, _ = load_model(folder)
    with pytest.raises(ValueError, match="positions are required"):
        model(torch.zeros(4, dtype=torch.long), attention=PackedCache(1))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        model(torch.zeros(4, dtype=torch.long))


def test_components_are_used(small_checkpoint, seed):
    """Swapped-in functions run inside the model (no monkey-patching) and equal ones give equal logits."""
    folder, hf = small_checkpoint
    calls = {"rms_norm": 0, "swiglu": 0, "apply_rope": 0, "attention": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    default = Components()
    components = Components(**{name: counting(name, getattr(default, name)) for name in calls})
    model, _ = load_model(folder, components=components)
    reference, _ = load_model(folder)
    ids = torch.randint(0, hf.config.vocab_size, (1, 6))
    torch.testing.assert_close(model(ids), reference(ids))
    layers = hf.config.num_hidden_layers
    assert calls == {"rms_norm": 2 * layers + 1, "swiglu": layers, "apply_rope": layers, "attention": layers}
    sdpa_model, _ = load_model(folder, components=Components(attention=sdpa_attention))
    torch.testing.assert_close(sdpa_model(ids), reference(ids), rtol=1e-5, atol=1e-5)
    broken, _ = load_model(folder, components=Components(swiglu=lambda gate, up: gate * up))
    assert not torch.allclose(broken(ids), reference(ids))


def test_half_precision_loads(small_checkpoint):
    folder, hf = small_checkpoint
    model, _ = load_model(folder, dtype="bfloat16")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.cos.dtype == torch.bfloat16  # as HF: cos/sin in the compute dtype
    ids = torch.randint(0, hf.config.vocab_size, (1, 12))
    with torch.no_grad():
        expected = hf(ids).logits
    got = model(ids)
    assert got.dtype == torch.bfloat16
    span = (expected.max() - expected.min()).item()
    assert (got.float() - expected).abs().max().item() < 0.1 * span
