"""The batched sampler against the per-row references of miniinfer.sampling.

Statistical tests draw with fresh seeds (the ``seed`` fixture prints them; replay with
MINIINFER_TEST_SEED=<seed>) and fail by chance with probability P_FAIL when the sampler is right.
"""

from __future__ import annotations

import random

import pytest
import torch
from stats import chi_square_p_value

import miniinfer.sampler as sampler_module
from miniinfer.sampler import (
    SamplingBatch,
    SamplingRow,
    batch_probabilities,
    check_token_ids,
    derive_seed,
    process_logits,
    sample_batch,
    top_p_threshold,
    uniform_from_seed,
    uniform_from_seed_reference,
)
from miniinfer.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    probabilities,
    top_p_filter,
)

P_FAIL = 1e-6
V = 13


def distinct_logits(n: int = V, spread: float = 0.5) -> torch.Tensor:
    """Logits at least 0.1·spread apart, shuffled: no ties, and no probability too small to test."""
    gaps = (torch.rand(n) * 0.9 + 0.1) * spread
    return (torch.randn(()) - gaps.cumsum(0))[torch.randperm(n)]


def row(params: SamplingParams, seed: int = 0, step: int = 0, prompt=(), output=(), suppressed=()) -> SamplingRow:
    return SamplingRow(params, seed=seed, step=step, prompt_token_ids=list(prompt), output_token_ids=list(output),
                       suppressed_token_ids=list(suppressed))


def reference_probs(logits: torch.Tensor, r: SamplingRow) -> torch.Tensor:
    """The per-row path: bias and suppression, penalties, then probabilities()."""
    z = apply_logit_bias(logits, r.params.logit_bias, r.suppressed_token_ids)
    z = apply_penalties(z, r.params, r.prompt_token_ids, r.output_token_ids)
    return probabilities(z, r.params)


def draw_counts(logits: torch.Tensor, template: SamplingRow, seed: int, rows: int = 4000, steps: int = 5):
    """Counts of `rows` identical rows with different stream seeds, over `steps` steps."""
    counts = torch.zeros(len(logits), dtype=torch.long)
    for step in range(steps):
        batch_rows = [SamplingRow(template.params, seed=(seed * 1_000_003 + i) % 2**64, step=step,
                                  prompt_token_ids=template.prompt_token_ids,
                                  output_token_ids=template.output_token_ids,
                                  suppressed_token_ids=template.suppressed_token_ids) for i in range(rows)]
        batch = SamplingBatch.build(batch_rows, len(logits), "cpu")
        tokens = sample_batch(logits.expand(rows, -1).clone(), batch).token_ids
        counts += torch.bincount(tokens, minlength=len(logits))
    return counts


HISTORY = dict(prompt=[0, 1, 1, 5], output=[2, 2, 2, 7, 0])
CASES = {
    "plain": row(SamplingParams()),
    "temperature": row(SamplingParams(temperature=0.6)),
    "hot": row(SamplingParams(temperature=1.8)),
    "top_k": row(SamplingParams(top_k=5)),
    "top_p": row(SamplingParams(temperature=0.9, top_p=0.7)),
    "min_p": row(SamplingParams(min_p=0.15)),
    "top_k_top_p_min_p": row(SamplingParams(temperature=1.2, top_k=9, top_p=0.85, min_p=0.1)),
    "penalties": row(SamplingParams(repetition_penalty=1.7, frequency_penalty=0.4, presence_penalty=-0.3),
                     **HISTORY),
    "bias_suppressed": row(SamplingParams(logit_bias={3: 1.5, 4: -2.0}), suppressed=[6, 11]),
    "everything": row(SamplingParams(temperature=0.8, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.3,
                                     presence_penalty=0.5, frequency_penalty=0.2, logit_bias={9: 1.0}),
                      suppressed=[1], **HISTORY),
}


@pytest.mark.parametrize("name", list(CASES))
def test_frequencies_follow_the_reference_distribution(name, seed):
    """Chi-square goodness of fit of 20 000 draws against the per-row reference distribution."""
    template = CASES[name]
    logits = distinct_logits()
    probs = reference_probs(logits, template)
    counts = draw_counts(logits, template, seed)
    p_value = chi_square_p_value(counts, probs)
    assert p_value > P_FAIL, f"{name}: counts {counts.tolist()} vs probabilities {probs.tolist()}: p = {p_value:.3g}"


