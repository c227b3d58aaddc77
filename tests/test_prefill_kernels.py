"""The engine's prefill kernels (chapter 07's paged Triton kernel, chapter 09's flash kernels): each gives
the reference's outputs inside the engine — chunked prompts over a cached prefix included — and the
start-up choice never picks a kernel that disagrees with the reference."""

from __future__ import annotations

import random

import pytest
import torch

from miniinfer.engine import EngineConfig, LLMEngine
from miniinfer.engine import attention_backends as backends
from miniinfer.loader import load_model
from miniinfer.models.config import Qwen2Config
from miniinfer.sampling import SamplingParams
from tests.test_engine import random_prompts, reference_generate, run_engine


@pytest.fixture(scope="module")
def small_model(small_checkpoint):
    folder, _ = small_checkpoint
    return load_model(folder)[0]


@pytest.mark.parametrize("kernel", ["paged_triton", "flash_triton"])
def test_each_prefill_kernel_gives_the_reference_outputs_in_the_engine(small_model, kernel):
    """Chunks of 12 tokens: long prompts prefill over their own earlier chunks (a paged prefix); a second
    wave repeats the first prompts' heads, so the prefix cache hands the kernel a cached prefix too."""
    rng = random.Random(9)
    vocab = small_model.config.vocab_size
    first = random_prompts(rng, 3, vocab, lengths=(20, 40))
    second = [p[:17] + [rng.randrange(vocab) for _ in range(5)] for p in first]
    prompts = first + second
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine = LLMEngine(small_model, None, EngineConfig(block_size=4, num_kv_blocks=128, attention_backend="triton",
                                                       prefill_kernel=kernel, max_num_batched_tokens=12))
    assert engine.prefill_kernel == kernel
    outputs = run_engine(engine, prompts, params, arrivals=[0, 0, 1, 30, 30, 31])
    for index, prompt in enumerate(prompts):
        assert outputs[index] == reference_generate(small_model, prompt, params), f"{kernel}, prompt {index}"
    assert engine.radix_cache is not None and engine.counters["prompt_tokens"] > 0


def _tiny_config(heads=4, kv_heads=2, head_dim=16) -> Qwen2Config:
    return Qwen2Config(vocab_size=10, hidden_size=heads * head_dim, intermediate_size=8, num_hidden_layers=1,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)


def test_a_kernel_that_disagrees_with_the_reference_is_never_chosen(monkeypatch):
    def off_by_a_little(q, k_cache, v_cache, metadata, scale):
        return backends._prefill_paged_triton(q, k_cache, v_cache, metadata, scale) + 0.05

    monkeypatch.setitem(backends.PREFILL_KERNEL_FUNCTIONS, "flash_triton", off_by_a_little)
    backends.measure_prefill_kernels.cache_clear()
    try:
        with pytest.warns(UserWarning, match="flash_triton"):
            relative = backends.measure_prefill_kernels("cpu", torch.float32, 4, 2, 16, 4,
                                                        candidates=("paged_triton", "flash_triton"))
    finally:
        backends.measure_prefill_kernels.cache_clear()
    assert relative["paged_triton"] == [0.0]
    assert "differs from the reference" in relative["flash_triton"]
    assert backends.choose_prefill_kernel(relative) == "paged_triton"


def test_choose_prefill_kernel_takes_the_smallest_total_time():
    choose = backends.choose_prefill_kernel
    assert choose({}) == "paged_triton"
    assert choose({"paged_triton": [1.0, 1.5, 1.0], "flash_triton": [1.1, 1.0, 1.1]}) == "flash_triton"
    # much faster on the long prefill, twice as slow on tiny prompts (host overhead): the total prefers it
    assert choose({"paged_triton": [0.010, 0.004, 0.0010], "flash_attn": [0.006, 0.003, 0.0020]}) == "flash_attn"
    assert choose({"paged_triton": [1.0, 1.0], "flash_cuda": "needs a CUDA GPU"}) == "paged_triton"
    assert choose({"flash_triton": [1.0], "paged_triton": [1.0]}) == "paged_triton"  # tie: the earlier


def test_prefill_kernel_errors_name_the_problem():
    cpu, config = torch.device("cpu"), _tiny_config()
    with pytest.raises(ValueError, match="prefill_kernel must be one of"):
        EngineConfig(prefill_kernel="fastest")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        backends.select_attention_backend("triton", cpu, torch.float32, config, 16, prefill_kernel="flash_attn")
    with pytest.raises(ValueError, match="needs attention_backend 'triton' or 'cuda'"):
        backends.select_attention_backend("sdpa", cpu, torch.float32, config, 16, prefill_kernel="flash_triton")
    with pytest.raises(ValueError, match="needs attention_backend 'triton' or 'cuda'"):
        backends.select_attention_backend("auto", cpu, torch.float32, config, 16, prefill_kernel="flash_triton")
    chosen = backends.select_attention_backend("triton", cpu, torch.float32, config, 16, prefill_kernel="flash_triton")
    assert chosen.prefill_kernel == "flash_triton" and "flash_triton" in repr(chosen)
    assert backends.select_attention_backend("triton", cpu, torch.float32, config, 16).prefill_kernel == "paged_triton"
