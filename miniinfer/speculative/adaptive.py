"""Choosing how many tokens to guess (γ), and which proposer to guess with, from measurements.

With acceptance rate α and a proposer that costs ``c`` target steps per guessed token (the measured
ratio of one draft forward to one target forward), one speculative step costs ``1 + c·γ`` target
steps and emits ``E(α, γ) = (1 − α^{γ+1}) / (1 − α)`` tokens on average, so the speed-up over plain
decoding is

    speedup(α, γ, c) = E(α, γ) / (1 + c·γ)

(it assumes the verify forward of γ + 1 tokens costs about one decode step, which holds while
decoding is bound by reading the weights). :func:`best_gamma` maximises it; :class:`AdaptiveGamma`
keeps running estimates of α and c and re-chooses γ as they move; :func:`select_proposer` ranks
proposers by the same number.
"""

from __future__ import annotations

from dataclasses import dataclass

from miniinfer.speculative.acceptance import expected_tokens_per_step

__all__ = ["speedup", "best_gamma", "AdaptiveGamma", "select_proposer"]


def speedup(alpha: float, gamma: int, cost_ratio: float) -> float:
    """Tokens per unit of target time, relative to plain decoding (1.0 = no gain)."""
    return expected_tokens_per_step(alpha, gamma) / (1.0 + cost_ratio * gamma)


def best_gamma(alpha: float, cost_ratio: float, max_gamma: int = 8) -> int:
    """The γ in 0 … max_gamma with the largest :func:`speedup` (0: do not speculate)."""
    alpha = min(max(alpha, 0.0), 1.0)
    return max(range(max_gamma + 1), key=lambda g: (speedup(alpha, g, cost_ratio), -g))


@dataclass
class AdaptiveGamma:
    """Running estimates of the acceptance rate and the cost ratio, and the γ they call for.

    ``alpha`` is an exponential moving average of accepted / proposed guesses (weight ``decay`` on
    the past, per step); ``cost_ratio`` one of (draft seconds per guessed token) / (target seconds per
    verify step). γ never drops to 0 for good: at least ``min_gamma`` guesses keep measuring α.
    """

    max_gamma: int = 8
    min_gamma: int = 1
    alpha: float = 0.7
    cost_ratio: float = 0.1
    decay: float = 0.9
    measure_cost: bool = True   # False: keep cost_ratio as given (a known cost, or a test)
    _seen_alpha: bool = False
    _seen_cost: bool = False

    @property
    def gamma(self) -> int:
        return max(self.min_gamma, best_gamma(self.alpha, self.cost_ratio, self.max_gamma))

    def observe(self, num_proposed: int, num_accepted: int, draft_seconds: float | None = None,
                target_seconds: float | None = None, draft_steps: int = 1) -> None:
        """Fold one step in: how many guesses were proposed and accepted (summed over the batch), and
        optionally the time the proposer took for its ``draft_steps`` guesses per sequence (one batched
        draft forward each) and the time of the verify step."""
        # The first measurement replaces the prior; later ones are averaged in.
        if num_proposed > 0:
            rate = num_accepted / num_proposed
            self.alpha = rate if not self._seen_alpha else self.decay * self.alpha + (1 - self.decay) * rate
            self._seen_alpha = True
        if self.measure_cost and draft_seconds is not None and target_seconds and draft_steps > 0:
            ratio = draft_seconds / target_seconds / draft_steps
            self.cost_ratio = (ratio if not self._seen_cost
                               else self.decay * self.cost_ratio + (1 - self.decay) * ratio)
            self._seen_cost = True


def select_proposer(measurements: dict[str, tuple[float, float]], max_gamma: int = 8) -> tuple[str, int, float]:
    """measurements: name -> (acceptance rate α, cost ratio c). Returns the (name, γ, predicted speed-up)
    with the largest speed-up at its own best γ: acceptance × cost, in one number."""
    best = None
    for name, (alpha, cost) in measurements.items():
        gamma = best_gamma(alpha, cost, max_gamma)
        gain = speedup(min(max(alpha, 0.0), 1.0), gamma, cost)
        if best is None or gain > best[2]:
            best = (name, gamma, gain)
    if best is None:
        raise ValueError("select_proposer: no measurements")
    return best