def test_the_goodness_of_fit_test_can_fail(seed):
    """The same draws tested against a neighbouring distribution are rejected: the test has power."""
    logits = distinct_logits()
    counts = draw_counts(logits, CASES["temperature"], seed)
    wrong = probabilities(logits, SamplingParams(temperature=0.7))
    assert chi_square_p_value(counts, wrong) < P_FAIL
    with pytest.raises(AssertionError, match="probability is 0"):
        chi_square_p_value(counts, probabilities(logits, SamplingParams(temperature=0.6, top_k=3)))


def test_mixed_batch_each_group_follows_its_distribution(seed):
    """All the cases in one batch (interleaved rows, one step): every group still fits its own distribution."""
    logits = distinct_logits()
    names = list(CASES)
    per_group, rounds = 600, 4
    counts = {name: torch.zeros(V, dtype=torch.long) for name in names}
    for step in range(rounds):
        rows = [SamplingRow(CASES[n].params, seed=(seed + 7919 * i) % 2**64, step=step,
                            prompt_token_ids=CASES[n].prompt_token_ids, output_token_ids=CASES[n].output_token_ids,
                            suppressed_token_ids=CASES[n].suppressed_token_ids)
                for i in range(per_group) for n in names]
        tokens = sample_batch(logits.expand(len(rows), -1).clone(), SamplingBatch.build(rows, V, "cpu")).token_ids
        for g, name in enumerate(names):
            counts[name] += torch.bincount(tokens[g::len(names)], minlength=V)
    for name in names:
        probs = reference_probs(logits, CASES[name])
        if (probs[probs > 0] * per_group * rounds).min() < 5:
            continue  # too few draws for this group's smallest probability
        p_value = chi_square_p_value(counts[name], probs)
        assert p_value > P_FAIL, f"{name}: {counts[name].tolist()} vs {probs.tolist()}: p = {p_value:.3g}"


def test_batch_probabilities_equal_the_per_row_reference(seed):
    """The batched filters give the per-row distributions on realistic rows (V = 500, random options)."""
    rng = random.Random(seed)
    rows, logits = [], []
    for _ in range(24):
        params = SamplingParams(
            temperature=rng.choice([0.0, 1e-6, 0.5, 1.0, 1.7]), top_k=rng.choice([0, -1, 1, 7, 50, 500, 600]),
            top_p=rng.choice([1.0, 0.9, 0.5, 0.05]), min_p=rng.choice([0.0, 0.02, 0.3]),
            repetition_penalty=rng.choice([1.0, 1.3, 0.8]), presence_penalty=rng.choice([0.0, 0.7]),
            frequency_penalty=rng.choice([0.0, -0.4]),
            logit_bias=rng.choice([None, {rng.randrange(500): rng.uniform(-100, 100) for _ in range(3)}]))
        history = dict(prompt=[rng.randrange(500) for _ in range(rng.randrange(30))],
                       output=[rng.randrange(500) for _ in range(rng.randrange(30))])
        rows.append(row(params, suppressed=rng.sample(range(500), rng.randrange(3)), **history))
        logits.append(distinct_logits(500, spread=0.05))
    logits = torch.stack(logits)
    got = batch_probabilities(logits, SamplingBatch.build(rows, 500, "cpu"))
    for i, r in enumerate(rows):
        expected = reference_probs(logits[i], r)
        assert torch.equal(got[i] > 0, expected > 0), f"row {i} ({r.params}): different kept sets"
        torch.testing.assert_close(got[i], expected, atol=1e-6, rtol=1e-5, msg=f"row {i} ({r.params})")


def test_processed_logits_equal_the_reference_exactly():
    """Bias, suppression and penalties: bit-for-bit the per-row reference (values exact in float32)."""
    torch.manual_seed(0)
    logits = torch.randn(5, 40) * 4
    rows = [
        row(SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.25),
            prompt=[1, 2, 2, 30], output=[2, 5, 5, 5, 39]),
        row(SamplingParams(logit_bias={0: 1.5, 39: -100.0, 7: 2.25}), suppressed=[3, 4]),
        row(SamplingParams()),  # untouched
        row(SamplingParams(repetition_penalty=0.5, presence_penalty=-2.0, logit_bias={5: 0.5}),
            prompt=list(range(10)), output=[5, 6], suppressed=[9]),
        row(SamplingParams(frequency_penalty=2.0), prompt=[1], output=[1, 1, 1, 1]),
    ]
    got = logits.clone()
    process_logits(got, SamplingBatch.build(rows, 40, "cpu"))
    for i, r in enumerate(rows):
        expected = apply_penalties(apply_logit_bias(logits[i], r.params.logit_bias, r.suppressed_token_ids),
                                   r.params, r.prompt_token_ids, r.output_token_ids)
        assert torch.equal(got[i], expected), f"row {i}: {got[i]} vs {expected}"
    assert torch.equal(got[2], logits[2])


