"""One request's failure never harms another; bad input is refused before any work; nothing is orphaned.

Each test here reproduces a way the engine once went wrong (a wedged engine, leaked KV blocks,
half-submitted batches, misread prompt dicts, unenforced seat limits, dropped UTF-8 bytes, ...);
the fuzz test at the end drives all of it at random for a bounded time.
"""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch
from engine_helpers import all_blocks_free, finish_all

from miniinfer import LLM, SamplingParams
from miniinfer.components import Components
from miniinfer.engine import EngineConfig, EngineHooks, LLMEngine
from miniinfer.loader import load_model
from miniinfer.sampling import probabilities

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def small_model(small_checkpoint):
    return load_model(small_checkpoint[0])[0]


@pytest.fixture(scope="module")
def llm(checkpoint_with_tokenizer) -> LLM:
    return LLM(checkpoint_with_tokenizer[0], device="cpu", num_kv_blocks=128, block_size=4)


# -- 1. a failing request fails alone ----------------------------------------------------------------

def test_a_request_whose_sampling_fails_ends_with_error_and_the_others_run_on(small_model, small_checkpoint):
    def fragile(logits, params):  # the course's sampler plug-in, broken for one kind of request
        if params.temperature == 0.5:
            raise RuntimeError("boom")
        return probabilities(logits, params)

    model, _ = load_model(small_checkpoint[0], components=Components(probabilities=fragile))
    engine = LLMEngine(model, None, EngineConfig(block_size=4, num_kv_blocks=64))
    good = [engine.add_request([1, 2, 3, i], SamplingParams(temperature=1.0, seed=i, max_tokens=6, ignore_eos=True))
            for i in range(3)]
    bad = engine.add_request([4, 5, 6], SamplingParams(temperature=0.5, max_tokens=6))
    results = finish_all(engine)
    assert results[bad].finish_reason == "error" and "probabilities function" in results[bad].outputs[0].error
    assert all(results[r].finish_reason == "length" and len(results[r].token_ids) == 6 for r in good)
    assert all_blocks_free(engine)
    # and the engine still works afterwards
    again = engine.add_request([1, 2, 3], GREEDY)
    assert finish_all(engine)[again].finish_reason == "length"


def test_nan_weights_fail_the_requests_and_free_everything(small_checkpoint):
    model, _ = load_model(small_checkpoint[0])
    engine = LLMEngine(model, None, EngineConfig(block_size=4, num_kv_blocks=64))
    reference = finish_all(engine)
    ids = [engine.add_request([1, 2, 3, 4, 5], GREEDY) for _ in range(3)]
    weight = model.model.layers[0].mlp.down_proj.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.fill_(float("nan"))
    try:
        results = finish_all(engine)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert reference == {}
    assert all(results[i].finish_reason == "error" and "not finite" in results[i].outputs[0].error for i in ids)
    # Blocks the radix cache kept may hold NaN keys: clear it, then everything must be free.
    engine.radix_cache.clear()
    assert all_blocks_free(engine)
    after = engine.add_request([1, 2, 3, 4, 5], GREEDY)
    assert finish_all(engine)[after].finish_reason == "length"


def test_an_exception_in_the_forward_fails_that_step_only(small_model):
    calls = {"n": 0}

    def flaky_decode(q, k_cache, v_cache, block_tables, seq_lens, scale):
        from miniinfer.kernels.paged_attention import paged_decode_attention_torch

        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("kernel fault")
        return paged_decode_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, scale)

    engine = LLMEngine(small_model, None, EngineConfig(block_size=4, num_kv_blocks=64),
                       hooks=EngineHooks(paged_decode_attention=flaky_decode))
    first = engine.add_request([1, 2, 3], GREEDY)
    results = finish_all(engine)
    assert results[first].finish_reason == "error" and "kernel fault" in results[first].outputs[0].error
    assert all_blocks_free(engine)
    second = engine.add_request([1, 2, 3], GREEDY)
    assert finish_all(engine)[second].finish_reason == "length"


