"""The scheduler: which sequences run in the next step, and how many of their tokens.

One step computes a flat batch of tokens under two budgets: at most ``max_num_seqs`` sequences
and at most ``max_num_batched_tokens`` tokens. Every sequence is described by one number,
``num_computed_tokens``, so prefill and decode are the same operation: a sequence gets
``num_tokens − num_computed_tokens`` new tokens (one while decoding, many while prefilling), or
fewer if the token budget runs out (**chunked prefill**: a long prompt is computed over several
steps, interleaved with other sequences' decodes instead of stalling them).

Policy, in order:

1. **Running** sequences first, oldest first, so that requests in flight keep streaming.
2. Then **waiting** sequences, first come first served, while both budgets allow. On admission a
   sequence looks up its longest cached prefix in the radix cache; those tokens skip prefill.
3. When the KV pool has too few free blocks, evict unused prefix-cache blocks; if that is not
   enough, **preempt** the most recently admitted running sequence: free its blocks and put it back
   at the front of the waiting queue, to be recomputed later (its generated tokens are kept, so the
   output does not change). Nothing fails because the pool is full.

Steps 1 and 2 — who gets how many tokens — are the pure function :func:`plan_step` (chapter 06's
exercise; ``EngineHooks(plan_step=...)`` replaces it). The memory side (step 3) and the prefix-cache
lookup at admission stay here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from miniinfer.engine.block_manager import BlockManager
from miniinfer.engine.hooks import EngineHooks
from miniinfer.engine.radix_cache import RadixCache
from miniinfer.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    enable_chunked_prefill: bool = True


@dataclass
class ScheduledBatch:
    """What one step computes: each sequence with its number of new tokens, in batch order."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


