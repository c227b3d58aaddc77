"""Sampling: validated params, filters in the right order, draws that follow the exact distribution."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from stats import chi_square_p_value

from miniinfer.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    apply_temperature,
    make_generator,
    min_p_filter,
    probabilities,
    sample,
    top_k_filter,
    top_p_filter,
)

# Statistical tests: each fails by chance with probability P_FAIL when the sampler is right.
P_FAIL = 1e-6


def test_defaults_match_design():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.presence_penalty, p.frequency_penalty,
            p.repetition_penalty, p.seed, p.stop, p.stop_token_ids, p.include_stop_str_in_output, p.ignore_eos,
            p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs, p.skip_special_tokens, p.logit_bias) == \
        (1, 1.0, 1.0, 0, 0.0, 0.0, 0.0, 1.0, None, None, None, False, False, 64, 0, None, None, True, None)
    assert SamplingParams(stop="\n\n").stop_strings == ("\n\n",)
    assert SamplingParams(stop=["a", "b"]).stop_strings == ("a", "b") and p.stop_strings == ()
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b") and SamplingParams(stop="a").stop == "a"
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy
    assert SamplingParams(top_k=-1).top_k == -1  # -1 means off, like 0 (vLLM)
    assert isinstance(SamplingParams(temperature=1).temperature, float)


def test_greedy_below_sampling_eps():
    """vLLM's rule: temperatures below 1e-5 are greedy (dividing by them would overflow)."""
    for t in (0, 0.0, 1e-40, 1e-6, 9.99e-6):
        assert SamplingParams(temperature=t).greedy
    assert not SamplingParams(temperature=1e-5).greedy
    logits = torch.tensor([0.5, 3.0, 2.9])
    assert probabilities(logits, SamplingParams(temperature=1e-40)).tolist() == [0, 1, 0]


def test_frozen_hashable_and_replace():
    p = SamplingParams(temperature=0.5, stop=["x"], stop_token_ids=[1], logit_bias={3: 1.5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0
    with pytest.raises(TypeError):
        p.logit_bias[3] = 2.0  # read-only mapping
    assert p.logit_bias[3] == 1.5 and dict(p.logit_bias) == {3: 1.5}
    q = dataclasses.replace(p, temperature=0.7)
    assert q.temperature == 0.7 and q.stop == ("x",) and q.logit_bias == p.logit_bias
    assert hash(p) == hash(SamplingParams(temperature=0.5, stop=("x",), stop_token_ids=(1,), logit_bias={3: 1.5}))
    assert p == SamplingParams(temperature=0.5, stop=("x",), stop_token_ids=(1,), logit_bias={3: 1.5})
    with pytest.raises(ValueError, match=r"SamplingParams\.temperature"):
        dataclasses.replace(p, temperature=-1.0)  # replace validates too
    bias = {3: 1.0}
    r = SamplingParams(logit_bias=bias)
    bias[3] = 5.0  # the params copied the dict
    assert r.logit_bias[3] == 1.0


def test_seed_range():
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1 and SamplingParams(seed=0).seed == 0
    for seed in (2**64, -1):
        with pytest.raises(ValueError, match=r"SamplingParams\.seed must be None or an integer in \[0, 2\*\*64\)"):
            SamplingParams(seed=seed)


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 2.0), ("n", True),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "1"),
    ("temperature", None), ("temperature", True),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.2), ("top_p", None), ("top_p", float("nan")),
    ("top_k", -2), ("top_k", 2.5), ("top_k", True), ("top_k", None),
    ("min_p", -0.1), ("min_p", 1.01), ("min_p", float("nan")), ("min_p", "0.1"),
    ("presence_penalty", 2.01), ("presence_penalty", -2.5), ("presence_penalty", float("inf")),
    ("presence_penalty", None),
    ("frequency_penalty", 3), ("frequency_penalty", -2.01), ("frequency_penalty", float("nan")),
    ("repetition_penalty", 0), ("repetition_penalty", -1.0), ("repetition_penalty", float("inf")),
    ("repetition_penalty", None),
    ("seed", 1.5), ("seed", "42"), ("seed", 2**64), ("seed", -1), ("seed", True),
    ("stop", ""), ("stop", ["ok", ""]), ("stop", 5), ("stop", [None]), ("stop", {"a"}),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]), ("stop_token_ids", 3), ("stop_token_ids", [True]),
    ("include_stop_str_in_output", 1), ("include_stop_str_in_output", None),
    ("ignore_eos", 1), ("skip_special_tokens", "yes"),
    ("max_tokens", 0), ("max_tokens", 3.0), ("max_tokens", -5), ("max_tokens", None),
    ("min_tokens", -1), ("min_tokens", 65), ("min_tokens", 1.0),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 2.0), ("logprobs", True),
    ("prompt_logprobs", -1), ("prompt_logprobs", 21), ("prompt_logprobs", "5"),
    ("logit_bias", {1: 101.0}), ("logit_bias", {1: -100.5}), ("logit_bias", {-1: 1.0}), ("logit_bias", {"a": 1.0}),
    ("logit_bias", {1: float("nan")}), ("logit_bias", [(1, 1.0)]), ("logit_bias", {True: 1.0}),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} .*got {re.escape(repr(value))}"):
        SamplingParams(**{field: value})


