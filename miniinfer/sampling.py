"""Chapter 04 — choosing the next token: greedy, temperature, top-k, top-p, min-p (and penalties).

The pipeline, in this order, applied to one row of logits [V]:

0. (needs the sequence's history, so not part of :func:`probabilities`) ``logit_bias`` is added and
   suppressed tokens are set to -inf (:func:`apply_logit_bias`), then the repetition, frequency and
   presence penalties are applied (:func:`apply_penalties`);
1. temperature below ``_SAMPLING_EPS``: greedy, the argmax (no randomness at all);
2. divide the logits by the temperature (< 1 sharpens the distribution, > 1 flattens it);
3. top-k: keep the k largest logits (ties with the k-th kept);
4. top-p (nucleus): of the renormalised top-k distribution, keep the smallest set of most likely
   tokens whose probability adds up to at least p (ties with the last kept token kept);
5. min-p: keep the tokens whose probability is at least ``min_p`` times the most likely one's;
6. draw from the softmax of what is left.

:func:`probabilities` returns the exact distribution of steps 1-6 — the oracle for statistical tests
and for speculative decoding's acceptance rule (chapter 10). :func:`sample` draws for a batch, one
row at a time, each row with its own ``torch.Generator``, so a request's tokens depend on its seed
only, not on which other requests share the batch. The engine uses the batched sampler of
:mod:`miniinfer.sampler`, which computes the same distribution for all rows in one device pass; the
functions here are its readable per-row references.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import torch

__all__ = ["SamplingParams", "apply_temperature", "top_k_filter", "top_p_filter", "min_p_filter", "probabilities",
           "apply_logit_bias", "apply_penalties", "sample", "make_generator"]

#: Temperatures below this count as greedy (vLLM's rule): dividing by them would overflow float32.
_SAMPLING_EPS = 1e-5
#: Most top logprobs a request may ask for, per token (OpenAI's and vLLM's default cap).
MAX_LOGPROBS = 20


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to generate for one request: vLLM's names and meanings. Frozen: build a variant with
    ``dataclasses.replace(params, temperature=0.5)``. Every bad value raises ``ValueError`` naming the field.

    ==============================  ============  ==================================================================
    field                           default       meaning
    ==============================  ============  ==================================================================
    ``n``                           1             completions per prompt (they share the prompt's KV cache)
    ``temperature``                 1.0           >= 0; divides the logits; below 1e-5 (``_SAMPLING_EPS``) = greedy
    ``top_p``                       1.0           (0, 1]; keep the smallest set of most likely tokens with mass >= top_p
    ``top_k``                       0             keep the k most likely tokens; 0 or -1 = off
    ``min_p``                       0.0           [0, 1]; keep tokens with probability >= min_p x the top one's
    ``presence_penalty``            0.0           [-2, 2]; subtracted once from the logit of every token already generated
    ``frequency_penalty``           0.0           [-2, 2]; subtracted once per occurrence in the generated tokens
    ``repetition_penalty``          1.0           > 0; logits of tokens seen in prompt or output: positive / r, negative x r
    ``seed``                        None          int in [0, 2**64): reproducible sampling; None: engine's random stream
    ``stop``                        None          a string or list of strings that end generation
    ``stop_token_ids``              None          token ids that end generation (the token is kept in the ids)
    ``include_stop_str_in_output``  False         keep the matched stop string at the end of the text
    ``ignore_eos``                  False         keep generating past end-of-sequence tokens
    ``max_tokens``                  64            >= 1; most tokens to generate
    ``min_tokens``                  0             [0, max_tokens]; EOS and stop_token_ids are banned until this many
    ``logprobs``                    None          None or 0..20: return the chosen token's log-probability and this
                                                  many top alternatives per generated token
    ``prompt_logprobs``             None          None or 0..20: the same for the prompt tokens
    ``skip_special_tokens``         True          leave special tokens out of the detokenized text
    ``logit_bias``                  None          {token id (>= 0): bias in [-100, 100]} added to the logits
    ==============================  ============  ==================================================================

    Stored normalised and immutable: ``stop`` a string or a tuple, ``stop_token_ids`` a tuple,
    ``logit_bias`` a read-only mapping; float fields are floats.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int = 64
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: Mapping[int, float] | None = None

    def __post_init__(self):
        def bad(field: str, why: str):
            raise ValueError(f"SamplingParams.{field} {why}, got {getattr(self, field)!r}")

        def set_(field: str, value):  # frozen: normalise through object.__setattr__
            object.__setattr__(self, field, value)

        if not _is_int(self.n) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if not _is_number(self.temperature) or self.temperature < 0:
            bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not _is_number(self.top_p) or not (0 < self.top_p <= 1):
            bad("top_p", "must be in (0, 1] (1.0 = off)")
        if not _is_int(self.top_k) or self.top_k < -1:
            bad("top_k", "must be an integer >= 1, or 0 or -1 (off)")
        if not _is_number(self.min_p) or not (0 <= self.min_p <= 1):
            bad("min_p", "must be in [0, 1] (0 = off)")
        for field in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, field)) or not (-2 <= getattr(self, field) <= 2):
                bad(field, "must be in [-2, 2] (0 = off)")
        # Bounded away from 0 and infinity: the penalty divides or multiplies float32 logits, and 1e-38
        # (or 5e-324, which float32 rounds to 0) would turn them into infinities.
        if not _is_number(self.repetition_penalty) or not (2**-31 <= self.repetition_penalty <= 2**31):
            bad("repetition_penalty", "must be a number in [2**-31, 2**31] (1.0 = off)")
        for field in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            set_(field, float(getattr(self, field)))
        if self.seed is not None and (not _is_int(self.seed) or not (0 <= self.seed < 2**64)):
            bad("seed", "must be None or an integer in [0, 2**64)")
        if self.stop is not None:
            stops = (self.stop,) if isinstance(self.stop, str) else self.stop
            if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
                bad("stop", "must be a non-empty string or a list of non-empty strings")
            set_("stop", self.stop if isinstance(self.stop, str) else tuple(self.stop))
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids
            if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids):
                bad("stop_token_ids", "must be a list of token ids (integers >= 0)")
            set_("stop_token_ids", tuple(ids))
        for field in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, field), bool):
                bad(field, "must be True or False")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not _is_int(self.min_tokens) or not (0 <= self.min_tokens <= self.max_tokens):
            bad("min_tokens", f"must be an integer in [0, max_tokens={self.max_tokens}]")
        for field in ("logprobs", "prompt_logprobs"):
            value = getattr(self, field)
            if value is not None and (not _is_int(value) or not (0 <= value <= MAX_LOGPROBS)):
                bad(field, f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        if self.logit_bias is not None:
            bias = self.logit_bias
            if not isinstance(bias, Mapping) or not all(_is_int(t) and t >= 0 for t in bias) or \
                    not all(_is_number(b) and -100 <= b <= 100 for b in bias.values()):
                bad("logit_bias", "must map token ids (integers >= 0) to biases in [-100, 100]")
            set_("logit_bias", MappingProxyType({t: float(b) for t, b in bias.items()}))

    def __hash__(self):  # logit_bias is a mapping: hash its items instead
        values = [getattr(self, f.name) for f in dataclasses.fields(self)]
        if self.logit_bias is not None:
            values[-1] = tuple(sorted(self.logit_bias.items()))
        return hash(tuple(values))

    @property
    def greedy(self) -> bool:
        """Temperature below ``_SAMPLING_EPS`` (vLLM's rule): take the argmax."""
        return self.temperature < _SAMPLING_EPS

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """``stop`` as a tuple (empty when None)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else self.stop

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits [..., V] / temperature (> 0)."""
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, set the rest to -inf.  logits: [..., V] -> [..., V].

    k <= 0 (0 and -1 mean off) or k >= V keeps everything. Logits tied with the k-th largest are all kept.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sum is >= p.

    logits: [..., V] -> [..., V] (dropped entries -inf). A token is kept when the probability of the
    tokens ranked above it is still < p; so the top token is always kept, and p == 1 keeps all.
    Ties: tokens tied with the last kept token are kept too (as in :func:`top_k_filter`), so the
    result does not depend on how the sort orders equal logits — the rule the batched sampler uses.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # probability ranked strictly above
    drop_sorted = mass_before >= p
    # The smallest kept logit is the threshold; everything at or above it stays (ties included).
    threshold = sorted_logits.masked_fill(drop_sorted, float("inf")).amin(dim=-1, keepdim=True)
    return logits.masked_fill(logits < threshold, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep the tokens whose probability is >= min_p x the top token's.  logits: [..., V] -> [..., V].

    min_p == 0 keeps everything. The ratio of two probabilities does not change when the
    distribution is renormalised, so min-p needs no sort and gives the same set before or after top-p.
    """
    if min_p <= 0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The exact distribution the sampler draws from.  logits: [V] (or [..., V]) -> probs, same shape, float32.

    Temperature, then top-k, then top-p, then min-p, then softmax. Greedy (temperature below
    ``_SAMPLING_EPS``) gives a one-hot at the argmax (the first one on ties). Penalties and
    ``logit_bias`` need the sequence's history: apply :func:`apply_logit_bias` and
    :func:`apply_penalties` to the logits first.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = apply_temperature(logits, params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    logits = min_p_filter(logits, params.min_p)
    return torch.softmax(logits, dim=-1)


def apply_logit_bias(logits: torch.Tensor, logit_bias: Mapping[int, float] | None,
                     suppressed_token_ids: Sequence[int] = ()) -> torch.Tensor:
    """One row: add ``logit_bias`` (token id -> bias), then set suppressed tokens to -inf.  logits [V] -> [V]."""
    logits = logits.float().clone()
    for token, bias in (logit_bias or {}).items():
        logits[token] += bias
    for token in suppressed_token_ids:
        logits[token] = float("-inf")
    return logits


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_token_ids: Sequence[int],
                    output_token_ids: Sequence[int]) -> torch.Tensor:
    """One row, vLLM's penalties.  logits [V] -> [V] (float32, a new tensor).

    * repetition (r): every token seen in the prompt or the output: a positive logit is divided by r,
      a negative one multiplied by r (r > 1 makes it less likely either way);
    * frequency (f): subtract f x (times the token occurs in the output);
    * presence (q): subtract q once from every token that occurs in the output.
    """
    logits = logits.float().clone()
    counts: dict[int, int] = {}
    for token in output_token_ids:
        counts[token] = counts.get(token, 0) + 1
    r = params.repetition_penalty
    for token in set(prompt_token_ids) | set(counts):
        logits[token] = logits[token] / r if logits[token] > 0 else logits[token] * r
    for token, count in counts.items():
        logits[token] -= params.frequency_penalty * count + params.presence_penalty
    return logits


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
    Penalties and ``logit_bias`` are not applied here (see :mod:`miniinfer.sampler`).
    """
    probabilities_fn = probabilities_fn or probabilities
    if len(params) != logits.shape[0] or len(generators) != logits.shape[0]:
        raise ValueError(f"sample: {logits.shape[0]} rows of logits but {len(params)} params and "
                         f"{len(generators)} generators")
    tokens = logits.argmax(dim=-1)
    for row, (p, generator) in enumerate(zip(params, generators)):
        if not p.greedy:
            probs = probabilities_fn(logits[row], p)
            tokens[row] = torch.multinomial(probs, 1, generator=generator)[0]
    return tokens
