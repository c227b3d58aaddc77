"""Chapter 04 — choosing the next token: greedy, temperature, top-k, top-p.

The pipeline, in this order, applied to one row of logits [V]:

1. ``temperature == 0``: greedy, the argmax (no randomness at all);
2. divide the logits by the temperature (< 1 sharpens the distribution, > 1 flattens it);
3. top-k: keep the k largest logits;
4. top-p (nucleus): of the renormalised top-k distribution, keep the smallest set of most likely
   tokens whose probability adds up to at least p;
5. draw from the softmax of what is left.

:func:`probabilities` returns the exact distribution of step 5 — the oracle for statistical tests and
for speculative decoding's acceptance rule (chapter 10). :func:`sample` draws for a batch, each row
with its own ``torch.Generator``, so a request's tokens depend on its seed only, not on which other
requests share the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "apply_temperature", "top_k_filter", "top_p_filter", "probabilities", "sample",
           "make_generator"]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """How to generate for one request (vLLM-compatible names).

    temperature: 0 = greedy; top_k: 0 = off; top_p: 1.0 = off; max_tokens: most tokens to generate;
    seed: makes the request's sampling reproducible (None: torch's global RNG); ignore_eos: keep
    going past end-of-sequence tokens; stop: a string or list of strings that end generation (not
    included in the output); n: number of completions per prompt.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int | None = None
    ignore_eos: bool = False
    stop: str | list[str] | None = None
    n: int = 1

    def __post_init__(self):
        def bad(field: str, why: str):
            raise ValueError(f"SamplingParams.{field} {why}, got {getattr(self, field)!r}")

        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 = off)")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
            bad("top_p", "must be in (0, 1] (1.0 = off)")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "must be an integer or None")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "must be True or False")
        if self.stop is not None:
            stops = [self.stop] if isinstance(self.stop, str) else self.stop
            if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
                bad("stop", "must be a non-empty string or a list of non-empty strings")
        if not _is_int(self.n) or self.n < 1:
            bad("n", "must be an integer >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def stop_strings(self) -> list[str]:
        """``stop`` as a list (empty when None)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits [..., V] / temperature (> 0)."""
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, set the rest to -inf.  logits: [..., V] -> [..., V].

    k == 0 (or k >= V) keeps everything. Logits tied with the k-th largest are all kept.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sum is >= p.

    logits: [..., V] -> [..., V] (dropped entries -inf). A token is kept when the probability of the
    tokens ranked above it is still < p; so the top token is always kept, and p == 1 keeps all.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # probability ranked strictly above
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The exact distribution the sampler draws from.  logits: [V] (or [..., V]) -> probs, same shape, float32.

    Greedy gives a one-hot at the argmax (the first one on ties).
    """
    logits = logits.float()
    if params.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = apply_temperature(logits, params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return torch.softmax(logits, dim=-1)


def make_generator(seed: int | None, device=None) -> torch.Generator | None:
    """A generator for one request: seeded when ``seed`` is given, None (torch's global RNG) otherwise."""
    if seed is None:
        return None
    generator = torch.Generator(device=device if device is not None else "cpu")
    generator.manual_seed(seed)
    return generator


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None], probabilities_fn=None) -> torch.Tensor:
    """One token per row.  logits: [B, V]; params, generators: one per row -> LongTensor [B].

    Greedy rows take the argmax; every other row draws from ``probabilities_fn`` (default
    :func:`probabilities`) with its own generator, so a row's draw never depends on the other rows.
    """
    probabilities_fn = probabilities_fn or probabilities
    if len(params) != logits.shape[0] or len(generators) != logits.shape[0]:
        raise ValueError(f"sample: {logits.shape[0]} rows of logits but {len(params)} params and "
                         f"{len(generators)} generators")
    tokens = logits.argmax(dim=-1)
    for row, (p, generator) in enumerate(zip(params, generators)):
        if p.temperature != 0:
            probs = probabilities_fn(logits[row], p)
            tokens[row] = torch.multinomial(probs, 1, generator=generator)[0]
    return tokens
