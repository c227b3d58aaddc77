"""The engine's packed forward on a CPU (miniinfer.engine.packed_forward): the model's logits up to float
rounding, repacked when the weights change, the model's own forward once the model changes under it, and
the one every eager step (prefill, decode, verify) runs; and the acceptance-rate estimate of "auto"."""

from __future__ import annotations

import pytest
import torch

from miniinfer.engine import EngineConfig, LLMEngine
from miniinfer.engine.packed_forward import PackedForward, packed_forward_for
from miniinfer.loader import load_model
from miniinfer.models.bundled import bundled_model_path
from miniinfer.speculative.proposers import ContiguousKVContext, DraftKVCache


@pytest.fixture(scope="module")
def target():
    torch.set_num_threads(1)
    model, tokenizer = load_model(bundled_model_path("shakespeare"), device="cpu")
    if not PackedForward.supports(model):
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
    packed = PackedForward(model)
    torch.testing.assert_close(_logits(packed, model, ids, positions), expected, atol=1e-4, rtol=1e-4)
    assert packed_forward_for(model) is packed_forward_for(model)  # one pack per model


def test_packed_forward_follows_in_place_weight_updates(target):
    model, _ = target
    ids, positions = torch.randint(0, model.config.vocab_size, (1, 4)), torch.arange(3, 7)[None]
    packed = packed_forward_for(model)
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


def test_engine_steps_run_the_packed_forward(target):
    """With cpu_packed_weights=True every eager CPU step (verify included) runs the packed forward; the
    greedy text is the unpacked engine's."""
    from miniinfer.sampling import SamplingParams

    model, tokenizer = target
    engine = LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=64, speculative_model="ngram",
                                                      num_speculative_tokens=4, cpu_packed_weights=True))
    assert isinstance(engine.runner.forward, PackedForward)
    assert engine.runner.forward is packed_forward_for(model)
    plain = LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=64, cpu_packed_weights=False))
    assert plain.runner.forward is model
    texts = []
    for e in (engine, plain):
        e.add_request("ROMEO:\n", SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), stream=False)
        while e.has_unfinished_requests():
            texts += [out.outputs[0].token_ids for out in e.step() if out.finished]
    assert texts[0] == texts[1]
    assert packed_forward_for(torch.nn.Linear(2, 2).double()) is None  # anything else: the model's own forward


def test_packed_forward_steps_aside_when_the_model_changes(target):
    """A swapped layer (quantize_model after the engine was built), a forward hook, a wrapped forward, a
    replaced ``runner.model``: the model's own forward runs."""
    model, tokenizer = target
    engine = LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=64, cpu_packed_weights=True))
    packed = engine.runner.forward
    assert isinstance(packed, PackedForward) and packed.usable()
    mlp = model.model.layers[1].mlp
    original = mlp.down_proj
    mlp.down_proj = torch.nn.Linear(original.in_features, original.out_features, bias=False)
    try:
        assert not packed.usable()
    finally:
        mlp.down_proj = original
    assert packed.usable()
    handle = model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda *args: None)
    try:
        assert not packed.usable()
    finally:
        handle.remove()
    assert packed.usable()
    model.forward = model.forward  # an instance attribute, as a wrapper that times the forward sets
    try:
        assert not packed.usable()
    finally:
        del model.forward
    assert packed.usable()
    wrapper = lambda *args, **kwargs: model(*args, **kwargs)  # noqa: E731
    engine.runner.model = wrapper
    assert engine.runner.forward is wrapper


@pytest.mark.parametrize("value", [None, 1, 0, "yes", "Auto", "packed"])
def test_cpu_packed_weights_accepts_true_false_or_auto(value):
    assert EngineConfig().cpu_packed_weights == "auto"
    for ok in (True, False, "auto"):
        EngineConfig(cpu_packed_weights=ok)
    with pytest.raises(ValueError, match="cpu_packed_weights must be True, False or 'auto'"):
        EngineConfig(cpu_packed_weights=value)


