"""The chapter-05 KV cache and the generation loops built on it, against the plain forward and HF."""

from __future__ import annotations

import random

import pytest
import torch

from miniinfer.generate import generate, generate_static_batch
from miniinfer.kv_cache import KVCache
from miniinfer.loader import load_model
from miniinfer.sampling import SamplingParams


@pytest.fixture(scope="module")
def model_and_hf(small_checkpoint):
    folder, hf_model = small_checkpoint
    return load_model(folder)[0], hf_model


def test_cached_generation_equals_recomputation_and_hf(model_and_hf):
    model, hf_model = model_and_hf
    rng = random.Random(0)
    for length in (1, 7, 30):
        prompt = [rng.randrange(model.config.vocab_size) for _ in range(length)]
        params = SamplingParams(temperature=0.0, max_tokens=15, ignore_eos=True)
        cached = generate(model, prompt, params)
        assert cached == generate(model, prompt, params, use_cache=False)
        with torch.inference_mode():
            reference = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, length, dtype=torch.long),
                                          max_new_tokens=15, min_new_tokens=15, do_sample=False)
        assert cached == reference[0, length:].tolist()


def test_seeded_sampling_with_and_without_cache_agree(model_and_hf):
    model, _ = model_and_hf
    params = SamplingParams(temperature=0.8, top_k=30, max_tokens=12, seed=3, ignore_eos=True)
    assert generate(model, [4, 8, 15, 16, 23, 42], params) == generate(model, [4, 8, 15, 16, 23, 42], params,
                                                                     use_cache=False)


def test_static_batch_with_left_padding_equals_one_by_one(model_and_hf):
    model, _ = model_and_hf
    rng = random.Random(1)
    prompts = [[rng.randrange(model.config.vocab_size) for _ in range(n)] for n in (3, 11, 1, 25)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (5, 9, 2, 7)]
    result = generate_static_batch(model, prompts, params)
    for prompt, p, output in zip(prompts, params, result.outputs):
        assert output == generate(model, prompt, p)
    assert result.padding_tokens == sum(25 - len(p) for p in prompts)
    assert result.busy_rows_per_step[0] == 4 and result.busy_rows_per_step[-1] == 0
    assert result.steps == 8  # the batch runs until its longest request (9 tokens) is done


def test_cache_is_filled_in_place(model_and_hf):
    model, _ = model_and_hf
    cache = KVCache.for_model(model, batch_size=2, max_len=16)
    pointer = cache.keys.data_ptr()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    model(ids, torch.arange(3).expand(2, 3), attention=cache)
    assert cache.length == 3 and cache.keys.data_ptr() == pointer
    model(torch.tensor([[7], [8]]), torch.tensor([[3], [3]]), attention=cache)
    assert cache.length == 4 and cache.keys.data_ptr() == pointer
    assert cache.keys[:, :, 4:].abs().sum() == 0  # nothing written past the filled slots
    with pytest.raises(ValueError, match="holds 16"):
        model(torch.ones(2, 13, dtype=torch.long), torch.arange(4, 17).expand(2, 13), attention=cache)
