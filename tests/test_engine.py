"""The engine against the plain forward: batching, chunking, paging, preemption, prefix caching,
parallel sampling and streaming must never change what a request generates."""

from __future__ import annotations

import random

import pytest
import torch

from miniinfer.engine import EngineConfig, LLMEngine
from miniinfer.loader import load_model
from miniinfer.sampler import derive_seed, uniform_from_seed_reference
from miniinfer.sampling import SamplingParams, probabilities


@pytest.fixture(scope="module")
def model_and_tokenizer(checkpoint_with_tokenizer):
    folder, _ = checkpoint_with_tokenizer
    return load_model(folder)


@pytest.fixture(scope="module")
def small_model(small_checkpoint):
    folder, _ = small_checkpoint
    return load_model(folder)[0]


@torch.inference_mode()
def reference_generate(model, prompt: list[int], params: SamplingParams, index: int = 0) -> list[int]:
    """The oracle: re-run the plain forward over the whole sequence for every token (no cache), take the
    per-row reference distribution, and draw with the engine's documented random stream: the
    ``step``-th uniform of completion ``index``'s stream, inverted through the CDF in vocabulary order."""
    stream = derive_seed(params.seed if params.seed is not None else 0, index)
    tokens = list(prompt)
    for step in range(params.max_tokens):
        logits = model(torch.tensor([tokens]))[0, -1].float()
        if params.greedy:
            tokens.append(int(logits.argmax()))
            continue
        cdf = probabilities(logits, params).double().cumsum(0)
        u = uniform_from_seed_reference(stream, step)
        tokens.append(int(torch.searchsorted(cdf, u * cdf[-1], right=True)))
    return tokens[len(prompt):]


def run_engine(engine: LLMEngine, prompts, params, arrivals=None) -> dict[int, list[int]]:
    """Feed prompts (optionally some only after a number of steps), step to the end, collect outputs."""
    arrivals = arrivals or [0] * len(prompts)
    pending = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    ids, results, step = {}, {}, 0
    while pending or engine.has_unfinished_requests():
        while pending and arrivals[pending[0]] <= step:
            index = pending.pop(0)
            ids[engine.add_request(prompts[index], params[index] if isinstance(params, list) else params)] = index
        for output in engine.step():
            if output.finished:
                results[ids[output.request_id]] = output.token_ids
        step += 1
    return results


def random_prompts(rng, count, vocab, lengths=(1, 60)):
    return [[rng.randrange(vocab) for _ in range(rng.randint(*lengths))] for _ in range(count)]


