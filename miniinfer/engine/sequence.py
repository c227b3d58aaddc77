"""A request's life in the engine: token ids, status, sampling parameters, and where its KV lives.

A **request** is what a user submits (a prompt and :class:`~miniinfer.sampling.SamplingParams`).
The engine runs it as one or more **sequences**: one normally, ``n`` for parallel sampling (the
children share the prompt's KV blocks, see :mod:`miniinfer.engine.block_manager`).

The scheduler works with one number per sequence, ``num_computed_tokens``: how many of its tokens
already have keys and values in the KV cache. A step computes some of the rest
(``num_tokens - num_computed_tokens``): many for a prompt (prefill, maybe in chunks), one for a
sequence that is decoding. Once everything is computed the step's logits give the next token.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from miniinfer.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # queued; holds no KV blocks (new, or preempted and waiting to be recomputed)
    RUNNING = "running"      # admitted; its blocks hold the KV of its computed tokens
    FINISHED = "finished"    # done; blocks returned (or kept by the radix cache)


_sequence_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One stream of tokens: the prompt, then what has been generated."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream_seed: int = 0                             # this sequence's random stream: derive_seed(base_seed, index)
    base_seed: int = 0                               # the request's seed (its own, or drawn by the engine)
    index: int = 0                                   # which of the request's n completions this is
    seq_id: int = field(default_factory=lambda: next(_sequence_ids))
    token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0                     # tokens whose K/V are in the cache
    num_cached_tokens: int = 0                       # of those, how many came from the prefix cache at admission
    block_table: list[int] = field(default_factory=list)  # KV block ids, in position order
    finish_reason: str | None = None                 # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None             # the stop token id or stop string that ended it
    error: str | None = None                         # what went wrong, for finish_reason "error"
    prompt_inserted: bool = False                    # the prompt's full blocks went into the radix cache
    forked: bool = False                             # n > 1: the siblings exist (until then it holds n seats)
    detokenizer: object | None = None                # streaming detokenizer (engine's choice)
    text: str = ""                                   # generated text so far (stop strings removed)
    num_preemptions: int = 0
    num_emitted_chars: int = 0                       # text already streamed to the caller
    num_emitted_tokens: int = 0                      # output tokens already streamed to the caller
    logprobs: list[dict[int, float]] | None = None   # per output token: {token id: logprob}, when asked
    cumulative_logprob: float = 0.0
    prompt_logprobs: list[dict[int, float] | None] | None = None  # per prompt token (None for the first)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None and self.index == 0:
            self.prompt_logprobs = [None]  # nothing predicts the first prompt token

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def num_seats(self) -> int:
        """Places in the running batch this sequence needs: ``n`` until it has forked its siblings."""
        return 1 if self.forked or self.params.n == 1 else self.params.n

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, request={self.request_id!r}, status={self.status.value}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
