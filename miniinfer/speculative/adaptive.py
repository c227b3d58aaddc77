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

import math
from dataclasses import dataclass

from miniinfer.speculative.acceptance import expected_tokens_per_step

__all__ = ["speedup", "best_gamma", "AdaptiveGamma", "select_proposer", "SpeculationGate"]


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

    ``alpha`` is the α of :func:`~miniinfer.speculative.acceptance.expected_tokens_per_step`: the chance
    that a guess is accepted once every guess before it was. Each verified sequence tests its guesses
    left to right until the first rejection, so it contributes ``accepted`` successes out of
    ``accepted + (1 if a guess was rejected)`` tests — the guesses after a rejection were never tested.
    (Accepted / proposed would count those untested guesses as failures: at γ = 4 and a true α of
    0.75 it reads 0.51, and the γ it calls for is too small.) ``alpha`` is successes / tests over the
    steps so far, each step's counts weighted ``decay`` per step into the past; the starting value
    counts as ``prior_tests`` tests, which fade the same way — one unlucky first step does not decide γ.
    ``cost_ratio`` is an exponential moving average of (draft seconds per guessed token) / (target
    seconds per verify step). γ never drops to 0 for good: at least ``min_gamma`` guesses keep
    measuring α.
    """

    max_gamma: int = 8
    min_gamma: int = 1
    alpha: float = 0.7
    cost_ratio: float = 0.1
    decay: float = 0.9
    measure_cost: bool = True   # False: keep cost_ratio as given (a known cost, or a test)
    prior_tests: float = 2.0    # the weight of the starting alpha, in tested guesses
    _seen_cost: bool = False

    def __post_init__(self):
        self._tests = self.prior_tests               # decayed sums: tested guesses,
        self._successes = self.alpha * self.prior_tests  # accepted ones
        # batch bucket -> cost per guess of a speculative step, in plain decode steps of that batch size
        self.step_costs: dict[int, float] = {}

    @property
    def gamma(self) -> int:
        return max(self.min_gamma, best_gamma(self.alpha, self.cost_ratio, self.max_gamma))

    def gamma_for(self, batch_size: int) -> int:
        """γ for a decode step of ``batch_size`` sequences: from the measured cost of speculative steps at
        that batch size (its power-of-two bucket) against a plain step, once known; else :attr:`gamma`.

        :func:`speedup`'s "a verify costs one decode step" fails where the matmuls are bound by arithmetic
        (a CPU, a large batch): a verify of B·(1 + γ) rows costs ~(1 + β·γ) plain steps of B rows. So
        per bucket the cost per guess is measured whole — draft time plus the verify's excess over a plain
        step, both in plain steps: ``(draft + verify − plain) / plain / γ`` — and γ maximises
        ``E(α, γ) / (1 + cost·γ)`` with it (at batch 16 on a CPU: γ = 1–2 where batch 1 takes 4–8). A
        batch size not measured yet interpolates (in log₂ of the batch size) between the measured sizes
        around it, takes the nearest larger one's cost if none is smaller (a guess costs relatively more
        in a larger batch: the choice errs towards fewer guesses), and tries ``min_gamma`` above all of
        them."""
        bucket = _batch_bucket(batch_size)
        cost = self.step_costs.get(bucket)
        if cost is None:
            if not self.step_costs:
                return self.gamma
            larger = [b for b in self.step_costs if b > bucket]
            smaller = [b for b in self.step_costs if b < bucket]
            if not larger:
                return self.min_gamma
            high = min(larger)
            cost = self.step_costs[high]
            if smaller:  # in log₂ of the batch size itself (15 sequences sit next to 16, not 8)
                low = max(smaller)
                t = min(1.0, math.log2(batch_size / low) / math.log2(high / low))
                cost = (1 - t) * self.step_costs[low] + t * cost
        return max(self.min_gamma, best_gamma(self.alpha, cost, self.max_gamma))

    def observe_step_cost(self, batch_size: int, guesses: int, speculative_seconds: float,
                          plain_seconds: float) -> None:
        """One speculative step of ``batch_size`` sequences with up to ``guesses`` guesses each took
        ``speculative_seconds`` (proposing and verifying); a plain step of that size takes ``plain_seconds``."""
        if not self.measure_cost or guesses <= 0 or plain_seconds <= 0:
            return
        cost = max(speculative_seconds / plain_seconds - 1.0, 0.0) / guesses
        bucket = _batch_bucket(batch_size)
        old = self.step_costs.get(bucket)
        self.step_costs[bucket] = cost if old is None else self.decay * old + (1 - self.decay) * cost

    def observe(self, num_proposed: int, num_accepted: int, draft_seconds: float | None = None,
                target_seconds: float | None = None, draft_steps: int = 1, num_rejected: int | None = None) -> None:
        """Fold one step in: how many guesses were proposed and accepted (summed over the batch), and how
        many of the verified sequences had a guess rejected (``num_rejected``; None: every proposed guess
        counts as tested, as for one sequence whose guesses were each tested on their own), and
        optionally the time the proposer took for its ``draft_steps`` guesses per sequence (one batched
        draft forward each) and the time of the verify step."""
        if num_proposed > 0:
            tests = num_proposed if num_rejected is None else num_accepted + num_rejected
            self._tests = self.decay * self._tests + tests
            self._successes = self.decay * self._successes + num_accepted
            if self._tests > 0:
                self.alpha = min(1.0, self._successes / self._tests)
        # The first cost measurement replaces the prior; later ones are averaged in.
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


def _batch_bucket(batch_size: int) -> int:
    """Batch sizes grouped by powers of two (1, 2, 4, 8, 16, …): a step's cost changes with its batch."""
    return 1 << (max(batch_size, 1).bit_length() - 1)


