"""The verify steps' packed forward (CPU): the model's logits up to float rounding, repacked when the
weights change, and the one the engine's verify steps run; and the acceptance-rate estimate of "auto"."""

from __future__ import annotations

import pytest
import torch

from miniinfer.engine import EngineConfig, LLMEngine
from miniinfer.loader import load_model
from miniinfer.models.bundled import bundled_model_path
from miniinfer.speculative.proposers import ContiguousKVContext, DraftKVCache
from miniinfer.speculative.verify_forward import PackedVerifyForward, verify_forward_for


@pytest.fixture(scope="module")
def target():
    torch.set_num_threads(1)
    model, tokenizer = load_model(bundled_model_path("shakespeare"), device="cpu")
    if not PackedVerifyForward.supports(model):
        pytest.skip("this torch build has no oneDNN linear")
    return model, tokenizer


def _logits(forward, model, ids, positions):
    cache = DraftKVCache(model.config, 32, torch.device("cpu"), torch.float32)
    row = cache.allocate_row()
    for layer in range(model.config.num_hidden_layers):  # a cached prefix of 3 tokens
        cache.layer(layer)[0][row, :, :3] = 0.25
        cache.layer(layer)[1][row, :, :3] = -0.5
    with torch.inference_mode():
        return forward(ids, positions, attention=ContiguousKVContext(cache, [row], [3], [ids.shape[1]]))


def test_packed_forward_gives_the_model_logits(target):
    model, _ = target
    ids, positions = torch.randint(0, model.config.vocab_size, (1, 5)), torch.arange(3, 8)[None]
    expected = _logits(model, model, ids, positions)
    packed = PackedVerifyForward(model)
    torch.testing.assert_close(_logits(packed, model, ids, positions), expected, atol=1e-4, rtol=1e-4)
    assert verify_forward_for(model) is verify_forward_for(model)  # one pack per model


def test_packed_forward_follows_in_place_weight_updates(target):
    model, _ = target
    ids, positions = torch.randint(0, model.config.vocab_size, (1, 4)), torch.arange(3, 7)[None]
    packed = verify_forward_for(model)
    weight = model.model.layers[2].mlp.down_proj.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(-3.0)
        assert not packed.current()
        torch.testing.assert_close(_logits(packed, model, ids, positions), _logits(model, model, ids, positions),
                                   atol=1e-4, rtol=1e-4)
        assert packed.current()
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    torch.testing.assert_close(_logits(packed, model, ids, positions), _logits(model, model, ids, positions),
                               atol=1e-4, rtol=1e-4)


def test_engine_verifies_with_the_packed_forward(target):
    model, tokenizer = target
    engine = LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=64, speculative_model="ngram",
                                                      num_speculative_tokens=4))
    assert isinstance(engine.speculator.verify_forward(model), PackedVerifyForward)
    other = torch.nn.Linear(2, 2).double()
    assert verify_forward_for(other) is other  # anything else verifies with its own forward


def test_adaptive_alpha_counts_only_tested_guesses():
    """With the rejections known, α is accepted / (accepted + rejections): the guesses after a rejection
    were never tested. A sequence that keeps accepting 2 of 4 guesses has α ≈ 2/3, not 1/2."""
    from miniinfer.speculative import AdaptiveGamma, expected_tokens_per_step

    adaptive = AdaptiveGamma(max_gamma=8, cost_ratio=0.05)
    for _ in range(60):
        adaptive.observe(4, 2, num_rejected=1)
    assert adaptive.alpha == pytest.approx(2 / 3, abs=1e-3)
    # Unbiased: simulated chains with a true α of 0.75 read 0.75 (accepted / proposed would read ~0.51).
    g = torch.Generator().manual_seed(0)
    adaptive = AdaptiveGamma(max_gamma=8, cost_ratio=0.05, decay=0.999)
    accepted = (torch.rand(3000, 4, generator=g) < 0.75).long().cumprod(1).sum(1).tolist()
    for a in accepted:
        adaptive.observe(4, a, num_rejected=int(a < 4))
    assert adaptive.alpha == pytest.approx(0.75, abs=0.03)
    assert 1 + sum(accepted) / len(accepted) == pytest.approx(expected_tokens_per_step(0.75, 4), rel=0.03)
