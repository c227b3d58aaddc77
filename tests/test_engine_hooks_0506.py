"""Chapters 05–06: the reference functions behind the KV cache, the generation loop and the engine's
batch packing and step plan; their hooks are really called and change nothing when they hold the
reference; the course checks pass on the references and catch typical mistakes."""

from __future__ import annotations

import random

import pytest
import torch

from miniinfer.course import check
from miniinfer.course.checking import CheckFailed, NotImplementedYet
from miniinfer.engine import EngineConfig, EngineHooks, LLMEngine
from miniinfer.engine.model_runner import kv_bytes_per_block, pack_batch
from miniinfer.engine.scheduler import plan_step
from miniinfer.generate import generate, prefill_and_decode
from miniinfer.kv_cache import KVCache, attend_with_cache, kv_bytes_per_token
from miniinfer.loader import load_model
from miniinfer.sampling import SamplingParams


@pytest.fixture(scope="module")
def model(small_checkpoint):
    return load_model(small_checkpoint[0])[0]


def counting(fn):
    """Wrap ``fn``, counting calls."""
    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        return fn(*args, **kwargs)

    wrapper.calls = 0
    return wrapper


def run(engine: LLMEngine, prompts, params) -> list[list[int]]:
    ids = [engine.add_request(p, params) for p in prompts]
    done = {o.request_id: o.outputs[0].token_ids for o in engine.stream() if o.finished}
    return [done[i] for i in ids]


# -- chapter 05 ------------------------------------------------------------------------------------

def test_kv_bytes_per_token_matches_the_cache_and_the_pool(model):
    config = model.config
    per_token = kv_bytes_per_token(config, torch.float32)
    assert per_token == 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    cache = KVCache.for_model(model, batch_size=3, max_len=17)
    assert cache.nbytes() == 3 * 17 * per_token
    assert kv_bytes_per_block(config, 16, torch.bfloat16) == 16 * per_token // 2


def test_cache_step_hook_is_called_and_changes_nothing(model):
    rng = random.Random(0)
    prompts = [[rng.randrange(model.config.vocab_size) for _ in range(n)] for n in (5, 12)]
    step = counting(attend_with_cache)
    logits = []
    for fn in (step, None):
        cache = KVCache.for_model(model, batch_size=2, max_len=16, attend_with_cache=fn)
        positions = cache.set_padding([5, 12])
        padded = torch.tensor([[0] * 7 + prompts[0], prompts[1]])
        with torch.inference_mode():
            first = model(padded, positions, attention=cache)[:, -1]
            second = model(torch.tensor([[3], [4]]), torch.tensor([[5], [12]]), attention=cache)[:, -1]
        logits.append(torch.stack([first, second]))
    assert step.calls == 2 * model.config.num_hidden_layers
    torch.testing.assert_close(logits[0], logits[1])
    # Unpadded rows: the reference step gives the model's own attention component's result too.
    ids = torch.tensor([prompts[1]])
    outs = []
    for fn in (attend_with_cache, None):
        cache = KVCache.for_model(model, 1, 20, attend_with_cache=fn)
        with torch.inference_mode():
            outs.append(model(ids, torch.arange(12)[None], attention=cache))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_prefill_and_decode_is_generate_and_feeds_one_token_per_step(model):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    shapes = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def forward(self, ids, positions=None, attention=None, logits_indices=None):
            shapes.append((tuple(ids.shape), positions.flatten().tolist()))
            return self.inner(ids, positions, attention=attention, logits_indices=logits_indices)

    cache = KVCache.for_model(model, 1, len(prompt) + 9)  # exactly enough: the last token is never run
    out = prefill_and_decode(Spy(), cache, prompt, 10, lambda logits: int(logits.argmax()))
    assert out == generate(model, prompt, params) == generate(model, prompt, params, use_cache=False)
    assert shapes[0] == ((1, 8), list(range(8)))
    assert shapes[1:] == [((1, 1), [8 + i]) for i in range(9)]
    # EOS ends the loop right after it (kept), and generate's sampling path goes through it too.
    eos = out[4]
    assert prefill_and_decode(model, KVCache.for_model(model, 1, 30), prompt, 10, lambda x: int(x.argmax()),
                              {eos}) == out[:out.index(eos) + 1]
    sampled = SamplingParams(temperature=0.9, top_k=20, max_tokens=7, seed=11, ignore_eos=True)
    assert generate(model, prompt, sampled) == generate(model, prompt, sampled, use_cache=False)


# -- chapter 06 ------------------------------------------------------------------------------------

def test_pack_batch_layout():
    token_ids = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11]]
    # a decode (4 computed, 1 new), a whole prompt, a first chunk of 2 of 4 tokens
    packed = pack_batch(token_ids, [4, 0, 0], [1, 2, 2])
    assert packed == ([5, 6, 7, 8, 9], [4, 0, 1, 0, 1], [0, 1, 3, 5], [5, 2, 2], [0, 2])


@pytest.mark.parametrize("chunked", [True, False])
def test_plan_step_examples(chunked):
    # Decodes first; then the queue in order while budget and seats last.
    plan = plan_step([1, 1, 7], [10, 2], 12, 8, chunked)
    assert plan == ([1, 1, 7, 3, 0] if chunked else [1, 1, 7, 0, 0])
    assert plan_step([1, 1], [2, 2, 2], 100, 3, chunked) == [1, 1, 2, 0, 0]   # one seat left
    assert plan_step([5], [4], 3, 4, chunked) == [3, 0]                        # running takes all


