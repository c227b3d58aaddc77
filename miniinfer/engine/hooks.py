"""Engine internals a chapter lets you replace with your own function (chapters 05–08).

    llm = LLM(hooks=EngineHooks(slot_mapping=my_slot_mapping))

Every field defaults to None, meaning "the package's own implementation". A hook has exactly the
signature of the package function it replaces (documented on each field), so the chapter's stub,
the reference and the check agree. The engine passes this object to the parts that use it
(model runner, block manager, radix cache, attention context); nothing is monkey-patched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineHooks:
    """Replaceable engine functions; None = the package's implementation."""

    # chapter 07/08
    #: (block_table: list[int], start: int, end: int, block_size: int) -> list[int]: the slots of
    #: positions start … end-1 (``block_manager.slot_mapping``; used by ``BlockManager.slots``)
    slot_mapping: Callable | None = None
    #: (block_table: list[int], num_computed_tokens: int, block_size: int, ref_counts: list[int]) -> bool:
    #: must the next write go to a private copy (``block_manager.needs_copy_on_write``)
    needs_copy_on_write: Callable | None = None
    #: (q [B, H, D], k_cache [N, P, H_kv, D], v_cache [N, P, H_kv, D], block_tables [B, M] int32,
    #:  seq_lens [B] int32, scale: float) -> [B, H, D]: attention of decode steps
    #: (``kernels.paged_attention.paged_decode_attention_torch``; used by ``PagedKVContext``)
    paged_decode_attention: Callable | None = None
    #: (root: RadixNode, token_ids: list[int], block_size: int, max_tokens: int) -> list[RadixNode]:
    #: the longest cached block-aligned prefix (``radix_cache.match_blocks``; used by ``match_prefix``)
    match_blocks: Callable | None = None
    #: (root: RadixNode, num_blocks: int, ref_counts: list[int]) -> list[RadixNode]: nodes to evict, in
    #: order (``radix_cache.lru_eviction_order``; used by ``RadixCache.evict``)
    lru_eviction_order: Callable | None = None
    # chapter 05/06
    #: (token_ids: list[list[int]], num_computed: list[int], num_new: list[int]) -> (input_ids [T],
    #: positions [T], cu_seqlens_q [B+1], seq_lens [B], logits_indices [N]), lists of ints: the flat
    #: batch of a step (``model_runner.pack_batch``; used by ``ModelRunner.prepare``)
    pack_batch: Callable | None = None
    #: (running: list[int], waiting: list[int], max_num_batched_tokens: int, max_num_seqs: int,
    #:  chunked: bool) -> list[int]: tokens per sequence in the next step, running then waiting
    #: (``scheduler.plan_step``; used by ``Scheduler.schedule``)
    plan_step: Callable | None = None

    # chapter 10
    #: (p [B, K+1, V], q [B, K, V], draft [B, K] int64, num_draft [B], u_accept [B, K], u_sample [B]) ->
    #: (num_accepted [B], next_token [B]): speculative decoding's acceptance rule
    #: (``speculative.acceptance.accept_draft``; used by ``SpeculativeDecoder``)
    accept_draft: Callable | None = None

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if value is not None and not callable(value):
                raise ValueError(f"EngineHooks.{name} must be a function or None, got {type(value).__name__}")

    def get(self, name: str, default: Callable) -> Callable:
        """The hook ``name`` if set, else ``default``."""
        value = getattr(self, name, None)
        return default if value is None else value