# -- 2. validation ---------------------------------------------------------------------------------------

def test_tiny_temperatures_act_as_greedy(llm):
    greedy = llm.generate("to be", SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    for temperature in (1e-40, 1e-6):
        tiny = llm.generate("to be", SamplingParams(temperature=temperature, max_tokens=10, ignore_eos=True),
                            use_tqdm=False)
        assert tiny[0].token_ids == greedy[0].token_ids


def test_sampling_params_cannot_be_changed_after_construction():
    params = SamplingParams(temperature=0.8)
    with pytest.raises(Exception):  # noqa: B017 - dataclasses.FrozenInstanceError
        params.temperature = -1
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64)
    SamplingParams(seed=2**64 - 1)


def test_the_largest_seed_with_n_2_runs(llm):
    out = llm.generate("to be", SamplingParams(seed=2**64 - 1, n=2, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert [len(o.token_ids) for o in out[0].outputs] == [5, 5]


# -- 3. prompt forms --------------------------------------------------------------------------------------

def test_vllm_prompt_dicts(llm):
    text = llm.generate("ROMEO.\n", GREEDY, use_tqdm=False)[0]
    as_dict = llm.generate({"prompt": "ROMEO.\n"}, GREEDY, use_tqdm=False)[0]
    ids = llm.tokenizer.encode("ROMEO.\n")
    as_ids = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0]
    several = llm.generate([{"prompt": "ROMEO.\n"}, {"prompt_token_ids": ids}], GREEDY, use_tqdm=False)
    assert text.token_ids == as_dict.token_ids == as_ids.token_ids == several[0].token_ids == several[1].token_ids
    assert as_dict.prompt == "ROMEO.\n" and as_dict.prompt_token_ids == ids
    for bad in ({"text": "x"}, {"prompt": "x", "prompt_token_ids": [1]}, {"prompt": 5}, {"prompt_token_ids": "abc"}):
        with pytest.raises(ValueError, match="prompt"):
            llm.generate(bad, GREEDY, use_tqdm=False)


def test_numpy_and_tensor_prompts_and_bad_prompt_types(llm):
    ids = llm.tokenizer.encode("ROMEO.\n")
    expected = llm.generate(ids, GREEDY, use_tqdm=False)[0].token_ids
    assert llm.generate(np.array(ids), GREEDY, use_tqdm=False)[0].token_ids == expected
    assert llm.generate(torch.tensor(ids), GREEDY, use_tqdm=False)[0].token_ids == expected
    for bad in (None, 5, 3.5, [1.0, 2.0], [[1, 2], None], ["ok", 7]):
        with pytest.raises((ValueError, TypeError)):
            llm.generate(bad, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="index 2"):
        llm.generate("ab\ud800c", GREEDY, use_tqdm=False)
    assert all_blocks_free(llm.engine) and not llm.engine.requests


# -- 4. orphans and aborts --------------------------------------------------------------------------------

def test_closing_a_stream_aborts_its_requests_and_frees_their_blocks(llm):
    stream = llm.stream(["ROMEO.\n", "JULIET.\n"], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        next(stream)
    assert llm.engine.scheduler.running
    stream.close()
    assert all_blocks_free(llm.engine) and not llm.engine.requests
    # a later stream runs only its own request
    outputs = [output for _, output in llm.stream("HAMLET.\n", GREEDY)]
    assert outputs[-1].finished and len(outputs[-1].token_ids) == 8
    assert not llm.engine.has_unfinished_requests()


def test_a_dropped_stream_aborts_too(llm):
    import gc

    stream = llm.stream("ROMEO.\n", SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    next(stream)
    del stream
    gc.collect()
    assert all_blocks_free(llm.engine) and not llm.engine.requests


def test_abort_gives_a_final_output_with_reason_abort(llm):
    engine = llm.engine
    request_id = engine.add_request("ROMEO.\n", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert llm.abort(request_id)
    assert not llm.abort(request_id)  # already gone
    outputs = engine.step()
    assert [o.request_id for o in outputs] == [request_id]
    assert outputs[0].finished and outputs[0].finish_reason == "abort"
    assert all_blocks_free(engine) and not engine.has_unfinished_requests()


def test_an_interrupted_generate_leaves_nothing_behind(llm, monkeypatch):
    engine = llm.engine
    real_step, calls = engine.step, {"n": 0}

    def interrupted_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(engine, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["ROMEO.\n", "JULIET.\n"], SamplingParams(max_tokens=40, ignore_eos=True), use_tqdm=False)
    monkeypatch.undo()
    assert all_blocks_free(engine) and not engine.requests and not engine.has_unfinished_requests()


# -- 5. all-or-nothing submission ---------------------------------------------------------------------------

def test_a_bad_prompt_in_a_batch_queues_nothing(llm):
    engine = llm.engine
    with pytest.raises(ValueError, match="prompt 1"):
        llm.generate(["ROMEO.\n", "", "JULIET.\n"], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt 2"):
        llm.generate(["ROMEO.\n", "A", [10**9]], GREEDY, use_tqdm=False)
    assert not engine.requests and not engine.has_unfinished_requests()
    kept = engine.add_request("ROMEO.\n", GREEDY, request_id="taken")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_requests(["A", "B"], [GREEDY, GREEDY], request_ids=["fresh", "taken"])
    assert set(engine.requests) == {kept}
    finish_all(engine)


# -- 6. seats for n > 1 ---------------------------------------------------------------------------------------

def test_max_num_seqs_holds_with_parallel_sampling(small_model):
    engine = LLMEngine(small_model, None, EngineConfig(block_size=4, num_kv_blocks=256, max_num_seqs=8))
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine.add_request([1, 2, 3], SamplingParams(n=50, max_tokens=4))
    for i in range(5):
        engine.add_request([1, 2, 3 + i], SamplingParams(n=3, max_tokens=6, seed=i, ignore_eos=True))
    most = 0
    results = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                results[output.request_id] = output
        most = max(most, sum(seq.num_seats for seq in engine.scheduler.running))
        assert len(engine.scheduler.running) <= 8
    assert most <= 8 and len(results) == 5
    assert all(len(o.outputs) == 3 and all(len(c.token_ids) == 6 for c in o.outputs) for o in results.values())


# -- 8. early, clear errors ------------------------------------------------------------------------------------

def test_device_and_backend_errors_come_at_construction(small_checkpoint):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            LLM(small_checkpoint[0], device="cuda")
        with pytest.raises(ValueError, match="cuda"):
            LLM(small_checkpoint[0], device="cpu", attention_backend="cuda")
    with pytest.raises(ValueError, match="meta"):
        LLM(small_checkpoint[0], device="meta")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(small_checkpoint[0], device="cpu", max_model_len=10**6)


# -- 9. held-back bytes before a stop ---------------------------------------------------------------------------

def test_an_incomplete_character_before_eos_is_flushed(llm):
    tokenizer = llm.tokenizer
    partial = next(t for t in range(tokenizer.vocab_size) if tokenizer.decode([t]) == "\ufffd")
    eos = next(iter(llm.engine.eos_token_ids))
    # min_tokens keeps EOS out of the first step, the bias makes the partial byte win it; then EOS wins.
    params = SamplingParams(temperature=0.0, max_tokens=5, min_tokens=1, logit_bias={partial: 50.0, eos: 100.0})
    for stream in (False, True):
        if stream:
            final = [o for _, o in llm.stream("to be", params)][-1]
        else:
            final = llm.generate("to be", params, use_tqdm=False)[0]
        assert final.token_ids == [partial, eos] and final.finish_reason == "stop"
        assert final.text == tokenizer.decode([partial]) == "\ufffd"


# -- the fuzz test -------------------------------------------------------------------------------------------------

def test_fuzz_random_requests_aborts_and_dropped_streams(small_model, seed):
    rng = random.Random(seed)
    vocab = small_model.config.vocab_size
    engine = LLMEngine(small_model, None, EngineConfig(block_size=4, num_kv_blocks=96, max_num_seqs=6,
                                                       max_num_batched_tokens=32, max_model_len=128))

    def random_params():
        choice = rng.random()
        if choice < 0.1:  # invalid on purpose
            return dict(temperature=-1.0) if rng.random() < 0.5 else dict(top_p=0.0)
        return dict(temperature=rng.choice([0.0, 1e-9, 0.7, 1.0, 1.5]), top_k=rng.choice([0, 1, 5, 50]),
                    top_p=rng.choice([1.0, 0.9, 0.3]), min_p=rng.choice([0.0, 0.1]), n=rng.choice([1, 1, 2, 3]),
                    max_tokens=rng.randint(1, 20), seed=rng.choice([None, rng.randrange(2**64)]),
                    repetition_penalty=rng.choice([1.0, 1.3]), presence_penalty=rng.choice([0.0, 0.5]),
                    stop_token_ids=rng.choice([None, [rng.randrange(vocab)]]), logprobs=rng.choice([None, 0, 3]),
                    min_tokens=rng.choice([0, 0, 2]))

    submitted, finished, rejected = set(), {}, 0
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline:
        action = rng.random()
        if action < 0.35:
            prompt = [rng.randrange(vocab + (5 if rng.random() < 0.05 else 0)) for _ in range(rng.randint(0, 70))]
            try:
                params = SamplingParams(**random_params())
                submitted.add(engine.add_request(prompt, params))
            except ValueError:
                rejected += 1
        elif action < 0.45 and engine.requests:
            engine.abort_request(rng.choice(sorted(engine.requests)))
        for output in engine.step():
            if output.finished:
                assert output.request_id not in finished, "a request finished twice"
                finished[output.request_id] = output
    for output in finish_all(engine).values():
        finished[output.request_id] = output
    assert set(finished) == submitted, "every request ends exactly once"
    for output in finished.values():
        for completion in output.outputs:
            assert completion.finish_reason in ("stop", "length", "abort"), completion
    assert rejected > 0 and all_blocks_free(engine)
    # A fresh greedy generation still equals the plain forward's.
    prompt = [rng.randrange(vocab) for _ in range(9)]
    request_id = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    got = finish_all(engine)[request_id].token_ids
    tokens = list(prompt)
    with torch.inference_mode():
        for _ in range(6):
            tokens.append(int(small_model(torch.tensor([tokens]))[0, -1].argmax()))
    assert got == tokens[len(prompt):]


@pytest.mark.parametrize("num_kv_blocks", [12, 16, 20])
def test_a_tiny_pool_full_of_cached_prefixes_never_stops_the_engine(small_model, num_kv_blocks):
    """Regression: with every block in the prefix cache and each waiting request pinning its own cached
    prefix at admission, nothing was evictable and nothing admissible — the engine raised "could not
    schedule anything". Requests share prefixes (two identical prompts, a common head) and preemption
    returns their blocks to the cache, which is what fills it."""
    rng = random.Random(7)
    vocab = small_model.config.vocab_size
    head = [rng.randrange(vocab) for _ in range(6)]
    prompts = [head[:2], head + [rng.randrange(vocab) for _ in range(12)], head + [5, 6, 7, 8], head[:2],
               [rng.randrange(vocab) for _ in range(9)]]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    def generate(config):
        engine = LLMEngine(small_model, None, config)
        ids = [engine.add_request(p, params) for p in prompts]
        outputs = finish_all(engine)
        return [outputs[i].token_ids for i in ids], engine

    roomy, _ = generate(EngineConfig(block_size=4, num_kv_blocks=256))
    tight, engine = generate(EngineConfig(block_size=4, num_kv_blocks=num_kv_blocks))
    assert tight == roomy
    assert engine.scheduler.num_preemptions > 0  # the pool really was too small for the batch
    assert all_blocks_free(engine)