def test_boundary_values_are_accepted():
    SamplingParams(presence_penalty=-2, frequency_penalty=2, repetition_penalty=1e-3, min_p=1.0, top_p=1e-9,
                   logprobs=20, prompt_logprobs=0, logit_bias={0: -100, 7: 100}, min_tokens=64, max_tokens=64,
                   top_k=1, stop_token_ids=[], temperature=0)


def test_temperature_and_top_k():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 0.5, -2.0])
    torch.testing.assert_close(apply_temperature(logits, 0.5), logits * 2)
    kept = top_k_filter(logits, 2)
    assert torch.isfinite(kept).tolist() == [True, False, False, True, False, False]
    assert top_k_filter(logits, 0) is logits and top_k_filter(logits, 6) is logits
    tied = top_k_filter(logits, 3)  # the two 0.5s tie for third place: both are kept
    assert torch.isfinite(tied).sum().item() == 4
    batched = top_k_filter(torch.stack([logits, -logits]), 1)
    assert torch.isfinite(batched).nonzero().tolist() == [[0, 3], [1, 5]]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.1, 0.5, 0.05, 0.2, 0.15])
    logits = probs.log()
    keep = lambda p: torch.isfinite(top_p_filter(logits, p)).nonzero().flatten().tolist()
    assert keep(0.5) == [1]  # the top token alone reaches 0.5
    assert keep(0.51) == [1, 3]
    assert keep(0.7) == [1, 3]  # 0.5 + 0.2 = 0.7 >= 0.7 (up to rounding) -> stop
    assert keep(0.86) == [0, 1, 3, 4]
    assert keep(0.01) == [1]  # the most likely token is always kept
    assert top_p_filter(logits, 1.0) is logits


def test_top_p_keeps_ties_with_the_last_kept_token():
    """Ties at the threshold are all kept (the rule of the batched sampler), whatever the sort's order."""
    probs = torch.tensor([0.1, 0.3, 0.3, 0.2, 0.1])
    logits = probs.log()
    keep = lambda p: torch.isfinite(top_p_filter(logits, p)).nonzero().flatten().tolist()
    assert keep(0.2) == [1, 2]  # 0.3 alone reaches 0.2, but its twin is kept too
    assert keep(0.65) == [1, 2, 3]
    assert keep(0.85) == [0, 1, 2, 3, 4]  # 0.8 + one 0.1 crosses; the other 0.1 is tied
    batched = torch.isfinite(top_p_filter(torch.stack([logits, logits.flip(0)]), 0.2))
    assert batched.nonzero().tolist() == [[0, 1], [0, 2], [1, 2], [1, 3]]


def test_min_p_filter():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.25, 0.1])
    logits = probs.log() + 3.0  # a shift changes nothing
    keep = lambda m: torch.isfinite(min_p_filter(logits, m)).nonzero().flatten().tolist()
    assert keep(0.0) == [0, 1, 2, 3, 4] and min_p_filter(logits, 0.0) is logits
    assert keep(0.19) == [1, 2, 3, 4]  # >= 0.19 x 0.5 = 0.095: the 0.1s are kept
    assert keep(0.21) == [1, 3]
    assert keep(1.0) == [1]


def test_min_p_comes_after_top_p():
    """min-p compares with the top token, which top-p always keeps: its set is the same before or after
    top-p, and the two filters combine as an intersection, renormalised."""
    logits = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05]).log()
    got = probabilities(logits, SamplingParams(top_p=0.9, min_p=0.3))  # top-p keeps 4, min-p (>= 0.12) keeps 3
    torch.testing.assert_close(got, torch.tensor([0.4, 0.25, 0.2, 0, 0]) / 0.85)
    got = probabilities(logits, SamplingParams(temperature=0.5, min_p=0.3))  # tempered: p ∝ p²
    squared = torch.tensor([0.16, 0.0625, 0.04, 0.01, 0.0025])
    torch.testing.assert_close(got, torch.tensor([0.16, 0.0625, 0, 0, 0]) / 0.2225)
    assert (squared / squared[0] >= 0.3).tolist() == [True, True, False, False, False]