def test_auto_measures_once_and_keeps_the_faster_forward(target, monkeypatch):
    """"auto" (the default) times both forwards once per model shape (cached for the process), records the
    decision and both timings on the runner, and runs the path that measured faster; the greedy text is
    the same on whichever path it picks."""
    from miniinfer.engine import packed_forward as pf
    from miniinfer.sampling import SamplingParams

    model, tokenizer = target
    monkeypatch.setattr(pf, "_CHOICES", {})
    engine = LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=64))
    choice = engine.runner.packed_weights_choice
    assert set(choice) >= {"packed", "linear_ms", "packed_ms", "ratio", "measure_ms", "cached"}
    assert sorted(choice["linear_ms"]) == sorted(choice["packed_ms"]) == [1, 16]
    assert all(v > 0 for v in (*choice["linear_ms"].values(), *choice["packed_ms"].values()))
    assert choice["packed"] == (choice["ratio"] < 1) and not choice["cached"]
    assert isinstance(engine.runner.forward, PackedForward) if choice["packed"] else engine.runner.forward is model
    assert choice["measure_ms"] < 2000  # the bundled model: ~0.2 s on a 2-core CPU, packing included

    def fail(*args, **kwargs):
        raise AssertionError("measured twice")

    monkeypatch.setattr(pf, "measure_packed_forward", fail)
    again = LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=64))
    assert again.runner.packed_weights_choice == {**choice, "cached": True}
    assert type(again.runner.forward) is type(engine.runner.forward)
    plain = LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=64, cpu_packed_weights=False))
    assert plain.runner.packed_weights_choice is None and plain.runner.forward is model
    texts = []
    for e in (again, plain):
        e.add_request("JULIET:\n", SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), stream=False)
        while e.has_unfinished_requests():
            texts += [out.outputs[0].token_ids for out in e.step() if out.finished]
    assert texts[0] == texts[1]


@pytest.mark.parametrize("packed_faster", [True, False])
def test_auto_follows_the_measurement(target, monkeypatch, packed_faster):
    from miniinfer.engine import packed_forward as pf

    model, tokenizer = target
    monkeypatch.setattr(pf, "_CHOICES", {})
    fast, slow = {1: 1e-4, 16: 2e-4}, {1: 2e-4, 16: 3e-4}
    monkeypatch.setattr(pf, "measure_packed_forward", lambda model, packed: {
        "linear": slow if packed_faster else fast, "packed": fast if packed_faster else slow})
    engine = LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=64, cpu_packed_weights="auto"))
    assert engine.runner.packed_weights_choice["packed"] is packed_faster
    assert engine.runner.packed_weights_choice["linear_ms"][1] == (0.2 if packed_faster else 0.1)
    if packed_faster:
        assert engine.runner.forward is packed_forward_for(model)
    else:
        assert engine.runner.forward is model
    # A different thread count is a different decision (measured again).
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert not LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=64)).runner.packed_weights_choice["cached"]
    finally:
        torch.set_num_threads(threads)
    assert LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=64)).runner.packed_weights_choice["cached"]


def test_auto_does_not_measure_where_packing_does_not_apply(monkeypatch):
    from miniinfer.engine import packed_forward as pf

    monkeypatch.setattr(pf, "measure_packed_forward", lambda *args: (_ for _ in ()).throw(AssertionError))
    forward, choice = pf.choose_packed_forward(torch.nn.Linear(2, 2).double())
    assert forward is None and choice["packed"] is False and "reason" in choice


def test_llm_passes_cpu_packed_weights():
    from miniinfer import LLM

    llm = LLM(cpu_packed_weights=False, num_kv_blocks=32, device="cpu")
    assert llm.engine.runner.packed_weights_choice is None and llm.engine.runner.forward is llm.engine.runner.model
    with pytest.raises(ValueError, match="cpu_packed_weights"):
        LLM(cpu_packed_weights="sometimes", num_kv_blocks=32, device="cpu")


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
