"""Statistics shared by the sampling tests: one goodness-of-fit test, used against exact distributions."""

from __future__ import annotations

import torch


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """P(X² >= observed) for counts drawn from probs (zero-probability entries must have zero counts).

    Categories expected fewer than ``min_expected`` times are pooled into one (the usual condition for
    the chi-square approximation), so a random distribution with a few rare tokens still gets a valid
    test instead of an error.
    """
    assert counts[probs == 0].sum().item() == 0, "drew a token whose probability is 0"
    nonzero = probs > 0
    n = counts.sum().item()
    expected = n * probs[nonzero].double()
    observed = counts[nonzero].double()
    rare = expected < min_expected
    if rare.any():
        pooled_expected, pooled_observed = expected[rare].sum(), observed[rare].sum()
        expected, observed = expected[~rare], observed[~rare]
        if pooled_expected >= min_expected or expected.numel() == 0:
            expected = torch.cat([expected, pooled_expected[None]])
            observed = torch.cat([observed, pooled_observed[None]])
        else:  # still too rare alone: fold the pool into the smallest remaining category
            smallest = expected.argmin()
            expected[smallest] += pooled_expected
            observed[smallest] += pooled_observed
    assert expected.min().item() >= min_expected or expected.numel() == 1, "too few draws for a chi-square test"
    statistic = ((observed - expected) ** 2 / expected).sum()
    df = expected.numel() - 1
    if df == 0:
        return 1.0
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), statistic / 2).item()
