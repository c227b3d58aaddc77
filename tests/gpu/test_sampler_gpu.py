"""The batched sampler on a CUDA GPU: same streams and distributions as on the CPU, no host sync, graph capture.

Run on a CUDA machine: ``python -m pytest -m gpu tests/gpu/test_sampler_gpu.py -q``. Inputs are fresh
each run (the ``seed`` fixture prints the seed; replay with ``MINIINFER_TEST_SEED=<seed>``).
"""

from __future__ import annotations

import random

import pytest
import torch

from miniinfer.sampler import (
    SamplingBatch,
    SamplingRow,
    batch_probabilities,
    derive_seed,
    sample_batch,
    top_p_threshold,
    uniform_from_seed,
    uniform_from_seed_reference,
)
from miniinfer.sampling import SamplingParams, apply_logit_bias, apply_penalties, probabilities, top_p_filter

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

P_FAIL = 1e-6
CUDA = torch.device("cuda")


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    assert counts[probs == 0].sum().item() == 0, f"drew a token whose probability is 0: {counts.tolist()}"
    nonzero = probs > 0
    expected = counts.sum().item() * probs[nonzero].double()
    assert expected.min().item() >= 5, "too few expected draws for a chi-square test"
    statistic = ((counts[nonzero].double() - expected) ** 2 / expected).sum()
    df = nonzero.sum().item() - 1
    return 1.0 if df == 0 else torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), statistic / 2).item()


def mixed_rows(n: int, V: int, rng: random.Random, step: int = 0) -> list[SamplingRow]:
    rows = []
    for i in range(n):
        params = SamplingParams(
            temperature=rng.choice([0.0, 0.7, 1.0, 1.3]), top_k=rng.choice([0, 20, 50]),
            top_p=rng.choice([1.0, 0.95, 0.8]), min_p=rng.choice([0.0, 0.05]),
            repetition_penalty=rng.choice([1.0, 1.1]), frequency_penalty=rng.choice([0.0, 0.3]),
            logit_bias=rng.choice([None, {rng.randrange(V): 2.0}]), logprobs=rng.choice([None, 0, 5]))
        rows.append(SamplingRow(params, seed=derive_seed(rng.randrange(2**64), i), step=step,
                                prompt_token_ids=[rng.randrange(V) for _ in range(64)],
                                output_token_ids=[rng.randrange(V) for _ in range(16)],
                                suppressed_token_ids=[rng.randrange(V)] if rng.random() < 0.3 else []))
    return rows


def test_uniforms_on_cuda_equal_the_python_reference(seed):
    """int64 wrap-around multiplication and the masked shifts give the same 64-bit streams on the GPU."""
    rng = random.Random(seed)
    seeds = [rng.randrange(2**64) for _ in range(1000)] + [0, 2**63, 2**64 - 1]
    steps = [rng.randrange(10**6) for _ in seeds]
    signed = torch.tensor([s - 2**64 if s >= 2**63 else s for s in seeds], device=CUDA)
    got = uniform_from_seed(signed, torch.tensor(steps, device=CUDA)).cpu()
    assert got.tolist() == [uniform_from_seed_reference(s, t) for s, t in zip(seeds, steps)]


