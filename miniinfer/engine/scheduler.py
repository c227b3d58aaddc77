"""The scheduler: which sequences run in the next step and how many of their tokens — and, after the
step, what its sampled tokens mean.

A step is three calls (see :mod:`miniinfer.engine.engine`)::

    plan = scheduler.schedule()          # StepPlan: sequences, new tokens each, rows to sample
    sampled = runner.run(plan)           # the forward and the sampler, on the device
    updates = scheduler.commit(plan, sampled)   # counts, prefix cache, forks, stops, frees

One step computes a flat batch of tokens under two budgets: at most ``max_num_seqs`` sequences
and at most ``max_num_batched_tokens`` tokens. Every sequence is described by one number,
``num_computed_tokens``, so prefill and decode are the same operation: a sequence gets
``num_tokens − num_computed_tokens`` new tokens (one while decoding, many while prefilling), or
fewer if the token budget runs out (**chunked prefill**: a long prompt is computed over several
steps, interleaved with other sequences' decodes instead of stalling them).

Policy, in order:

1. **Running** sequences first, oldest first, so that requests in flight keep streaming.
2. Then **waiting** sequences, first come first served, while both budgets allow. On admission a
   sequence looks up its longest cached prefix in the radix cache; those tokens skip prefill. A
   request with ``n > 1`` completions needs ``n`` seats: its siblings fork once its prompt is done.
3. When the KV pool has too few free blocks, evict unused prefix-cache blocks; if that is not
   enough, **preempt** the most recently admitted running sequence: free its blocks and put it back
   at the front of the waiting queue, to be recomputed later (its generated tokens are kept, so the
   output does not change). Nothing fails because the pool is full.

Steps 1 and 2 — who gets how many tokens — are the pure function :func:`plan_step` (chapter 06's
exercise; ``EngineHooks(plan_step=...)`` replaces it). It sees the whole running batch and every
admission candidate at once, so a different policy really changes who is admitted. The memory side
(step 3) and the prefix-cache lookup stay here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field

from miniinfer.engine.block_manager import BlockManager
from miniinfer.engine.hooks import EngineHooks
from miniinfer.engine.radix_cache import RadixCache
from miniinfer.engine.sequence import Sequence, SequenceStatus
from miniinfer.sampler import derive_seed


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    enable_chunked_prefill: bool = True
    max_model_len: int = 1 << 62


@dataclass
class SampleRow:
    """One token to draw in this step: from the logits row of ``seq``, for completion ``index``.

    ``index == seq.index`` is the sequence's own next token; any other index is a sibling that
    forks from ``seq`` in :meth:`Scheduler.commit` (``n > 1``: all completions draw their first token
    from the prompt's last logits, each from its own random stream).
    """

    seq: Sequence
    index: int
    stream_seed: int

    @property
    def is_fork(self) -> bool:
        return self.index != self.seq.index


@dataclass
class StepPlan:
    """What one step computes: each sequence with its number of new tokens, in batch order, and the
    tokens to sample (one per sequence that finishes computing its tokens, ``n`` at a fork)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    samples: list[SampleRow] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (source, destination) blocks
    # Speculative decoding (miniinfer.speculative): per sequence, the guessed tokens it verifies in this
    # step (its num_new_tokens is then 1 + len(guesses)) and the distributions they came from (None: one-hot).
    draft_tokens: list[list[int]] | None = None
    draft_probs: list | None = None
    _logits_seqs: tuple | None = field(default=None, repr=False)

    @property
    def logits_seqs(self) -> list[Sequence]:
        """Sequences whose last new token's logits this step needs, in batch order."""
        if self._logits_seqs is None or len(self._logits_seqs[0]) != len(self.samples):
            seen: list[Sequence] = []
            for row in self.samples:
                if not seen or seen[-1] is not row.seq:
                    seen.append(row.seq)
            self._logits_seqs = (list(self.samples), seen)
        return self._logits_seqs[1]

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.num_new_tokens) and len(self.samples) == len(self.seqs)

    def __len__(self) -> int:
        return len(self.seqs)


@dataclass
class SampledTokens:
    """What the model runner returns: one entry per :class:`SampleRow` of the plan, in order.

    ``token_ids[i] == -1`` means the row could not be sampled (non-finite logits): that sequence fails.
    """

    token_ids: list[int]
    logprobs: list[float] | None = None                        # the chosen tokens' logprobs
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per row: (token id, logprob), best first
    # seq_id -> {prompt position p: {token id: logprob}} for the tokens at p (predicted by position p − 1)
    prompt_logprobs: dict[int, dict[int, dict[int, float]]] | None = None
    # Speculative rows: the accepted guesses that come before token_ids[i] (None: the row did not speculate)
    spec_tokens: list[list[int] | None] | None = None


