"""Statistics shared by the sampling tests: one goodness-of-fit test, used against exact distributions."""

from __future__ import annotations

import torch


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