def plan_step(running: list[int], waiting: list[int], max_num_batched_tokens: int, max_num_seqs: int,
              chunked: bool) -> list[int]:
    """How many tokens each sequence computes in the next step: running ones first, then waiting ones.

    running, waiting: the uncomputed tokens (``num_tokens − num_computed_tokens``) of each running
    sequence (oldest first; 1 for a decode) and of each waiting one (first come first served; its
    prompt). Returns one count per sequence, ``running`` then ``waiting`` order, 0 = not this step:

    * running sequences, in order, get all their uncomputed tokens while the token budget
      ``max_num_batched_tokens`` lasts, the one that exhausts it what is left (0 after that);
    * then waiting sequences are admitted in order while budget remains and fewer than
      ``max_num_seqs`` sequences would be running (every running sequence holds a seat, scheduled
      or not). A prompt longer than the remaining budget gets the remainder if ``chunked``
      (chunked prefill), else it waits — and so does everyone behind it (first come first served).
    """
    plan: list[int] = []
    budget = max_num_batched_tokens
    for num_uncomputed in running:
        num_new = min(num_uncomputed, budget)
        plan.append(num_new)
        budget -= num_new
    seats = max_num_seqs - len(running)
    admitting = True
    for num_uncomputed in waiting:
        num_new = 0
        if admitting and budget > 0 and seats > 0:
            if num_uncomputed <= budget:
                num_new = num_uncomputed
            elif chunked:
                num_new = budget  # chunked prefill: the rest of this prompt comes in later steps
        admitting = num_new > 0
        plan.append(num_new)
        budget -= num_new
        seats -= 1
    return plan


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, radix_cache: RadixCache | None,
                 hooks: EngineHooks | None = None):
        self.config = config
        self.hooks = hooks or EngineHooks()
        self.block_manager = block_manager
        self.radix_cache = radix_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- memory ----------------------------------------------------------------------------------

    def _make_room(self, seq: Sequence, num_new_tokens: int, protected: list[Sequence]) -> bool:
        """Free blocks until ``seq`` fits: evict cache blocks, then preempt running sequences.

        Victims are taken from the end of ``running`` (the most recently admitted), never from
        ``protected`` (sequences already in this step's batch). Returns False when ``seq`` itself
        had to be preempted or cannot fit.
        """
        manager = self.block_manager
        while not manager.can_allocate(seq, num_new_tokens):
            shortfall = manager.num_blocks_needed(seq, num_new_tokens) - manager.num_free_blocks
            if self.radix_cache is not None and self.radix_cache.evict(shortfall) > 0:
                continue
            victim = next((s for s in reversed(self.running) if s not in protected), None)
            if victim is None:
                return False
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free the sequence's KV and queue it for recomputation at the front of the waiting queue."""
        self._cache_computed_blocks(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _cache_computed_blocks(self, seq: Sequence) -> None:
        if self.radix_cache is not None and seq.block_table:
            self.radix_cache.insert(seq.token_ids[:seq.num_computed_tokens], seq.block_table)

    # -- one step --------------------------------------------------------------------------------

    def _plan(self, running: list[int], waiting: list[int], budget: int, max_num_seqs: int) -> list[int]:
        """The plan hook (default :func:`plan_step`), with its answer checked against the budgets."""
        plan = [int(n) for n in self.hooks.get("plan_step", plan_step)(
            running, waiting, budget, max_num_seqs, self.config.enable_chunked_prefill)]
        wanted = running + waiting
        if (len(plan) != len(wanted) or sum(plan) > budget
                or any(not 0 <= n <= limit for n, limit in zip(plan, wanted))):
            raise ValueError(f"plan_step({running}, {waiting}, {budget}, {max_num_seqs}, "
                             f"{self.config.enable_chunked_prefill}) returned {plan}: it must give one count per "
                             "sequence, each between 0 and its uncomputed tokens, summing to at most the budget")
        return plan

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        preempted_this_step = False

        # 1. Running sequences: decodes (1 token) and unfinished chunked prefills.
        running = list(self.running)
        plan = self._plan([seq.num_uncomputed_tokens for seq in running], [], budget, self.config.max_num_seqs)
        for seq, num_new in zip(running, plan):
            if num_new == 0 or seq.status is not SequenceStatus.RUNNING:
                continue  # no budget left for it, or preempted (below) to make room for an older one
            before = self.num_preemptions
            if not self._make_room(seq, num_new, protected=batch.seqs):
                preempted_this_step = True
                continue  # seq itself was preempted (it left `running`)
            preempted_this_step |= self.num_preemptions != before
            self.block_manager.allocate(seq, num_new)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new

        # 2. Waiting sequences, unless memory is so tight that we just preempted someone. The plan is
        # asked about one candidate at a time, with what is left of the budget and of the seats:
        # admission looks up the candidate's cached prefix first, which shortens what it must compute.
        while (self.waiting and budget > 0 and not preempted_this_step
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            if self.radix_cache is not None and not seq.block_table:
                cached = self.radix_cache.match_prefix(seq.token_ids)
                for block in cached:
                    self.block_manager.retain(block)
                seq.block_table = list(cached)
                seq.num_computed_tokens = seq.num_cached_tokens = len(cached) * self.block_manager.block_size
            num_new = self._plan([], [seq.num_uncomputed_tokens], budget,
                                 self.config.max_num_seqs - len(self.running))[0]
            if num_new == 0:
                break  # without chunked prefill: wait for a step with room for the whole prompt
            if not self.block_manager.can_allocate(seq, num_new):
                evictable = self.radix_cache.evict(
                    self.block_manager.num_blocks_needed(seq, num_new) - self.block_manager.num_free_blocks
                ) if self.radix_cache is not None else 0
                if not evictable or not self.block_manager.can_allocate(seq, num_new):
                    # Not now: give the prefix blocks back (they stay cached) and retry next step.
                    self.block_manager.free(seq)
                    seq.num_computed_tokens = seq.num_cached_tokens = 0
                    break
            self.waiting.popleft()
            self.block_manager.allocate(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return batch

    # -- after the step --------------------------------------------------------------------------

    def on_prefill_complete(self, seq: Sequence) -> None:
        """The prompt's KV is all computed: offer its full blocks to the prefix cache right away, so
        that requests arriving while this one still decodes can share them."""
        if not seq.prompt_inserted:
            seq.prompt_inserted = True
            if self.radix_cache is not None:
                self.radix_cache.insert(seq.prompt_token_ids, seq.block_table)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence: cache its computed blocks, release its references."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._cache_computed_blocks(seq)
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