@dataclass
class TokenUpdate:
    """One sequence's outcome in :meth:`Scheduler.commit`: the token it got, and whether it finished."""

    seq: Sequence
    token_id: int
    new_seq: bool = False       # a sibling that forked in this step


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


# Evictions free at least this share of the KV pool at a time (see Scheduler._evict).
EVICTION_BATCH_FRACTION = 1 / 64


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, radix_cache: RadixCache | None,
                 hooks: EngineHooks | None = None, eos_token_ids: SequenceOf[int] = ()):
        self.config = config
        hooks = hooks or EngineHooks()
        self._plan_step = hooks.plan_step or plan_step   # resolved once
        self.block_manager = block_manager
        self.radix_cache = radix_cache
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._held: list[Sequence] = []  # this step's admission candidates, holding their cached prefixes
        self._held_released = False      # ... released to make room (then nobody is admitted in this step)
        self.counters = dict(prefill_tokens_computed=0, recomputed_tokens=0, prefix_cache_hit_tokens=0,
                             generation_tokens=0)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_seats_taken(self) -> int:
        return sum(seq.num_seats for seq in self.running)

    # -- memory ----------------------------------------------------------------------------------

    def _make_room(self, seq: Sequence, num_new_tokens: int, protected: set[int]) -> bool:
        """Free blocks until ``seq`` fits: evict cache blocks, then preempt running sequences.

        Victims are taken from the end of ``running`` (the most recently admitted), never from
        ``protected`` (ids of sequences already in this step's batch). Returns False when ``seq`` itself
        had to be preempted or cannot fit.
        """
        manager = self.block_manager
        while not manager.can_allocate(seq, num_new_tokens):
            shortfall = manager.num_blocks_needed(seq, num_new_tokens) - manager.num_free_blocks
            if self.radix_cache is not None and self._evict(shortfall) > 0:
                continue
            if self._release_held_prefixes():
                continue  # the waiting candidates' cached prefixes were pinned: now they can be evicted
            victim = next((s for s in reversed(self.running) if s.seq_id not in protected), None)
            if victim is None:
                return False
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def _evict(self, shortfall: int) -> int:
        """Evict cached blocks to cover ``shortfall`` — and, with a large pool, a batch of
        :data:`EVICTION_BATCH_FRACTION` of it at once. Choosing victims walks the whole tree
        (``lru_eviction_order``), and once the pool is full of cached prefixes (a server's steady state)
        every block a decoding sequence grows into needs an eviction: one block per walk cost a step of
        128 sequences several walks of tens of thousands of nodes (an H200 run with ~1,000-token prompts
        averaged 45 ms per step where a decode step takes 5 ms; a CPU profile put the time in these walks).
        A batch makes the walk rare; the blocks it frees early are the least
        recently used ones, which LRU would evict next anyway. Small pools (under 64 blocks) evict exactly
        the shortfall."""
        if shortfall <= 0:
            return 0
        batch = int(self.block_manager.num_blocks * EVICTION_BATCH_FRACTION)
        return self.radix_cache.evict(max(shortfall, batch))

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
        plan = [int(n) for n in self._plan_step(list(running), list(waiting), budget, max_num_seqs,
                                                self.config.enable_chunked_prefill)]
        wanted = running + waiting
        if (len(plan) != len(wanted) or sum(plan) > budget
                or any(not 0 <= n <= limit for n, limit in zip(plan, wanted))):
            raise ValueError(f"plan_step({running}, {waiting}, {budget}, {max_num_seqs}, "
                             f"{self.config.enable_chunked_prefill}) returned {plan}: it must give one count per "
                             "sequence, each between 0 and its uncomputed tokens, summing to at most the budget")
        return plan

    def _admission_candidates(self, budget: int, seats: int) -> list[Sequence]:
        """The waiting sequences the plan may choose from, with their cached prefixes looked up (and held).

        None when no seat is free. Otherwise the queue's head — a full batch (``max_num_seqs``, at least
        32) — so that a policy can admit a later, shorter request before an earlier one, but no further
        than four token budgets' worth: looking up a prefix walks the tree, and sequences that far back
        could not run in this step under any policy that fills the budget.
        """
        candidates: list[Sequence] = []
        if seats <= 0:
            return candidates
        reach = 0
        for seq in self.waiting:
            if len(candidates) >= max(self.config.max_num_seqs, 32) or reach >= 4 * budget:
                break
            # Prompt logprobs need the logits of every prompt position: no cached prefix skips them.
            if self.radix_cache is not None and not seq.block_table and seq.params.prompt_logprobs is None:
                cached = self.radix_cache.match_prefix(seq.token_ids)
                for block in cached:
                    self.block_manager.retain(block)  # held, so no eviction in this step can take them
                seq.block_table = list(cached)
                seq.num_computed_tokens = seq.num_cached_tokens = len(cached) * self.block_manager.block_size
            candidates.append(seq)
            reach += seq.num_uncomputed_tokens
        return candidates

    def _release_candidate(self, seq: Sequence) -> None:
        """Not admitted after all: give its prefix blocks back (they stay cached) for a later step."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0

    def _release_held_prefixes(self, candidates: list[Sequence] | None = None) -> bool:
        """Unpin the cached prefixes that admission candidates hold (all of this step's, or ``candidates``).

        A candidate's prefix blocks are held from the look-up until admission, so that no eviction in
        between takes them. When memory runs short that hold can be exactly what stops the pool from
        freeing a block: with every block in the prefix cache and each waiting request pinning its own
        prefix, nothing is evictable and nothing can be admitted — the engine would stop. Released
        candidates are not admitted in this step (they look their prefixes up again in the next).
        Returns whether any block was unpinned.
        """
        released = False
        for seq in self._held if candidates is None else candidates:
            if seq.block_table and seq.status is SequenceStatus.WAITING:
                self._release_candidate(seq)
                released = True
        if candidates is None:
            self._held = []
            self._held_released = released or self._held_released
        return released

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        config = self.config
        budget = config.max_num_batched_tokens
        # Seats: a request with n > 1 holds n of them from admission (its siblings fork later).
        seats_taken = self.num_seats_taken
        running = list(self.running)
        candidates = self._admission_candidates(budget, max(0, config.max_num_seqs - seats_taken))
        self._held, self._held_released = list(candidates), False
        extra_seats = seats_taken - len(running)
        counts = self._plan([seq.num_uncomputed_tokens for seq in running],
                            [seq.num_uncomputed_tokens for seq in candidates], budget,
                            config.max_num_seqs - extra_seats)
        running_counts, waiting_counts = counts[:len(running)], counts[len(running):]

        # 1. Running sequences: decodes (1 token) and unfinished chunked prefills.
        in_batch: set[int] = set()
        preempted = False
        has_room = self.block_manager.has_room
        for seq, num_new in zip(running, running_counts):
            if num_new == 0 or seq.status is not SequenceStatus.RUNNING:
                continue  # no budget left for it, or preempted (below) to make room for an older one
            if has_room(seq, num_new):  # most decodes: the token fits in the last block, nothing to free
                self._add_to_plan(plan, seq, num_new, in_batch, allocate=False)
                budget -= num_new
                continue
            before = self.num_preemptions
            if not self._make_room(seq, num_new, protected=in_batch):
                preempted = True
                continue  # seq itself was preempted (it left `running`)
            preempted |= self.num_preemptions != before
            self._add_to_plan(plan, seq, num_new, in_batch)
            budget -= num_new

        # 2. Waiting sequences the plan admits, unless memory is so tight that we just preempted someone
        #    (or had to unpin the candidates' prefixes to make room for the running ones).
        admitting = not preempted and not self._held_released
        if preempted:
            seats_taken = self.num_seats_taken  # preemptions gave seats back
        for position, (seq, num_new) in enumerate(zip(candidates, waiting_counts)):
            if admitting and num_new > 0 and seats_taken + seq.num_seats > config.max_num_seqs:
                admitting = False  # first come first served: no overtaking by smaller requests
            if admitting and num_new > 0 and not self.block_manager.can_allocate(seq, num_new):
                if self.radix_cache is not None:
                    # First come first served: the candidates behind this one will not be admitted in this
                    # step, so their pinned prefixes go back to the cache, where eviction can reach them.
                    self._release_held_prefixes(candidates[position + 1:])
                    self._evict(self.block_manager.num_blocks_needed(seq, num_new) - self.block_manager.num_free_blocks)
                admitting = self.block_manager.can_allocate(seq, num_new)
            if not admitting or num_new == 0:
                self._release_candidate(seq)
                continue
            self.waiting.remove(seq)
            seats_taken += seq.num_seats
            if seq.num_preemptions == 0:
                self.counters["prefix_cache_hit_tokens"] += seq.num_cached_tokens  # a readmission counts once
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._add_to_plan(plan, seq, num_new, in_batch)
        plan.copies = self.block_manager.take_pending_copies()
        return plan

    def _add_to_plan(self, plan: StepPlan, seq: Sequence, num_new: int, in_batch: set[int],
                     allocate: bool = True) -> None:
        if allocate:
            self.block_manager.allocate(seq, num_new)
        plan.seqs.append(seq)
        plan.num_new_tokens.append(num_new)
        in_batch.add(seq.seq_id)
        if seq.num_computed_tokens + num_new == seq.num_tokens:  # every token computed: it samples
            plan.samples.append(SampleRow(seq, seq.index, seq.stream_seed))
            if not seq.forked and seq.params.n > 1:
                plan.samples.extend(SampleRow(seq, index, derive_seed(seq.base_seed, index))
                                    for index in range(1, seq.params.n))

    # -- after the step --------------------------------------------------------------------------

    def commit(self, plan: StepPlan, sampled: SampledTokens) -> list[TokenUpdate]:
        """Apply a step's results: computed counts, prefix-cache inserts, forks, new tokens, token-level
        stops (EOS, ``stop_token_ids``, ``max_tokens``, the context limit) and frees.

        Returns one :class:`TokenUpdate` per sampled token, for the engine to detokenize (stop strings
        are text-level, so the engine finishes those). A row that could not be sampled (token −1) or
        whose bookkeeping raises finishes its sequence with reason ``error``; the others go on.
        """
        if sampled.prompt_logprobs:
            for seq in plan.seqs:
                for position, entry in sampled.prompt_logprobs.get(seq.seq_id, {}).items():
                    if seq.prompt_logprobs is not None and position == len(seq.prompt_logprobs):
                        seq.prompt_logprobs.append(entry)  # (a recomputation after preemption adds nothing)
        finished = SequenceStatus.FINISHED
        drafts = plan.draft_tokens
        for b, (seq, num_new) in enumerate(zip(plan.seqs, plan.num_new_tokens)):
            if seq.status is finished:
                continue  # aborted while the step ran
            # (lengths read once: this loop runs for every sequence of every step)
            computed, num_tokens, num_prompt = seq.num_computed_tokens, len(seq.token_ids), len(seq.prompt_token_ids)
            if drafts is not None and drafts[b]:  # a speculative verify: a decode (rolled back below)
                seq.num_computed_tokens = computed + num_new
                continue
            if not (num_new == 1 and computed + 1 == num_tokens and num_tokens > num_prompt):  # not a decode
                self.counters["prefill_tokens_computed"] += num_new
                # Tokens past the prompt computed again after a preemption: the price of recompute.
                self.counters["recomputed_tokens"] += max(0, min(computed + num_new, num_tokens - 1)
                                                          - max(computed, num_prompt))
            seq.num_computed_tokens = computed + num_new
            if not seq.prompt_inserted and computed + num_new >= num_prompt:
                self.on_prefill_complete(seq)

        # Forks first: a sibling shares its parent's blocks as they are now, before the parent's own
        # token (which may finish it and free them) is appended.
        targets: list[Sequence] = []
        for row in plan.samples:
            target = row.seq
            if row.is_fork and not row.seq.is_finished:
                target = self._fork(row.seq, row.index, row.stream_seed)
            targets.append(target)
        for row in plan.samples:
            if row.is_fork:
                row.seq.forked = True
        updates: list[TokenUpdate] = []
        guesses_of = None
        for row_index, (row, seq) in enumerate(zip(plan.samples, targets)):
            if seq.status is finished:
                continue
            token = sampled.token_ids[row_index]
            try:
                if sampled.spec_tokens is not None and sampled.spec_tokens[row_index] is not None:
                    if guesses_of is None:  # (built once per step: a verified row needs its number of guesses)
                        guesses_of = {id(s): len(d) for s, d in zip(plan.seqs, plan.draft_tokens)}
                    num_guesses = guesses_of[id(row.seq)]
                    self._append_speculative(seq, sampled.spec_tokens[row_index], token, row_index, sampled,
                                             num_guesses)
                else:
                    self._append(seq, token, row_index, sampled)
            except Exception as error:  # noqa: BLE001 - one sequence's failure must not stop the others
                self.finish(seq, "error", error=f"{type(error).__name__}: {error}")
            updates.append(TokenUpdate(seq, token, new_seq=row.is_fork))
        return updates

    def _fork(self, parent: Sequence, index: int, stream_seed: int) -> Sequence:
        """A sibling of ``parent`` (n > 1) sharing every KV block of its prompt."""
        child = Sequence(parent.request_id, parent.prompt_token_ids, parent.params, stream_seed=stream_seed,
                         base_seed=parent.base_seed, index=index, token_ids=list(parent.prompt_token_ids))
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens
        child.prompt_inserted = True
        child.forked = True
        child.status = SequenceStatus.RUNNING
        self.block_manager.fork(parent, child)
        self.running.append(child)
        return child

    def _append_speculative(self, seq: Sequence, accepted: list[int], token: int, row_index: int,
                            sampled: SampledTokens, num_guesses: int) -> None:
        """A verified row: roll the computed count back past the rejected guesses (their K/V stay in
        slots nobody reads; whole blocks past the kept tokens go back to the pool), then append the
        accepted guesses and the token after them, stopping where a stop condition hits."""
        from miniinfer.speculative.rollback import rollback_blocks

        # (commit set the count to before + 1 + guesses; the rollback starts from before the step)
        before = seq.num_computed_tokens - 1 - num_guesses
        seq.num_computed_tokens, kept, released = rollback_blocks(seq.block_table, before, num_guesses,
                                                                  len(accepted), self.block_manager.block_size)
        for block in reversed(released):
            self.block_manager.release(block)
        seq.block_table = list(kept)
        for new_token in [*accepted, token]:
            self._append(seq, new_token, row_index, sampled)
            if seq.is_finished:
                break

    def _append(self, seq: Sequence, token: int, row_index: int, sampled: SampledTokens) -> None:
        """Add a sampled token and decide whether a token-level condition ends the sequence."""
        if token < 0:
            self.finish(seq, "error", error="no valid token could be sampled: the logits are not finite (NaN or "
                                            "infinite weights or activations?) or the probabilities function failed")
            return
        params = seq.params
        seq.token_ids.append(token)
        self.counters["generation_tokens"] += 1
        if seq.logprobs is not None and sampled.logprobs is not None:
            entry = {token: sampled.logprobs[row_index]}
            if sampled.top_logprobs is not None:
                for token_id, logprob in sampled.top_logprobs[row_index][:params.logprobs]:
                    entry.setdefault(token_id, logprob)
            seq.logprobs.append(entry)
            seq.cumulative_logprob += sampled.logprobs[row_index]
        num_tokens = len(seq.token_ids)
        num_output = num_tokens - len(seq.prompt_token_ids)
        if num_output > params.min_tokens:  # the sampler suppresses stop tokens until min_tokens are out
            if not params.ignore_eos and token in self.eos_token_ids:
                self.finish(seq, "stop", stop_reason=None)
                return
            if params.stop_token_ids and token in params.stop_token_ids:
                self.finish(seq, "stop", stop_reason=token)
                return
        if num_output >= params.max_tokens or num_tokens >= self.config.max_model_len:
            self.finish(seq, "length")

    def on_prefill_complete(self, seq: Sequence) -> None:
        """The prompt's KV is all computed: offer its full blocks to the prefix cache right away, so
        that requests arriving while this one still decodes can share them."""
        if not seq.prompt_inserted:
            seq.prompt_inserted = True
            if self.radix_cache is not None:
                self.radix_cache.insert(seq.prompt_token_ids, seq.block_table)

    def finish(self, seq: Sequence, reason: str, *, stop_reason: int | str | None = None,
               error: str | None = None) -> None:
        """Retire a sequence: cache its computed blocks, release its references."""
        if seq.is_finished:
            return
        was_waiting = seq.status is SequenceStatus.WAITING
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        seq.error = error
        if not was_waiting or seq.block_table:
            try:
                self._cache_computed_blocks(seq)
            except Exception:  # noqa: BLE001 - a failed cache insert must not keep the blocks
                pass
            self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def fail(self, plan: StepPlan, error: BaseException) -> list[Sequence]:
        """The step itself failed (an exception in the forward or the sampler): finish every sequence of
        the plan with reason ``error`` and free its blocks, so that the engine is never left wedged."""
        failed = []
        message = f"{type(error).__name__}: {error}"
        for seq in plan.seqs:
            if not seq.is_finished:
                self.finish(seq, "error", error=message)
                failed.append(seq)
        return failed