@dataclass
class SpeculationGate:
    """Whether to speculate at all, from measured cost per emitted token rather than from the model above.

    :func:`speedup` assumes a verify forward of γ + 1 tokens costs about one decode step. That holds
    while decoding is bound by reading the weights (a GPU at small batch), not where the matmuls are
    bound by arithmetic — a CPU, or a large batch anywhere: there a batch of 16 verifying 5 tokens each
    is an 80-row forward, several times a 16-row decode step, and speculation loses even at a good α.
    So ``num_speculative_tokens="auto"`` also measures, per batch size (powers of two), the seconds per
    emitted token of speculative steps and of plain ones, and speculates while that is the cheaper.

    Each kind's cost is the total time over the total tokens of its last ``window`` steps: a ratio of
    sums, not a mean or a floor of per-step ratios, because a speculative step's tokens vary with the
    luck of its acceptances (the best single step would flatter speculation), and a one-off cost (a new
    request's prompt going through the draft) fades out of the window. The first ``2 × warmup`` decode
    steps of a batch size alternate the two kinds; after
    that every ``probe_every``-th runs the other kind once, so a change (longer contexts, another mix
    of requests) is noticed; while probes keep losing by more than ``decisive`` the interval doubles
    (up to ``max_probe_every``: a probe of speculation after plain steps also pays the draft's catch-up
    on every token it skipped), and it drops back as soon as one does not; costs within ``hysteresis``
    keep the current choice. A batch size not measured yet follows its nearest measured neighbour and
    measures the kind it lacks every ``probe_every``-th step.
    """

    probe_every: int = 8
    warmup: int = 2
    window: int = 6
    margin: float = 1.0   # speculate while its cost per token < margin × plain's
    max_probe_every: int = 64
    decisive: float = 1.1  # a probe that costs this much more per token than the other kind doubles the interval
    hysteresis: float = 0.03  # costs per token closer than this (relative) keep the current choice

    def __post_init__(self):
        # (bucket, speculative) -> recent steps' (seconds, tokens)
        self.steps: dict[tuple[int, bool], list[tuple[float, int]]] = {}
        self.num_steps: dict[int, int] = {}
        self.interval: dict[int, int] = {}      # bucket -> steps between probes (grows while probes lose clearly)
        self.last_probe: dict[int, int] = {}    # bucket -> the step of its last probe
        self.probing: dict[int, bool] = {}      # bucket -> the kind its pending probe runs
        self.preferred: dict[int, bool] = {}    # bucket -> the kind its latest decision preferred
        self.again: set[int] = set()            # buckets whose next step speculates to be measured
        self.borrowed: set[int] = set()         # buckets that started from a neighbour's costs (no warm-up)

    def measure_again(self, batch_size: int) -> None:
        """The latest speculative step of this size carried a one-off cost and was not recorded: run the
        next one speculatively too (not counted as a step of the schedule), and record that one."""
        self.again.add(_batch_bucket(batch_size))

    def plain_step_seconds(self, batch_size: int) -> float | None:
        """Measured seconds of a plain decode step of ``batch_size`` sequences (its bucket's cost per token
        × the batch size), or None."""
        cost = self.cost(_batch_bucket(batch_size), False)
        return None if cost is None else cost * batch_size

    def cost(self, bucket: int, speculative: bool) -> float | None:
        """Seconds per emitted token of that kind of step at that batch size (None: not measured)."""
        recent = self.steps.get((bucket, speculative))
        return sum(s for s, _ in recent) / sum(t for _, t in recent) if recent else None

    def speculate(self, batch_size: int) -> bool:
        """Decide for one decode step of ``batch_size`` sequences (call once per such step)."""
        bucket = _batch_bucket(batch_size)
        if bucket in self.again:
            self.again.discard(bucket)
            return True
        step = self.num_steps[bucket] = self.num_steps.get(bucket, 0) + 1
        spec, plain = self.cost(bucket, True), self.cost(bucket, False)
        if spec is None or plain is None:
            measured = [b for b in self.num_steps if self.cost(b, True) is not None and self.cost(b, False) is not None]
            if not measured:  # nothing known at all: speculation first, then plain decoding
                return step % 2 == 1
            # A new size follows its nearest measured neighbour (a batch passing through — the last
            # sequences of a wave finishing — gains nothing from experiments); one that lasts measures the
            # kind it lacks every probe_every-th step.
            self.borrowed.add(bucket)
            if step % self.probe_every == 0:
                return spec is None
            nearest = min(measured, key=lambda b: abs(b.bit_length() - bucket.bit_length()))
            return self.cost(nearest, True) < self.margin * self.cost(nearest, False)
        if step <= 2 * self.warmup and bucket not in self.borrowed:
            return step % 2 == 1
        if len(self.steps[(bucket, True)]) < self.warmup:
            return True  # one speculative step alone (a lucky or unlucky draw) does not decide
        better = spec < self.margin * plain
        previous = self.preferred.get(bucket)
        if previous is not None and previous != better:
            # Switching kinds costs (speculation after plain steps: the draft's catch-up): only for a clear
            # difference — within ``hysteresis`` of each other, the kind chosen before stays.
            if abs(spec - self.margin * plain) < self.hysteresis * self.margin * plain:
                better = previous
            else:  # the choice flipped: probe the loser soon again
                self.interval[bucket] = self.probe_every
        self.preferred[bucket] = better
        interval = self.interval.get(bucket, self.probe_every)
        if step - self.last_probe.get(bucket, 2 * self.warmup) >= interval:  # the probe runs the other kind
            self.last_probe[bucket] = step
            self.probing[bucket] = not better
            return not better
        return better

    def observe(self, batch_size: int, speculative: bool, seconds: float, tokens: int) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        bucket = _batch_bucket(batch_size)
        recent = self.steps.setdefault((bucket, speculative), [])
        recent.append((seconds, tokens))
        del recent[:-self.window]
        if self.probing.get(bucket) is speculative:  # a probe's result: probe less often while it loses clearly
            del self.probing[bucket]
            probed, other = self.cost(bucket, speculative), self.cost(bucket, not speculative)
            interval = self.interval.get(bucket, self.probe_every)
            if other is not None and probed > self.decisive * other:
                self.interval[bucket] = min(2 * interval, self.max_probe_every)
            else:
                self.interval[bucket] = self.probe_every