def test_seeded_row_does_not_depend_on_its_batch(seed):
    """A seeded row's tokens are the same alone and inside a batch of 16 mixed rows, step after step."""
    Vb = 300
    torch.manual_seed(seed)
    target = row(SamplingParams(temperature=0.9, top_p=0.95, top_k=100, seed=5), seed=derive_seed(5, 0))
    others = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(top_k=3),
              SamplingParams(repetition_penalty=1.2, presence_penalty=0.5), SamplingParams(min_p=0.2),
              SamplingParams(logit_bias={1: 5.0}, logprobs=3), SamplingParams(top_p=0.3, temperature=2.0)]
    alone, together = [], []
    history = []
    for step in range(12):
        logits = torch.randn(16, Vb) * 2
        if step % 4 == 3:
            logits[7] = float("nan")  # a broken row elsewhere in the batch changes nothing
        me = row(target.params, seed=target.seed, step=step, output=history)
        alone.append(sample_batch(logits[4:5].clone(), SamplingBatch.build([me], Vb, "cpu")).token_ids.item())
        rows = [row(others[(i + step) % len(others)], seed=seed + 100 * i + step, step=step, output=[1, 2, 3])
                for i in range(16)]
        rows[4] = me
        together.append(sample_batch(logits.clone(), SamplingBatch.build(rows, Vb, "cpu")).token_ids[4].item())
        history.append(alone[-1])
    assert alone == together
    assert len(set(alone)) > 3  # it really samples


def test_streams_depend_on_seed_and_step_only():
    seeds = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, derive_seed(123, 4)]
    steps = [0, 1, 2, 10**9, 7, 3]
    signed = torch.tensor([s - 2**64 if s >= 2**63 else s for s in seeds])
    got = uniform_from_seed(signed, torch.tensor(steps))
    assert got.tolist() == [uniform_from_seed_reference(s, t) for s, t in zip(seeds, steps)]
    assert len({derive_seed(7, i) for i in range(1000)}) == 1000
    assert derive_seed(1, 1) != derive_seed(2, 0) and 0 <= derive_seed(2**64 - 1, 5) < 2**64


def test_uniforms_are_uniform(seed):
    """Chi-square over 20 bins of 200 000 uniforms from consecutive seeds and steps."""
    n = 200_000
    seeds = torch.arange(n, dtype=torch.int64) // 50 + seed
    steps = torch.arange(n, dtype=torch.int64) % 50
    u = uniform_from_seed(seeds, steps)
    assert 0 <= u.min().item() and u.max().item() < 1
    counts = torch.bincount((u * 20).long(), minlength=20)
    assert chi_square_p_value(counts, torch.full((20,), 0.05)) > P_FAIL


def test_greedy_rows_take_the_argmax_of_processed_logits(monkeypatch):
    torch.manual_seed(1)
    logits = torch.randn(6, 50)
    rows = [row(SamplingParams(temperature=0.0)), row(SamplingParams(temperature=1e-6, top_k=3)),
            row(SamplingParams(temperature=0, logit_bias={11: 100.0})),
            row(SamplingParams(temperature=0, repetition_penalty=50.0), prompt=[int(logits[3].argmax())]),
            row(SamplingParams(temperature=0), suppressed=[int(logits[4].argmax())]),
            row(SamplingParams(temperature=1e-40))]
    processed = logits.clone()
    process_logits(processed, SamplingBatch.build(rows, 50, "cpu"))
    expected = processed.argmax(dim=-1)
    assert expected[2] == 11 and expected[3] != logits[3].argmax() and expected[4] != logits[4].argmax()

    def forbidden(*args, **kwargs):
        raise AssertionError("an all-greedy batch must not draw random numbers")

    monkeypatch.setattr(sampler_module, "uniform_from_seed", forbidden)
    monkeypatch.setattr(sampler_module, "filtered_probs", forbidden)
    batch = SamplingBatch.build(rows, 50, "cpu")
    assert batch.all_greedy
    assert torch.equal(sample_batch(logits.clone(), batch).token_ids, expected)
    monkeypatch.undo()
    mixed = rows + [row(SamplingParams(), seed=3)]  # with a sampled row: the greedy ones are unchanged
    out = sample_batch(torch.cat([logits, logits[:1]]), SamplingBatch.build(mixed, 50, "cpu")).token_ids
    assert torch.equal(out[:6], expected)