def test_penalties_reference_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    got = apply_penalties(logits, params, prompt_token_ids=[0, 1, 1], output_token_ids=[3, 3, 4, 0])
    # token 0: prompt+output: 2 / 2 = 1, then - 0.5 x 1 - 0.25 = 0.25; token 1: prompt: -1 x 2 = -2;
    # token 3: output x2: 3 / 2 - 0.5 x 2 - 0.25 = 0.25; token 4: -2 x 2 - 0.5 - 0.25 = -4.75
    assert got.tolist() == [0.25, -2.0, 0.5, 0.25, -4.75, 1.0]
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]  # input unchanged
    only_output = apply_penalties(logits, SamplingParams(presence_penalty=1.0), [5], [5, 5])
    assert only_output.tolist() == [2.0, -1.0, 0.5, 3.0, -2.0, 0.0]  # presence ignores the prompt
    biased = apply_logit_bias(logits, {2: 1.5, 5: -100.0}, suppressed_token_ids=[3])
    assert biased.tolist() == [2.0, -1.0, 2.0, float("-inf"), -2.0, -99.0]


def test_pipeline_order_temperature_then_top_k_then_top_p():
    """top-p acts on the *renormalised* top-k distribution of the *tempered* logits."""
    logits = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]).log()
    # top-k 3 renormalises to [0.588, 0.235, 0.176]; top-p 0.8 then keeps two tokens (on the original
    # distribution it would keep three: 0.5 + 0.2 < 0.8).
    got = probabilities(logits, SamplingParams(top_k=3, top_p=0.8))
    torch.testing.assert_close(got, torch.tensor([0.5, 0.2, 0, 0, 0]) / 0.7)
    # Temperature 3 flattens first: [.290, .213, .194, .169, .134] -> top-p 0.6 keeps three tokens
    # (untempered, [.5, .2, ...] would keep two).
    tempered = torch.softmax(logits / 3, -1)
    got = probabilities(logits, SamplingParams(temperature=3.0, top_p=0.6))
    expected = torch.cat([tempered[:3] / tempered[:3].sum(), torch.zeros(2)])
    torch.testing.assert_close(got, expected)
    greedy = probabilities(torch.tensor([1.0, 3.0, 3.0, 0.0]), SamplingParams(temperature=0))
    assert greedy.tolist() == [0, 1, 0, 0]


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.9, top_k=7, top_p=0.9),
    SamplingParams(temperature=1.1, top_k=9, top_p=0.95, min_p=0.1),
], ids=["plain", "top_k", "top_p", "top_k_top_p", "with_min_p"])
def test_sample_frequencies_follow_probabilities(params, seed):
    """Chi-square goodness of fit at P_FAIL: a correct sampler fails this once in a million runs."""
    V, rows, rounds = 11, 4000, 5
    logits = torch.randn(V) * 0.8
    probs = probabilities(logits, params)
    generators = [make_generator(seed + i) for i in range(rows)]
    counts = torch.zeros(V, dtype=torch.long)
    for _ in range(rounds):
        tokens = sample(logits.expand(rows, V).clone(), [params] * rows, generators)
        counts += torch.bincount(tokens, minlength=V)
    p_value = chi_square_p_value(counts, probs)
    assert p_value > P_FAIL, f"counts {counts.tolist()} vs probabilities {probs.tolist()}: p = {p_value:.3g}"


def test_rows_are_independent_of_batch_composition(seed):
    V = 50
    logits = torch.randn(3, V)
    params = [SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=0), SamplingParams(top_p=0.9)]
    alone = []
    generator = make_generator(seed)
    for _ in range(20):
        alone.append(sample(logits[2:3], [params[2]], [generator]).item())
    generators = [make_generator(seed + 1), None, make_generator(seed)]
    together = [sample(logits, params, generators).tolist() for _ in range(20)]
    assert [t[2] for t in together] == alone
    assert all(t[1] == logits[1].argmax().item() for t in together)  # greedy rows: argmax
    assert len({t[0] for t in together}) > 1


def test_seeds_reproduce_and_none_uses_global_rng():
    logits = torch.randn(2, 100)
    params = [SamplingParams(seed=7)] * 2
    gen_a, gen_b = make_generator(7), make_generator(7)
    assert [sample(logits[:1], params[:1], [gen_a]).item() for _ in range(10)] == \
        [sample(logits[:1], params[:1], [gen_b]).item() for _ in range(10)]
    assert make_generator(None) is None
    torch.manual_seed(3)
    a = [sample(logits, [SamplingParams()] * 2, [None, None]).tolist() for _ in range(5)]
    torch.manual_seed(3)
    b = [sample(logits, [SamplingParams()] * 2, [None, None]).tolist() for _ in range(5)]
    assert a == b


def test_sample_argument_errors():
    with pytest.raises(ValueError, match="2 rows of logits but 1 params"):
        sample(torch.zeros(2, 5), [SamplingParams()], [None, None])

