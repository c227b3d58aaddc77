"""Sampling: validated params, filters in the right order, draws that follow the exact distribution."""

from __future__ import annotations

import re

import pytest
import torch

from miniinfer.sampling import (
    SamplingParams,
    apply_temperature,
    make_generator,
    probabilities,
    sample,
    top_k_filter,
    top_p_filter,
)

# Statistical tests: each fails by chance with probability P_FAIL when the sampler is right.
P_FAIL = 1e-6


def test_defaults_match_design():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens, p.seed, p.ignore_eos, p.stop, p.n) == \
        (1.0, 0, 1.0, 64, None, False, None, 1)
    assert SamplingParams(stop="\n\n").stop_strings == ["\n\n"]
    assert SamplingParams(stop=["a", "b"]).stop_strings == ["a", "b"] and p.stop_strings == []
    assert SamplingParams(temperature=0).greedy


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "1"),
    ("top_k", -1), ("top_k", 2.5), ("top_k", True),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.2), ("top_p", None),
    ("max_tokens", 0), ("max_tokens", 3.0), ("max_tokens", -5),
    ("seed", 1.5), ("seed", "42"),
    ("ignore_eos", 1), ("stop", ""), ("stop", ["ok", ""]), ("stop", 5), ("stop", [None]),
    ("n", 0), ("n", 2.0),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} .*got {re.escape(repr(value))}"):
        SamplingParams(**{field: value})


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


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(X² >= observed) for counts drawn from probs (zero-probability entries must have zero counts)."""
    assert counts[probs == 0].sum().item() == 0, "drew a token whose probability is 0"
    nonzero = probs > 0
    n = counts.sum().item()
    expected = n * probs[nonzero].double()
    assert expected.min().item() >= 5, "too few expected draws for a chi-square test"
    statistic = ((counts[nonzero].double() - expected) ** 2 / expected).sum()
    df = nonzero.sum().item() - 1
    if df == 0:
        return 1.0
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), statistic / 2).item()


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.9, top_k=7, top_p=0.9),
], ids=["plain", "top_k", "top_p", "all"])
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