def test_logprobs_are_raw_log_softmax():
    torch.manual_seed(2)
    logits = torch.randn(4, 60) * 3
    rows = [row(SamplingParams(logprobs=5, temperature=0.5, top_k=4), seed=1),
            row(SamplingParams(logprobs=0, logit_bias={0: 50.0}), seed=2),
            row(SamplingParams(), seed=3),
            row(SamplingParams(logprobs=2, temperature=0), suppressed=[int(logits[3].argmax())])]
    out = sample_batch(logits.clone(), SamplingBatch.build(rows, 60, "cpu"))
    raw = torch.log_softmax(logits, dim=-1)
    assert torch.equal(out.logprobs, raw.gather(1, out.token_ids.unsqueeze(1)).squeeze(1))
    assert out.token_ids[1] == 0 and out.logprobs[1] == raw[1, 0]  # the bias chose it; the logprob is raw
    values, ids = torch.topk(raw, 5, dim=-1)
    assert torch.equal(out.top_logprob_ids, ids) and torch.equal(out.top_logprobs, values)
    assert out.top_logprob_ids.dtype == torch.int64 and out.top_logprobs.dtype == torch.float32
    none = sample_batch(logits.clone(), SamplingBatch.build([row(SamplingParams())] * 4, 60, "cpu"))
    assert none.logprobs is None and none.top_logprob_ids is None and none.top_logprobs is None
    only_chosen = sample_batch(logits[:1].clone(), SamplingBatch.build([row(SamplingParams(logprobs=0))], 60, "cpu"))
    assert only_chosen.logprobs is not None and only_chosen.top_logprob_ids is None


def test_masked_tokens_are_never_drawn(seed):
    """All tokens but one suppressed or biased away: always that one, however hot the temperature."""
    n = 2000
    logits = torch.randn(n, 20) * 5
    keep = 13
    rows = [row(SamplingParams(temperature=100.0, top_p=0.99, min_p=0.0), seed=seed + i,
                suppressed=[t for t in range(20) if t != keep]) for i in range(n)]
    assert (sample_batch(logits.clone(), SamplingBatch.build(rows, 20, "cpu")).token_ids == keep).all()
    logits[:, 3] = float("-inf")  # -inf logits from the model: never drawn either
    rows = [row(SamplingParams(temperature=50.0), seed=seed + i) for i in range(n)]
    tokens = sample_batch(logits.clone(), SamplingBatch.build(rows, 20, "cpu")).token_ids
    assert (tokens != 3).all() and len(set(tokens.tolist())) == 19


def test_rows_that_cannot_be_sampled_get_minus_one():
    torch.manual_seed(3)
    logits = torch.randn(6, 30)
    logits[1, 4] = float("nan")
    logits[2, 0] = float("inf")
    logits[3] = float("-inf")
    rows = [row(SamplingParams(logprobs=2), seed=i) for i in range(5)]
    rows.append(row(SamplingParams(), seed=9, suppressed=list(range(30))))  # everything banned
    out = sample_batch(logits.clone(), SamplingBatch.build(rows, 30, "cpu"))
    assert [t == -1 for t in out.token_ids.tolist()] == [False, True, True, True, False, True]
    assert torch.isnan(out.logprobs[1:4]).all() and not torch.isnan(out.logprobs[[0, 4]]).any()
    alone = sample_batch(logits[:1].clone(), SamplingBatch.build(rows[:1], 30, "cpu"))
    assert alone.token_ids.tolist() == out.token_ids[:1].tolist()
    greedy = sample_batch(logits.clone(), SamplingBatch.build([row(SamplingParams(temperature=0))] * 6, 30, "cpu"))
    assert greedy.token_ids[1:4].tolist() == [-1] * 3 and greedy.token_ids[0] == logits[0].argmax()