@pytest.mark.parametrize("config", [
    dict(block_size=4, num_kv_blocks=200, max_num_seqs=3, max_num_batched_tokens=16),
    # a pool too small for everyone: preemptions interleave with the plan
    dict(block_size=4, num_kv_blocks=24, max_num_batched_tokens=12, enable_prefix_caching=False),
    dict(block_size=4, num_kv_blocks=200, max_num_batched_tokens=48, enable_chunked_prefill=False),
])
def test_engine_hooks_are_called_and_change_nothing(model, config):
    rng = random.Random(2)
    prompts = [[rng.randrange(model.config.vocab_size) for _ in range(rng.randint(1, 40))] for _ in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    pack, plan = counting(pack_batch), counting(plan_step)
    plain = LLMEngine(model, None, EngineConfig(**config))
    hooked = LLMEngine(model, None, EngineConfig(**config), hooks=EngineHooks(pack_batch=pack, plan_step=plan))
    assert run(hooked, prompts, params) == run(plain, prompts, params)
    steps = hooked.stats()["num_steps"]
    assert steps == plain.stats()["num_steps"]
    assert hooked.stats()["num_preemptions"] == plain.stats()["num_preemptions"]
    assert pack.calls == steps and plan.calls >= steps
    # A hook may return tensors instead of lists.
    tensors = EngineHooks(pack_batch=lambda *a: tuple(torch.tensor(x) for x in pack_batch(*a)))
    assert run(LLMEngine(model, None, EngineConfig(**config), hooks=tensors), prompts, params) == \
        run(LLMEngine(model, None, EngineConfig(**config)), prompts, params)


def test_a_bad_plan_is_refused_with_a_clear_error(model):
    greedy = EngineHooks(plan_step=lambda running, waiting, budget, seats, chunked: [n for n in running + waiting])
    engine = LLMEngine(model, None, EngineConfig(block_size=4, num_kv_blocks=100, max_num_batched_tokens=8),
                       hooks=greedy)
    engine.add_request(list(range(1, 30)), SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="plan_step"):
        engine.step()


def test_last_step_records_what_ran(model):
    engine = LLMEngine(model, None, EngineConfig(block_size=4, num_kv_blocks=100, max_num_batched_tokens=8))
    engine.add_request(list(range(1, 21)), SamplingParams(max_tokens=3, ignore_eos=True), request_id="long")
    engine.step()
    engine.add_request([5, 6], SamplingParams(max_tokens=3, ignore_eos=True), request_id="short")
    kinds = []
    while engine.has_unfinished_requests():
        engine.step()
        kinds.append([(e.request_id, e.num_prefill, e.num_new) for e in engine.runner.last_step])
    assert kinds[0] == [("long", 8, 8)]                       # the second chunk fills the budget
    assert kinds[1] == [("long", 4, 4), ("short", 2, 2)]      # the last chunk, then the short prompt
    assert kinds[2] == [("long", 0, 1), ("short", 0, 1)]      # two decodes


# -- the course checks ---------------------------------------------------------------------------

def test_checks_pass_on_the_references():
    check.kv_bytes_per_token(kv_bytes_per_token)
    check.attend_with_cache(attend_with_cache)
    check.prefill_and_decode(prefill_and_decode)
    check.pack_batch(pack_batch)
    check.plan_step(plan_step)


def test_checks_report_stubs_and_catch_mistakes():
    def stub(*args, **kwargs):
        raise NotImplementedError("Exercise 6.1: implement `pack_batch`")

    with pytest.raises(NotImplementedYet):
        check.pack_batch(stub)

    def positions_from_zero(token_ids, num_computed, num_new):
        packed = pack_batch(token_ids, num_computed, num_new)
        return packed[0], [p for n in num_new for p in range(n)], *packed[2:]

    with pytest.raises(CheckFailed, match="continue from num_computed"):
        check.pack_batch(positions_from_zero)

    with pytest.raises(CheckFailed, match="chunked prefill"):
        check.plan_step(lambda r, w, b, m, chunked: plan_step(r, w, b, m, True))

    def no_values(config, dtype):
        return kv_bytes_per_token(config, dtype) // 2

    with pytest.raises(CheckFailed, match="values too"):
        check.kv_bytes_per_token(no_values)

    def writes_a_copy(k_cache, v_cache, start, q, k, v, scale, key_padding_mask=None):
        return attend_with_cache(k_cache.clone(), v_cache.clone(), start, q, k, v, scale, key_padding_mask)

    with pytest.raises(CheckFailed, match="unchanged"):
        check.attend_with_cache(writes_a_copy)

    def runs_the_last_token_too(model, cache, prompt_ids, max_new_tokens, next_token, eos_token_ids=frozenset()):
        out = prefill_and_decode(model, cache, prompt_ids, max_new_tokens, next_token, eos_token_ids)
        model(torch.tensor([[out[-1]]]), torch.tensor([[cache.length]]), attention=cache)
        return out

    with pytest.raises(CheckFailed, match="last token"):
        check.prefill_and_decode(runs_the_last_token_too)
