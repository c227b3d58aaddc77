"""The engine's prefill kernels on a CUDA GPU give the same model outputs.

    python -m pytest -m gpu tests/gpu/test_prefill_kernels_gpu.py -q

Two models: the trained bundled model (head dim 32: the Triton kernels) through greedy generation, and
a random-weight Qwen2 with head dim 128 (every kernel, flash-attn and our CUDA kernel included) through
the log-probabilities of a 1,200-token prompt prefilled in chunks of 256 tokens, so every chunk after
the first attends to a paged cached prefix. Kernels that cannot run here are skipped, saying why.
"""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

KERNELS = ["paged_triton", "flash_triton", "flash_cuda", "flash_attn"]


def _skip_unless_available(kernel: str, dtype: torch.dtype, head_dim: int) -> None:
    from miniinfer.engine.attention_backends import available_prefill_kernels

    reason = available_prefill_kernels(torch.device("cuda"), dtype, head_dim)[kernel]
    if reason:
        pytest.skip(f"{kernel}: {reason}")


@pytest.mark.parametrize("kernel", ["flash_triton"])
def test_bundled_model_generates_the_same_with_each_triton_prefill_kernel(kernel):
    from miniinfer import LLM, SamplingParams

    rng = random.Random(4)
    prompts = [[rng.randrange(1, 2000) for _ in range(rng.randint(5, 300))] for _ in range(12)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outputs = {}
    for name in ("paged_triton", kernel):
        llm = LLM(device="cuda", dtype=torch.float16, attention_backend="triton", prefill_kernel=name,
                  max_num_batched_tokens=128)
        assert llm.engine.prefill_kernel == name
        outputs[name] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    same = sum(a == b for a, b in zip(outputs["paged_triton"], outputs[kernel]))
    assert same >= len(prompts) - 1, f"{kernel}: {same}/{len(prompts)} greedy continuations identical"


def _random_model(head_dim: int = 128):
    from miniinfer.models.config import Qwen2Config
    from miniinfer.models.qwen2 import Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=4096, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=head_dim, rope_theta=1e6,
                         rms_norm_eps=1e-6, max_position_embeddings=4096, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config)
    # .to(device=...) as well: it moves the RoPE tables, which are plain attributes, not buffers
    return model.to(device="cuda", dtype=torch.bfloat16).requires_grad_(False).eval()


@pytest.mark.parametrize("kernel", KERNELS[1:])
def test_prompt_logprobs_agree_across_prefill_kernels_head_dim_128(kernel):
    from miniinfer.engine import EngineConfig, LLMEngine
    from miniinfer.sampling import SamplingParams

    _skip_unless_available(kernel, torch.bfloat16, 128)
    model = _random_model()
    rng = random.Random(5)
    prompt = [rng.randrange(4096) for _ in range(1200)]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, ignore_eos=True)
    logprobs = {}
    for name in ("paged_triton", kernel):
        engine = LLMEngine(model, None, EngineConfig(attention_backend="triton", prefill_kernel=name,
                                                     max_num_batched_tokens=256, enforce_eager=True,
                                                     enable_prefix_caching=False))
        engine.add_request(prompt, params)
        final = None
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    final = output
        assert final is not None and final.prompt_logprobs is not None, f"{name}: no prompt logprobs"
        assert final.outputs[0].finish_reason != "error", f"{name}: {final.outputs[0]}"
        assert len(final.prompt_logprobs) == len(prompt), \
            f"{name}: {len(final.prompt_logprobs)} prompt logprobs for {len(prompt)} prompt tokens"
        values = [next(iter(d.values())) for d in final.prompt_logprobs[1:]]
        logprobs[name] = torch.tensor([v if isinstance(v, float) else v.logprob for v in values])
    difference = float((logprobs[kernel] - logprobs["paged_triton"]).abs().max())
    print(f"{kernel}: largest prompt-logprob difference from paged_triton {difference:.4f}")
    assert difference < 0.1, f"{kernel}: prompt logprobs differ by {difference}"