def test_top_p_threshold_matches_the_sort(seed):
    """The radix select against the sort of top_p_filter, on rows of a real vocabulary size (151 936)."""
    torch.manual_seed(seed)
    for V_, rows_ in ((151_936, 3), (4096, 16), (7, 64)):
        logits = torch.randn(rows_, V_) * torch.empty(rows_, 1).uniform_(0.5, 4)
        probs = torch.softmax(logits, dim=-1)
        top_p = torch.empty(rows_).uniform_(0.01, 0.999)
        keep = probs.view(torch.int32) >= top_p_threshold(probs, top_p).unsqueeze(1)
        for i in range(rows_):
            reference = torch.isfinite(top_p_filter(logits[i], top_p[i].item()))
            sorted_probs = probs[i].sort(descending=True).values.double()
            margin = (sorted_probs.cumsum(0) - top_p[i].item()).abs().min().item()
            if margin > 1e-5:  # a partial sum within rounding of top_p may be decided either way
                assert torch.equal(keep[i], reference), f"V={V_} row {i} top_p={top_p[i].item()}"


def test_top_p_threshold_keeps_ties_and_edge_cases():
    probs = torch.tensor([[0.1, 0.3, 0.3, 0.2, 0.1],
                          [0.25, 0.25, 0.25, 0.25, 0.0],
                          [1.0, 0.0, 0.0, 0.0, 0.0],
                          [0.2, 0.2, 0.2, 0.2, 0.2]])
    top_p = torch.tensor([0.2, 0.3, 0.5, 0.999999])
    keep = probs.view(torch.int32) >= top_p_threshold(probs, top_p).unsqueeze(1)
    assert keep.tolist() == [[False, True, True, False, False], [True, True, True, True, False],
                             [True, False, False, False, False], [True] * 5]


def test_top_k_per_row_with_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 1.0, 2.0]])
    rows = [row(SamplingParams(top_k=2)), row(SamplingParams(top_k=4)), row(SamplingParams(top_k=0))]
    probs = batch_probabilities(logits, SamplingBatch.build(rows, 5, "cpu"))
    assert (probs > 0).tolist() == [[False, True, True, True, False], [True, True, True, True, False], [True] * 5]


def test_build_and_shape_errors():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        SamplingBatch.build([row(SamplingParams(logit_bias={10: 1.0}))], 10, "cpu")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        SamplingBatch.build([row(SamplingParams(), suppressed=[12])], 10, "cpu")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        SamplingBatch.build([row(SamplingParams(presence_penalty=1.0), output=[10])], 10, "cpu")
    with pytest.raises(ValueError, match="no rows"):
        SamplingBatch.build([], 10, "cpu")
    with pytest.raises(ValueError, match="logit_bias names token 10"):
        check_token_ids(SamplingParams(logit_bias={10: 1.0}), 10)
    with pytest.raises(ValueError, match="stop_token_ids names token 11"):
        check_token_ids(SamplingParams(stop_token_ids=[1, 11]), 10)
    check_token_ids(SamplingParams(logit_bias={9: 1.0}, stop_token_ids=[9]), 10)
    batch = SamplingBatch.build([row(SamplingParams())] * 2, 10, "cpu")
    with pytest.raises(ValueError, match=r"logits of shape \(3, 10\), the batch expects \[2, 10\]"):
        sample_batch(torch.zeros(3, 10), batch)


def test_untouched_features_build_nothing():
    batch = SamplingBatch.build([row(SamplingParams(temperature=0.7), seed=1), row(SamplingParams(top_k=50))], 40,
                                "cpu")
    assert not (batch.any_penalties or batch.any_bias or batch.any_suppressed or batch.any_top_p or batch.any_min_p)
    assert batch.output_counts is None and batch.max_logprobs is None and not batch.any_top_k  # 50 >= V: off
    assert batch.seeds.dtype == torch.int64 and batch.temperature.dtype == torch.float32
    big = SamplingBatch.build([row(SamplingParams(), seed=2**64 - 1)], 40, "cpu")
    assert big.seeds.item() == -1  # the same 64 bits, as int64


@pytest.mark.parametrize("top_p", [1e-46, 1e-40, 5e-324, 1e-9])
def test_a_top_p_too_small_for_float32_keeps_the_top_token(top_p):
    """A positive top_p that float32 rounds to 0 (found by the server's schema fuzzing: top_p=1e-46 drew
    from the whole vocabulary) keeps exactly the most likely token, like any top_p below its probability."""
    logits = torch.randn(64, V) * 3
    rows = [row(SamplingParams(temperature=1.5, top_p=top_p), seed=i) for i in range(64)]
    tokens = sample_batch(logits.clone(), SamplingBatch.build(rows, V, "cpu")).token_ids
    assert tokens.tolist() == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("penalty", [5e-324, 1e-38, 2.0**-32, 2.0**32, float("inf")])
def test_repetition_penalties_that_overflow_float32_are_refused(penalty):
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=penalty)