def test_probabilities_and_tokens_match_the_cpu(seed):
    """Same distributions as the CPU path (float rounding aside) on a real vocabulary; the same tokens
    except where the GPU's rounding moves a prefix sum across the row's uniform (very rare)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    N, V = 64, 151_936
    logits = torch.randn(N, V) * 3
    rows = mixed_rows(N, V, rng, step=3)
    cpu = batch_probabilities(logits, SamplingBatch.build(rows, V, "cpu"))
    gpu = batch_probabilities(logits.to(CUDA), SamplingBatch.build(rows, V, CUDA)).cpu()
    # The nucleus boundary is decided by sums of probabilities in different orders (float32 histograms on
    # the CPU, float64 bins in the GPU kernel): a token whose cumulative mass lies within rounding of top_p
    # may be kept on one side and dropped on the other. Such knife-edge tokens are allowed, one in 10^5 at
    # most; everything kept on both sides must agree.
    both = (gpu > 0) & (cpu > 0)
    torch.testing.assert_close(gpu[both], cpu[both], atol=1e-6, rtol=1e-4)
    edge = (gpu > 0) != (cpu > 0)
    assert edge.sum().item() <= max(1, gpu.numel() // 100_000), edge.nonzero()[:10]
    tokens_cpu = sample_batch(logits.clone(), SamplingBatch.build(rows, V, "cpu")).token_ids
    tokens_gpu = sample_batch(logits.to(CUDA), SamplingBatch.build(rows, V, CUDA)).token_ids.cpu()
    assert (tokens_cpu == tokens_gpu).float().mean().item() >= 0.95, (tokens_cpu, tokens_gpu)


def test_frequencies_on_cuda(seed):
    """Chi-square fits of 200 000 draws per option against the per-row reference, on the GPU."""
    torch.manual_seed(seed)
    V, n, steps = 13, 50_000, 4
    logits = (torch.randn(()) - (torch.rand(V) * 0.9 + 0.1).mul(0.5).cumsum(0))[torch.randperm(V)]
    cases = [SamplingParams(), SamplingParams(temperature=0.6, top_k=6), SamplingParams(top_p=0.8, temperature=1.2),
             SamplingParams(min_p=0.12), SamplingParams(temperature=0.9, top_k=10, top_p=0.9, min_p=0.05,
                                                        repetition_penalty=1.5, presence_penalty=0.5,
                                                        logit_bias={2: 1.0})]
    for params in cases:
        counts = torch.zeros(V, dtype=torch.long)
        for step in range(steps):
            rows = [SamplingRow(params, seed=seed * 7919 + i, step=step, prompt_token_ids=[0, 1],
                                output_token_ids=[1, 5, 5], suppressed_token_ids=[4]) for i in range(n)]
            tokens = sample_batch(logits.to(CUDA).expand(n, V).clone(), SamplingBatch.build(rows, V, CUDA)).token_ids
            counts += torch.bincount(tokens.cpu(), minlength=V)
        z = apply_penalties(apply_logit_bias(logits, params.logit_bias, [4]), params, [0, 1], [1, 5, 5])
        probs = probabilities(z, params)
        p_value = chi_square_p_value(counts, probs)
        assert p_value > P_FAIL, f"{params}: {counts.tolist()} vs {probs.tolist()}: p = {p_value:.3g}"


def test_batch_independence_on_cuda(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    V = 151_936
    me = SamplingParams(temperature=0.9, top_p=0.95, seed=5)
    alone, together = [], []
    for step in range(8):
        logits = torch.randn(32, V, device=CUDA) * 3
        mine = SamplingRow(me, seed=derive_seed(5, 0), step=step, prompt_token_ids=[], output_token_ids=[])
        alone.append(sample_batch(logits[9:10].clone(), SamplingBatch.build([mine], V, CUDA)).token_ids.item())
        rows = mixed_rows(32, V, rng, step=step)
        rows[9] = mine
        together.append(sample_batch(logits.clone(), SamplingBatch.build(rows, V, CUDA)).token_ids[9].item())
    assert alone == together


def test_top_p_threshold_on_cuda_matches_the_sort(seed):
    torch.manual_seed(seed)
    logits = torch.randn(32, 151_936, device=CUDA) * torch.empty(32, 1, device=CUDA).uniform_(0.5, 4)
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.empty(32, device=CUDA).uniform_(0.05, 0.99)
    keep = probs.view(torch.int32) >= top_p_threshold(probs, top_p).unsqueeze(1)
    for i in range(32):
        margin = (probs[i].sort(descending=True).values.double().cumsum(0) - top_p[i]).abs().min().item()
        if margin > 1e-5:
            assert torch.equal(keep[i], torch.isfinite(top_p_filter(logits[i], top_p[i].item()))), i


def test_no_host_sync_and_cuda_graph_capture(seed):
    """sample_batch runs under torch's sync-debug "error" mode, and replays from a CUDA graph."""
    rng = random.Random(seed)
    N, V = 128, 151_936
    rows = mixed_rows(N, V, rng, step=2)
    logits = torch.randn(N, V, device=CUDA) * 3
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = SamplingBatch.build(rows, V, CUDA)
        eager = sample_batch(logits.clone(), batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    static_logits = logits.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up outside the graph (lazy initialisation, allocator)
            sample_batch(static_logits.clone(), batch)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work = static_logits.clone()
        out = sample_batch(work, batch)
    static_logits.copy_(logits)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.token_ids, eager.token_ids)
    assert torch.equal(out.logprobs, eager.logprobs) and torch.equal(out.top_logprob_ids, eager.top_logprob_ids)
    other = torch.randn(N, V, device=CUDA) * 3
    static_logits.copy_(other)
    graph.replay()
    expected = sample_batch(other.clone(), batch).token_ids
    torch.cuda.synchronize()
    assert torch.equal(out.token_ids, expected)