@pytest.mark.parametrize("chunked", [True, False])
def test_batched_greedy_equals_each_prompts_own_greedy(small_model, chunked):
    rng = random.Random(1)
    prompts = random_prompts(rng, 7, small_model.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    engine = LLMEngine(small_model, None, EngineConfig(block_size=4, num_kv_blocks=200, max_num_seqs=4,
                                                       max_num_batched_tokens=64 if not chunked else 16,
                                                       enable_chunked_prefill=chunked))
    # Requests arrive while others run: three at once, the rest a few steps later.
    outputs = run_engine(engine, prompts, params, arrivals=[0, 0, 0, 2, 3, 5, 9])
    for index, prompt in enumerate(prompts):
        assert outputs[index] == reference_generate(small_model, prompt, params), f"prompt {index}"
    stats = engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"], "every block is free again"
    assert engine.block_manager.num_free_blocks + engine.radix_cache.num_evictable_blocks() == 200


def test_tiny_pool_preempts_and_changes_no_output(small_model):
    rng = random.Random(2)
    prompts = random_prompts(rng, 6, small_model.config.vocab_size, lengths=(20, 40))
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    roomy = LLMEngine(small_model, None, EngineConfig(block_size=4, num_kv_blocks=400))
    tiny = LLMEngine(small_model, None, EngineConfig(block_size=4, num_kv_blocks=24, enable_prefix_caching=False))
    expected = run_engine(roomy, prompts, params)
    got = run_engine(tiny, prompts, params)
    assert got == expected
    assert tiny.stats()["num_preemptions"] > 0, "the pool was meant to be too small for all at once"
    assert tiny.block_manager.num_free_blocks == 24
    assert all(count == 0 for count in tiny.block_manager.ref_counts)


def test_prefix_cache_changes_nothing_and_hits_the_shared_prefix(small_model):
    rng = random.Random(3)
    vocab = small_model.config.vocab_size
    system = [rng.randrange(vocab) for _ in range(48)]           # 12 full blocks of 4
    prompts = [system + [rng.randrange(vocab) for _ in range(rng.randint(1, 10))] for _ in range(5)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    plain = LLMEngine(small_model, None, EngineConfig(block_size=4, num_kv_blocks=300, enable_prefix_caching=False))
    cached = LLMEngine(small_model, None, EngineConfig(block_size=4, num_kv_blocks=300, max_num_seqs=1))
    assert run_engine(cached, prompts, params) == run_engine(plain, prompts, params)
    stats = cached.stats()
    # One at a time (max_num_seqs=1): the first request computes the system prompt, the four others reuse it.
    assert stats["prefix_cache_hit_tokens"] == 4 * 48
    assert stats["prefill_tokens_computed"] == sum(len(p) for p in prompts) - 4 * 48
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_seeded_sampling_does_not_depend_on_batch_composition(small_model):
    rng = random.Random(4)
    prompts = random_prompts(rng, 5, small_model.config.vocab_size)
    params = [SamplingParams(temperature=0.9, top_k=20, top_p=0.9, max_tokens=10, seed=100 + i, ignore_eos=True)
              for i in range(5)]
    together = run_engine(LLMEngine(small_model, None, EngineConfig(block_size=8, num_kv_blocks=100)), prompts, params)
    for index in (0, 3):
        alone = run_engine(LLMEngine(small_model, None, EngineConfig(block_size=8, num_kv_blocks=100)),
                           [prompts[index]], [params[index]])
        assert alone[0] == together[index]
        assert together[index] == reference_generate(small_model, prompts[index], params[index])


def test_parallel_sampling_shares_the_prompt_and_copy_on_write_isolates_siblings(small_model):
    rng = random.Random(5)
    prompt = [rng.randrange(small_model.config.vocab_size) for _ in range(10)]  # ends mid-block: siblings share it
    engine = LLMEngine(small_model, None, EngineConfig(block_size=4, num_kv_blocks=64))
    params = SamplingParams(temperature=1.0, max_tokens=9, seed=7, n=3, ignore_eos=True)
    engine.add_request(prompt, params)
    shared_seen = False
    final = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            final = output
        seqs = engine.scheduler.running
        if len(seqs) == 3 and not shared_seen:
            shared_seen = seqs[0].block_table[:2] == seqs[1].block_table[:2] == seqs[2].block_table[:2]
    assert shared_seen, "the siblings should share the prompt's full blocks"
    assert engine.stats()["prefill_tokens_computed"] == len(prompt), "the prompt is computed once"
    assert len(final.outputs) == 3 and final.finished
    # Each sibling equals an independent run with its own seed: a write leaking between siblings through a
    # shared block would change the continuations.
    for completion in final.outputs:
        assert completion.token_ids == reference_generate(small_model, prompt, params, completion.index)
    assert len({tuple(c.token_ids) for c in final.outputs}) > 1
    assert engine.block_manager.num_free_blocks + engine.radix_cache.num_evictable_blocks() == 64


def test_streaming_text_matches_final_text_and_stop_strings(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=4, num_kv_blocks=200))
    first = engine.add_request("to be or not", SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    pieces, finals, added = {}, {}, False
    while engine.has_unfinished_requests():
        for output in engine.step():
            pieces.setdefault(output.request_id, []).append(output.outputs[0].new_text)
            if output.finished:
                finals[output.request_id] = output
        if not added:  # a request joins while another is running
            second = engine.add_request([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
            added = True
    for request_id, output in finals.items():
        assert "".join(pieces[request_id]) == output.text
    text = finals[first].text
    assert finals[second].token_ids and len(finals[second].token_ids) == 5
    # A stop string taken from the greedy continuation ends generation just before it.
    if len(text) > 6:
        stop = text[3:6]
        engine.add_request("to be or not", SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=stop))
        stopped = [o for o in engine.stream() if o.finished][0]
        assert stopped.text == text[:text.find(stop)] and stopped.finish_reason == "stop"


def test_bad_requests_are_rejected_before_any_work(small_model):
    engine = LLMEngine(small_model, None, EngineConfig(block_size=4, num_kv_blocks=20, max_model_len=64))
    with pytest.raises(ValueError, match="64"):
        engine.add_request(list(range(64)))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([1, small_model.config.vocab_size])
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("text needs a tokenizer")
    with pytest.raises(ValueError, match="pool holds 80"):
        LLMEngine(small_model, None, EngineConfig(block_size=4, num_kv_blocks=20)).add_request(
            [1] * 50, SamplingParams(max_tokens=60))
    for bad in (dict(block_size=0), dict(max_num_seqs=-1), dict(attention_backend="magic"),
                dict(gpu_memory_utilization=1.5), dict(enable_prefix_caching="yes")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineConfig(**bad)
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("backend", ["torch", "sdpa", "triton", "components"])
def test_every_attention_backend_gives_the_same_greedy_outputs(small_model, backend):
    """The paged-attention backends are interchangeable: the torch reference, gather + SDPA (CPU decode
    default), the Triton kernels (interpreted on the CPU) and the model's own attention component."""
    rng = random.Random(6)
    prompts = random_prompts(rng, 3, small_model.config.vocab_size, lengths=(1, 20))
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine = LLMEngine(small_model, None, EngineConfig(block_size=4, num_kv_blocks=64, attention_backend=backend,
                                                       max_num_batched_tokens=16))
    outputs = run_engine(engine, prompts, params, arrivals=[0, 1, 2])
    for index, prompt in enumerate(prompts):
        assert outputs[index] == reference_generate(small_model, prompt, params), f"{backend}, prompt {index}"


def test_a_seeded_request_is_the_same_alone_and_in_a_batch_of_16_mixed_requests(small_model):
    rng = random.Random(6)
    prompts = random_prompts(rng, 16, small_model.config.vocab_size)
    target = SamplingParams(temperature=0.9, top_p=0.8, min_p=0.05, seed=99, max_tokens=12, ignore_eos=True)
    others = [SamplingParams(temperature=[0.0, 0.7, 1.3][i % 3], top_k=[0, 7][i % 2], seed=[None, i][i % 2],
                             repetition_penalty=[1.0, 1.3][i % 2], presence_penalty=[0.0, 0.5][i % 3 == 0],
                             logprobs=[None, 2][i % 2], n=1 + (i % 5 == 0), max_tokens=rng.randint(3, 12),
                             ignore_eos=True) for i in range(15)]
    config = EngineConfig(block_size=4, num_kv_blocks=256, max_num_batched_tokens=40)
    alone = run_engine(LLMEngine(small_model, None, config), [prompts[0]], [target])[0]
    together = run_engine(LLMEngine(small_model, None, config), prompts, [target] + others,
                          arrivals=[3] + [0] * 15)  # it joins a batch already running
    assert together[0] == alone == reference_generate(small_model, prompts[0], target)


def test_auto_picks_cuda_only_when_it_is_clearly_faster_everywhere():
    from miniinfer.engine.attention_backends import choose_decode_backend, select_attention_backend

    assert choose_decode_backend({"triton": [1.0, 1.0, 1.0]}) == "triton"
    assert choose_decode_backend({"triton": [1.2, 1.3, 1.25], "cuda": [1.0, 1.0, 1.0]}) == "cuda"
    # a few percent faster on short contexts but 3.6x slower on a long one: Triton
    assert choose_decode_backend({"triton": [1.03, 1.0, 1.08], "cuda": [1.0, 3.6, 1.0]}) == "triton"
    assert choose_decode_backend({"triton": [1.05, 1.05, 1.05], "cuda": [1.0, 1.0, 1.0]}) == "triton"
    assert choose_decode_backend({}) == "triton"
    cpu = torch.device("cpu")
    from miniinfer.models.config import Qwen2Config

    config = Qwen2Config(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    assert select_attention_backend("auto", cpu, torch.float32, config, 16).name == "sdpa"
    with pytest.raises(ValueError, match="CUDA GPU"):
        select_attention_backend("cuda", cpu, torch.float32, config, 16)


def test_a_custom_plan_really_orders_admission(small_model):
    """plan_step sees every admission candidate at once: a shortest-prompt-first policy admits the short
    request before the long one that arrived first (the old seam asked about one candidate at a time)."""
    from miniinfer.engine import EngineHooks

    def shortest_first(running, waiting, budget, max_num_seqs, chunked):
        plan = [min(n, budget) for n in running]
        budget -= sum(plan)
        admitted = [0] * len(waiting)
        seats = max_num_seqs - len(running)
        for index in sorted(range(len(waiting)), key=lambda i: waiting[i]):
            if seats > 0 and waiting[index] <= budget:
                admitted[index] = waiting[index]
                budget -= waiting[index]
                seats -= 1
        return plan + admitted

    config = EngineConfig(block_size=4, num_kv_blocks=128, max_num_seqs=1, max_num_batched_tokens=64,
                          enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    orders = {}
    for name, hooks in (("fcfs", None), ("shortest", EngineHooks(plan_step=shortest_first))):
        engine = LLMEngine(small_model, None, config, hooks=hooks)
        long_id = engine.add_request(list(range(1, 40)), params)
        short_id = engine.add_request([7, 8, 9], params)
        finished = []
        while engine.has_unfinished_requests():
            finished += [o.request_id for o in engine.step() if o.finished]
        orders[name] = [{long_id: "long", short_id: "short"}[r] for r in finished]
    assert orders == {"fcfs": ["long", "short"], "shortest": ["short", "long"]}
