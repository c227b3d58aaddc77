"""Logprobs of generated and prompt tokens equal a straightforward per-position reference: the plain
forward's log-softmax of the raw logits (vLLM's default, before temperature, penalties or filters)."""

from __future__ import annotations

import math

import pytest
import torch
from engine_helpers import finish_all

from miniinfer.engine import EngineConfig, LLMEngine
from miniinfer.loader import load_model
from miniinfer.sampling import SamplingParams


@pytest.fixture(scope="module")
def small_model(small_checkpoint):
    return load_model(small_checkpoint[0])[0]


@torch.inference_mode()
def reference_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V]: row p is the log-distribution of the token at position p + 1."""
    return torch.log_softmax(model(torch.tensor([tokens]))[0].float(), dim=-1)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_generated_token_logprobs_equal_the_plain_forward(small_model, temperature):
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32]
    engine = LLMEngine(small_model, None, EngineConfig(block_size=4, num_kv_blocks=64, max_num_batched_tokens=5))
    params = SamplingParams(temperature=temperature, top_k=10, repetition_penalty=1.2, max_tokens=7, logprobs=3,
                            seed=5, ignore_eos=True)
    request = engine.add_request(prompt, params)
    other = engine.add_request([1, 2, 3], SamplingParams(max_tokens=7, ignore_eos=True))  # no logprobs: none returned
    results = finish_all(engine)
    out = results[request].outputs[0]
    assert results[other].outputs[0].logprobs is None
    reference = reference_logprobs(small_model, prompt + out.token_ids)
    total = 0.0
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = reference[len(prompt) - 1 + step]
        assert math.isclose(entry[token], row[token].item(), abs_tol=1e-4)
        top_values, top_ids = row.topk(3)
        for token_id, value in zip(top_ids.tolist(), top_values.tolist()):
            assert math.isclose(entry[token_id], value, abs_tol=1e-4)
        assert len(entry) in (3, 4)  # the chosen token plus the top 3 (3 when it is among them)
        total += entry[token]
    assert math.isclose(out.cumulative_logprob, total, abs_tol=1e-4)


def test_prompt_logprobs_equal_the_plain_forward_even_over_chunks_and_a_cached_prefix(small_model):
    prompt = [7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9, 0, 4, 5, 2, 3]
    engine = LLMEngine(small_model, None, EngineConfig(block_size=4, num_kv_blocks=64, max_num_batched_tokens=6))
    warm = engine.add_request(prompt, SamplingParams(max_tokens=2, ignore_eos=True))  # fills the prefix cache
    finish_all(engine)
    request = engine.add_request(prompt, SamplingParams(max_tokens=2, prompt_logprobs=2, ignore_eos=True))
    result = finish_all(engine)[request]
    assert warm != request
    reference = reference_logprobs(small_model, prompt)
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(prompt)
    for position in range(1, len(prompt)):
        entry = result.prompt_logprobs[position]
        row = reference[position - 1]
        assert math.isclose(entry[prompt[position]], row[prompt[position]].item(), abs_tol=1e-4)
        top_values, top_ids = row.topk(2)
        for token_id, value in zip(top_ids.tolist(), top_values.tolist()):
            assert math.isclose(entry[token_id], value, abs_tol=1e-4)
