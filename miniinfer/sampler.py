"""The batched sampler: one device pass turns a step's logits [N, V] into N tokens.

:mod:`miniinfer.sampling` teaches the pipeline one row at a time (a Python loop, a sort per row for
top-p, a ``torch.Generator`` per row). The engine needs it for the whole batch at once, without
waiting for the GPU: this module computes the same distributions with batched tensor ops only —
no Python loop over rows, no ``.item()``/``.tolist()``/``.cpu()`` and no shape that depends on the
data between the logits and the returned token tensor — so the host can prepare the next step while
the device samples, and the whole function can later be captured in a CUDA graph.

Two objects per step:

* :class:`SamplingRow` — the host's description of one sequence (its params, its random stream,
  its token history);
* :class:`SamplingBatch` — built once per step from the rows: per-row parameter tensors, plus flags
  known on the host (``any_top_p`` ...) so that a feature no row uses costs nothing.

:func:`sample_batch` then processes every row in this order (the order of vLLM):

1. ``logit_bias`` is added, suppressed tokens (EOS while ``min_tokens`` is not reached) set to -inf;
2. penalties: repetition (prompt + output tokens: positive logits / r, negative x r), frequency
   (- f x count in the output), presence (- q once per token in the output);
3. greedy rows (temperature < 1e-5) take the argmax of these processed logits;
4. divide by the temperature; 5. top-k (ties kept); 6. softmax; 7. top-p (ties at the threshold
   kept); 8. min-p (probability >= min_p x the top one); 9. draw.

**Top-p without a sort.** The nucleus is {v : p_v >= t} for the threshold t = the probability of the
token that crosses top_p. t is found by a radix select over the float bits of the probabilities:
non-negative float32s compare like their int32 bit patterns, so passes of per-row probability histograms
over digits of the bits pin down t's 30 significant bits exactly — O(V) per row instead of a sort's
O(V log V). What runs where (:func:`top_p_threshold`): on CUDA, one Triton launch with one program per
row, 8 passes of 16-bin histograms kept in registers (:mod:`miniinfer.kernels.top_p_triton`; the torch
version's ``scatter_add_`` atomics serialise on near-uniform rows); on the CPU, a sort for a single row
and otherwise the torch radix select, :func:`top_p_threshold_radix` (three passes of ``scatter_add_``
into [N, 1024]), which is also the reference the other two are tested against.

**Random numbers that do not depend on the batch.** Row n's draw at its step s uses one uniform u
that is a function of (seed_n, s) only: the s-th output of SplitMix64 seeded with the row's
seed, computed with int64 tensor ops on [N]. The token is then found by inverting the cumulative
distribution in vocabulary order: the first v whose prefix sum (float64) exceeds u x the kept mass.
That is exact, needs one random number per row instead of one per token, and a seeded request gets
the same tokens alone or in any batch (as long as its logits are the same).

**Rows that cannot be sampled.** A row whose processed logits contain NaN or +inf, or in which every
token is -inf, gets token -1 (and NaN logprobs); the other rows are unaffected. The engine fails
just that request.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from miniinfer.sampling import SamplingParams

__all__ = ["SamplingRow", "SamplingBatch", "SamplerOutput", "sample_batch", "batch_probabilities", "process_logits",
           "filtered_probs", "top_p_threshold", "derive_seed", "uniform_from_seed", "check_token_ids"]

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment


def _signed64(x: int) -> int:
    """An unsigned 64-bit integer as the int64 with the same bits (torch has no uint64 arithmetic)."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _mix64_int(z: int) -> int:
    """SplitMix64's finaliser on Python ints (the reference for :func:`_mix64`)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, index: int) -> int:
    """The stream seed of completion ``index`` of a request seeded ``seed``: a 64-bit value, different
    for every index and unrelated for neighbouring seeds (so ``seed=1, index=1`` is not ``seed=2, index=0``)."""
    return _mix64_int(_mix64_int(seed) + (index + 1) * _GOLDEN_GAMMA)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic: it copies the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on an int64 tensor; multiplications wrap modulo 2**64 like the uint64 original."""
    z = (z ^ _shr(z, 30)) * _signed64(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _signed64(0x94D049BB133111EB)
    return z ^ _shr(z, 31)


def uniform_from_seed(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One uniform in [0, 1 - 2**-40] per row: the ``step``-th output of SplitMix64 seeded with mix(seed).

    seeds, steps: [N] int64 (seeds are 64-bit patterns) -> [N] float64. A pure function of
    (seed, step): counter-based, so no generator state, and any row can be recomputed alone.
    """
    key = _mix64(seeds)
    bits = _mix64(key + (steps + 1) * _signed64(_GOLDEN_GAMMA))
    # The top 40 bits: u x mass then stays below the total mass in float64 (see _inverse_cdf).
    return _shr(bits, 24).double() * 2.0 ** -40


def uniform_from_seed_reference(seed: int, step: int) -> float:
    """:func:`uniform_from_seed` for one row, with Python's exact integers (tests compare the two)."""
    bits = _mix64_int(_mix64_int(seed) + (step + 1) * _GOLDEN_GAMMA)
    return (bits >> 24) * 2.0 ** -40


_SMALLEST_TOP_P = 1e-30  # well above float32's smallest normal (1.2e-38), far below any 1/V


@dataclass
class SamplingRow:
    """The host-side description of one row (one sequence) of a sampling step."""

    params: SamplingParams
    #: 64-bit stream seed of this sequence (the engine derives it: :func:`derive_seed` of params.seed and
    #: the completion index for seeded requests, its own RNG for unseeded ones)
    seed: int
    #: how many tokens this sequence has generated so far: the counter of its random stream
    step: int
    #: for repetition_penalty (vLLM: applies to prompt + output tokens)
    prompt_token_ids: Sequence[int]
    #: for presence/frequency (output only) and repetition
    output_token_ids: Sequence[int]
    #: banned this step (the engine passes EOS + stop_token_ids while min_tokens is not reached)
    suppressed_token_ids: Sequence[int] = ()


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """Raise ValueError when ``logit_bias`` or ``stop_token_ids`` name a token outside [0, vocab_size):
    the engine calls this when it admits a request, so that :meth:`SamplingBatch.build` never fails."""
    for token in (params.logit_bias or {}):
        if token >= vocab_size:
            raise ValueError(f"SamplingParams.logit_bias names token {token}, outside the vocabulary of "
                             f"{vocab_size} tokens")
    for token in params.stop_token_ids or ():
        if token >= vocab_size:
            raise ValueError(f"SamplingParams.stop_token_ids names token {token}, outside the vocabulary of "
                             f"{vocab_size} tokens")


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without blocking the host: through pinned memory on CUDA
    (a plain ``.to("cuda")`` from pageable memory waits for the stream, i.e. for the model's forward)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@dataclass
class SamplingBatch:
    """Device tensors for one step, built once from the rows by :meth:`build`.

    Per row ([N]): ``temperature`` f32 (1.0 for greedy rows, so dividing is harmless), ``top_k`` i64
    (0 = off), ``top_p`` f32 (1.0 = off), ``min_p`` f32, ``greedy`` bool, ``seeds``/``steps`` i64.
    Host flags decide which stages run at all. Penalty data exist only when a row uses penalties,
    and cover only those rows (``penalty_rows`` [M]); bias and suppression are flat index lists.
    """

    num_rows: int
    vocab_size: int
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    greedy: torch.Tensor
    seeds: torch.Tensor
    steps: torch.Tensor
    all_greedy: bool
    any_greedy: bool
    any_top_k: bool
    max_top_k: int
    any_top_p: bool
    any_min_p: bool
    #: None when no row asked for logprobs, else the largest number of top logprobs asked (0 allowed)
    max_logprobs: int | None
    any_penalties: bool = False
    penalty_rows: torch.Tensor | None = None          # [M] int64: the rows that use penalties
    repetition_penalty: torch.Tensor | None = None    # [M, 1] f32
    frequency_penalty: torch.Tensor | None = None     # [M, 1] f32
    presence_penalty: torch.Tensor | None = None      # [M, 1] f32
    output_counts: torch.Tensor | None = None         # [M, V] f32: occurrences in the output
    seen: torch.Tensor | None = None                  # [M, V] bool: in the prompt or the output
    any_bias: bool = False
    bias_index: tuple[torch.Tensor, torch.Tensor] | None = None   # (rows, tokens), each [B] int64
    bias_values: torch.Tensor | None = None                       # [B] f32
    any_suppressed: bool = False
    suppressed_index: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, tokens)
    rows: list[SamplingRow] = field(default_factory=list, repr=False)

    @classmethod
    def build(cls, rows: list[SamplingRow], vocab_size: int, device) -> SamplingBatch:
        device = torch.device(device)
        N, V = len(rows), vocab_size
        if N == 0:
            raise ValueError("SamplingBatch.build: no rows")
        params = [r.params for r in rows]
        greedy = [p.greedy for p in params]
        # top_k >= V keeps everything: the same as off, and keeps torch.topk's k <= V.
        top_k = [p.top_k if 0 < p.top_k < V and not g else 0 for p, g in zip(params, greedy)]
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        # top_p is clamped to a float32 normal number: a positive top_p such as 1e-46 would round to 0 in
        # float32, and a 0 would keep no token at all. Any top_p at or below the largest probability (at
        # least 1/V) keeps just the top token, so the clamp changes nothing else.
        floats = _to_device([[1.0 if g else p.temperature, max(p.top_p, _SMALLEST_TOP_P), p.min_p]
                             for p, g in zip(params, greedy)],
                            torch.float32, device)
        ints = _to_device([[k, _signed64(r.seed), r.step, g] for r, k, g in zip(rows, top_k, greedy)],
                          torch.int64, device)
        batch = cls(
            num_rows=N, vocab_size=V,
            temperature=floats[:, 0], top_p=floats[:, 1], min_p=floats[:, 2],
            top_k=ints[:, 0], seeds=ints[:, 1], steps=ints[:, 2], greedy=ints[:, 3].bool(),
            all_greedy=all(greedy), any_greedy=any(greedy),
            any_top_k=any(k > 0 for k in top_k), max_top_k=max(top_k),
            any_top_p=any(p.top_p < 1 and not g for p, g in zip(params, greedy)),
            any_min_p=any(p.min_p > 0 and not g for p, g in zip(params, greedy)),
            max_logprobs=max(logprobs) if logprobs else None,
            rows=rows,
        )
        batch._build_penalties(rows, device)
        batch._build_bias_and_suppression(rows, device)
        return batch

    def _build_penalties(self, rows: list[SamplingRow], device: torch.device) -> None:
        """Dense [M, V] occurrence counts and seen-masks for the M rows with penalties, scattered on the
        device from flat token lists (one host->device copy each).

        Host cost: one conversion of every history token to a tensor, each step (about 20-40 ns a token);
        an engine that keeps each sequence's tokens in a tensor could pass those instead.
        """
        with_penalties = [i for i, r in enumerate(rows) if r.params.uses_penalties]
        if not with_penalties:
            return
        M, V = len(with_penalties), self.vocab_size
        outputs = [rows[i].output_token_ids for i in with_penalties]
        # Only repetition looks at the prompt.
        prompts = [rows[i].prompt_token_ids if rows[i].params.repetition_penalty != 1 else () for i in with_penalties]
        out_tokens = torch.tensor(list(itertools.chain.from_iterable(outputs)), dtype=torch.int64)
        prompt_tokens = torch.tensor(list(itertools.chain.from_iterable(prompts)), dtype=torch.int64)
        for tokens in (out_tokens, prompt_tokens):
            if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
                bad = tokens[(tokens < 0) | (tokens >= V)][0].item()
                raise ValueError(f"SamplingBatch.build: token id {bad} outside the vocabulary of {V} tokens")
        out_rows = torch.repeat_interleave(torch.arange(M), torch.tensor([len(t) for t in outputs], dtype=torch.int64))
        prompt_rows = torch.repeat_interleave(torch.arange(M), torch.tensor([len(t) for t in prompts], dtype=torch.int64))
        index = torch.stack([torch.cat([out_rows, prompt_rows]), torch.cat([out_tokens, prompt_tokens])])
        index = index.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else index.to(device)
        n_out = len(out_tokens)
        p = [rows[i].params for i in with_penalties]
        values = _to_device([[q.repetition_penalty, q.frequency_penalty, q.presence_penalty] for q in p],
                            torch.float32, device)
        counts = torch.zeros(M, V, dtype=torch.float32, device=device)
        counts.index_put_((index[0, :n_out], index[1, :n_out]), torch.ones((), device=device).expand(n_out),
                          accumulate=True)
        seen = counts > 0
        # index_put_ with a device scalar (``seen[i, j] = True`` would copy a host scalar: a sync on CUDA).
        seen.index_put_((index[0, n_out:], index[1, n_out:]), torch.ones((), dtype=torch.bool, device=device))
        self.any_penalties = True
        self.penalty_rows = _to_device(with_penalties, torch.int64, device)
        self.repetition_penalty, self.frequency_penalty, self.presence_penalty = (
            values[:, 0:1], values[:, 1:2], values[:, 2:3])
        self.output_counts, self.seen = counts, seen

    def _build_bias_and_suppression(self, rows: list[SamplingRow], device: torch.device) -> None:
        V = self.vocab_size
        bias_rows, bias_tokens, bias_values, sup_rows, sup_tokens = [], [], [], [], []
        for i, row in enumerate(rows):
            for token, value in (row.params.logit_bias or {}).items():
                bias_rows.append(i)
                bias_tokens.append(token)
                bias_values.append(value)
            for token in row.suppressed_token_ids:
                sup_rows.append(i)
                sup_tokens.append(token)
        for token in (*bias_tokens, *sup_tokens):
            if not 0 <= token < V:
                raise ValueError(f"SamplingBatch.build: token id {token} (logit_bias or suppressed) outside the "
                                 f"vocabulary of {V} tokens")
        if bias_rows:
            index = _to_device([bias_rows, bias_tokens], torch.int64, device)
            self.any_bias, self.bias_index = True, (index[0], index[1])
            self.bias_values = _to_device(bias_values, torch.float32, device)
        if sup_rows:
            index = _to_device([sup_rows, sup_tokens], torch.int64, device)
            self.any_suppressed, self.suppressed_index = True, (index[0], index[1])


@dataclass
class SamplerOutput:
    #: [N] int64 on the logits' device; -1 for rows whose logits cannot be sampled (NaN, +inf, all -inf)
    token_ids: torch.Tensor
    #: [N] f32: log-prob of the chosen token under the raw model distribution (log_softmax of the
    #: unprocessed logits, vLLM's default "raw_logprobs"); NaN for token -1; None when no row asked
    logprobs: torch.Tensor | None
    #: [N, K] int64 and f32, K = the largest number asked (rows asking fewer use a prefix); None when K == 0
    top_logprob_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None


# -- the stages -------------------------------------------------------------------------------------

def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """Repetition, frequency and presence penalties on the rows that use them, in place.  logits [N, V]."""
    rows = batch.penalty_rows
    z = logits.index_select(0, rows)                                     # [M, V]
    r = batch.repetition_penalty
    z = torch.where(batch.seen, torch.where(z > 0, z / r, z * r), z)
    counts = batch.output_counts
    z = z - batch.frequency_penalty * counts - batch.presence_penalty * (counts > 0)
    logits.index_copy_(0, rows, z)


def _top_k_mask(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """Per-row k: -inf below each row's k-th largest logit (ties kept), in place.  logits [N, V]."""
    values = torch.topk(logits, batch.max_top_k, dim=-1).values              # [N, max k], descending
    kth = values.gather(1, (batch.top_k - 1).clamp(min=0).unsqueeze(1))      # [N, 1]
    kth = kth.masked_fill((batch.top_k == 0).unsqueeze(1), float("-inf"))    # k off: keep all
    logits.masked_fill_(logits < kth, float("-inf"))


_DIGIT_BITS = 10
_NUM_BUCKETS = 1 << _DIGIT_BITS


def top_p_threshold(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row, the nucleus threshold as float32 bits: keep {v : bits(p_v) >= threshold}.

    probs [N, V] float32 in [0, 1], top_p [N] -> [N] int32; the semantics of :func:`top_p_threshold_radix`.
    On CUDA with triton: one Triton launch (:mod:`miniinfer.kernels.top_p_triton`, no atomics); on the
    CPU: a sort (:func:`_top_p_threshold_sort`) for a single row, the radix select in torch otherwise
    (measured faster from 2 rows on: see the numbers above :func:`_top_p_threshold_sort`).
    """
    global _TRITON_TOP_P_ERROR
    if probs.is_cuda and _have_triton() and _TRITON_TOP_P_ERROR is None:
        from miniinfer.kernels.top_p_triton import top_p_threshold_triton
        try:
            return top_p_threshold_triton(probs, top_p)
        except Exception as error:  # noqa: BLE001 - a kernel that does not compile here: fall back, say so once
            _TRITON_TOP_P_ERROR = error
            import warnings

            warnings.warn(f"top-p: the Triton kernel failed ({type(error).__name__}: {error}); using the torch "
                          "radix select", stacklevel=2)
    if probs.device.type == "cpu" and probs.shape[0] == 1:
        return _top_p_threshold_sort(probs, top_p)
    return top_p_threshold_radix(probs, top_p)


_TRITON_TOP_P_ERROR: Exception | None = None


@functools.cache
def _have_triton() -> bool:
    from miniinfer.kernels import triton_available
    return triton_available()


# CPU timings, sort vs the radix select (shared 2-core x86 container, torch 2.13+cpu, V = 4096, softmax of
# randn rows, top_p 0.95; medians / 10th percentiles of 60 calls, ms; the machine was loaded, so N >= 8 is
# noisy): N = 1: sort 0.16 / 0.13 vs radix 0.30 / 0.29; N = 2: 0.52 / 0.49 vs 0.39 / 0.37; N = 4: 1.1 / 1.0
# vs 0.52 / 0.49; N = 16: p10 2.6 vs 1.6; N = 32: p10 18 vs 13. A batched torch sort of [N, 4096] costs
# ~0.25 ms a row here (one row alone: 0.05 ms), so the sort wins only for a single row.
def _top_p_threshold_sort(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """:func:`top_p_threshold_radix` by a sort: each row descending, float64 prefix sums, the crossing value.

    Exact in float64 (the radix select sums in float32): the threshold is the probability of the first
    token in descending order whose prefix sum reaches top_p; 0 (keep everything) when rounding leaves
    the total below top_p, 0x3FFFFFFF (the radix select's answer) when top_p <= 0.
    """
    V = probs.shape[1]
    values = probs.sort(dim=-1, descending=True).values                           # [N, V]
    cdf = values.double().cumsum(dim=-1)
    target = top_p.to(torch.float64).unsqueeze(1)
    first = V - (cdf >= target).sum(dim=-1, keepdim=True)                         # first crossing, V if none
    threshold = values.gather(1, first.clamp(max=V - 1)).view(torch.int32).squeeze(1)
    threshold = threshold.masked_fill(first.squeeze(1) == V, 0)
    return threshold.masked_fill(top_p <= 0, 0x3FFFFFFF)


def top_p_threshold_radix(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row, the nucleus threshold as float32 bits: keep {v : bits(p_v) >= threshold}. The readable
    torch reference of :func:`top_p_threshold` (the tests compare the other paths with it).

    probs [N, V] float32 in [0, 1], top_p [N] -> [N] int32. The threshold is the largest probability
    t present in the row whose mass {p_v >= t} is >= top_p: the crossing token's probability, so the
    kept set is the smallest set of most likely tokens reaching top_p, plus any token tied with the
    last one. Found by a radix select: a probability <= 1.0 has at most 30 significant bits (bit 31,
    the sign, is 0, and 1.0 is 0x3F800000 < 2**30), taken 10 at a time from the top. Each pass
    histograms the probability mass of the tokens that still match the bits found so far by their
    next 10 bits, and picks the highest bucket whose mass, plus the mass already above it, reaches top_p.
    """
    N, V = probs.shape
    bits = probs.view(torch.int32)
    # Entries that add no mass (dropped by top-k, or not matching the prefix) go to spread-out buckets:
    # adding 0 anywhere changes nothing, and on a GPU, 150 000 atomic adds into one bucket serialise.
    spread = torch.arange(V, device=probs.device) & (_NUM_BUCKETS - 1)
    target = top_p.unsqueeze(1)                                             # [N, 1]
    prefix = torch.zeros(N, 1, dtype=torch.int32, device=probs.device)      # the bits found so far
    above = torch.zeros(N, 1, dtype=probs.dtype, device=probs.device)       # mass strictly above them
    for shift in (20, 10, 0):
        digit = ((bits >> shift) & (_NUM_BUCKETS - 1)).long()
        if shift == 20:
            mass = probs
        else:  # only tokens whose higher bits equal the prefix found so far take part
            mass = probs.masked_fill((bits >> (shift + _DIGIT_BITS)) != prefix, 0.0)
        digit = torch.where(mass > 0, digit, spread)
        hist = torch.zeros(N, _NUM_BUCKETS, dtype=probs.dtype, device=probs.device).scatter_add_(1, digit, mass)
        at_or_above = hist.flip(-1).cumsum(-1).flip(-1) + above             # [N, 1024], non-increasing
        # The highest bucket that still reaches top_p (0 when none does: rounding made the total < top_p,
        # and then everything is kept).
        bucket = ((at_or_above >= target).sum(-1, keepdim=True) - 1).clamp(min=0)
        above = at_or_above.gather(1, bucket) - hist.gather(1, bucket)
        prefix = (prefix << _DIGIT_BITS) | bucket.int()
    return prefix.squeeze(1)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """For each row, the first token whose prefix sum exceeds u x (the row's mass).  probs [N, V] (kept
    tokens > 0, dropped ones exactly 0), u [N] float64 in [0, 1 - 2**-40] -> [N] int64.

    float64 prefix sums make the result exact for float32 probabilities. A token with probability 0
    adds nothing to the prefix sum, so it is never the first to exceed: dropped tokens are never drawn.
    u <= 1 - 2**-40 keeps u x mass below the last prefix sum, so the index stays < V.
    """
    cdf = probs.double().cumsum(dim=-1)                                       # [N, V], non-decreasing
    target = (u * cdf[:, -1]).unsqueeze(1)                                   # [N, 1]
    index = torch.searchsorted(cdf, target, right=True).squeeze(1)           # count of prefix sums <= target
    return index.clamp_(max=probs.shape[1] - 1)  # a zero-mass row (only a bad one) would give V


def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """Stages 1-2 in place: logit_bias, suppressed tokens, penalties.  logits [N, V] float32."""
    if batch.any_bias:
        logits.index_put_(batch.bias_index, batch.bias_values, accumulate=True)
    if batch.any_suppressed:
        # torch.full, not torch.tensor: a fill kernel instead of a (synchronising) host->device copy.
        logits.index_put_(batch.suppressed_index, torch.full((), float("-inf"), device=logits.device))
    if batch.any_penalties:
        _apply_penalties(logits, batch)


def _max_and_bad(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over logits [N, V]: (bad [N] bool, argmax [N] int64). A row is bad — it cannot be
    sampled — when its maximum is not finite: NaN (max propagates NaN), +inf, or every token -inf."""
    values, argmax = logits.max(dim=-1)
    return ~torch.isfinite(values), argmax


def filtered_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Stages 4-8 on processed logits: temperature, top-k, softmax, top-p, min-p.  logits [N, V] float32
    (modified in place, finite maxima) -> probs [N, V]: the softmax with dropped tokens set to exactly 0,
    not renormalised (drawing does not need it). Greedy rows are not special-cased here."""
    logits.div_(batch.temperature.unsqueeze(1))                                  # 4
    if batch.any_top_k:
        _top_k_mask(logits, batch)                                                # 5
    probs = torch.softmax(logits, dim=-1)                                         # 6
    if batch.any_top_p:                                                           # 7
        threshold = top_p_threshold(probs, batch.top_p)
        threshold = threshold.masked_fill(batch.top_p >= 1, 0)                    # off: keep all
        probs.masked_fill_(probs.view(torch.int32) < threshold.unsqueeze(1), 0.0)
    if batch.any_min_p:                                                           # 8
        # The top token survives top-p, and ratios do not change when renormalising: compare with
        # this row's maximum directly.
        floor = batch.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        probs.masked_fill_(probs < floor, 0.0)
    return probs


def batch_probabilities(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The exact distribution of every row, batched: :func:`miniinfer.sampling.probabilities` of the
    processed logits.  logits [N, V] (not modified) -> probs [N, V] float32 (one-hot for greedy rows,
    NaN for rows that cannot be sampled). For tests and speculative decoding; it synchronises nothing either."""
    logits = logits.float().clone()
    process_logits(logits, batch)
    bad, argmax = _max_and_bad(logits)
    greedy = torch.nn.functional.one_hot(argmax, batch.vocab_size).float()
    logits.masked_fill_(bad.unsqueeze(1), 0.0)
    probs = filtered_probs(logits, batch)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    probs = torch.where(batch.greedy.unsqueeze(1), greedy, probs)
    return probs.masked_fill(bad.unsqueeze(1), float("nan"))


def sample_batch(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """One token per row for the whole batch.  logits [N, V] float32 (may be modified in place).

    See the module docstring for the order of the stages. Returns token ids [N] int64 on the logits'
    device (-1 for rows that cannot be sampled), and logprobs when a row asked for them. Nothing here
    waits for the device.
    """
    if logits.dim() != 2 or tuple(logits.shape) != (batch.num_rows, batch.vocab_size):
        raise ValueError(f"sample_batch: logits of shape {tuple(logits.shape)}, the batch expects "
                         f"[{batch.num_rows}, {batch.vocab_size}]")
    if logits.dtype != torch.float32:
        logits = logits.float()
    # vLLM's default "raw" logprobs: of the model's distribution, before any processing.
    raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.max_logprobs is not None else None

    process_logits(logits, batch)                                                 # 1-2
    bad, tokens = _max_and_bad(logits)                                            # 3: greedy tokens
    if not batch.all_greedy:  # an all-greedy batch needs no random numbers, no softmax
        logits.masked_fill_(bad.unsqueeze(1), 0.0)  # keep NaN out of the histograms; the row gets -1 below
        probs = filtered_probs(logits, batch)                                     # 4-8
        drawn = _inverse_cdf(probs, uniform_from_seed(batch.seeds, batch.steps))  # 9
        tokens = torch.where(batch.greedy, tokens, drawn) if batch.any_greedy else drawn
    tokens = tokens.masked_fill(bad, -1)

    chosen = top_ids = top_values = None
    if raw_logprobs is not None:
        chosen = raw_logprobs.gather(1, tokens.clamp(min=0).unsqueeze(1)).squeeze(1)
        chosen = chosen.masked_fill(bad, float("nan"))
        if batch.max_logprobs > 0:
            top_values, top_ids = torch.topk(raw_logprobs, batch.max_logprobs, dim=-1)
    return SamplerOutput(token_ids=tokens, logprobs=chosen, top_logprob_ids=top_ids, top_logprobs=top_values)
