"""Speculation as a kind of engine step: propose → verify → commit with KV rollback.

The engine's step stays three calls; speculation adds to the plan and reads the logits::

    plan = scheduler.schedule()
    speculator.extend(plan, scheduler)            # guesses for decoding sequences: each now computes
                                                  # 1 + k tokens (its last token and k guesses), with slots
    sampled = runner.run(plan, block_manager)     # one forward; logits at every verified position;
                                                  # speculator.verify applies the acceptance rule
    updates = scheduler.commit(plan, sampled)     # appends accepted guesses + one token, rolls the
                                                  # computed count back past rejected guesses, frees
                                                  # their whole blocks
    speculator.after_commit(plan, sampled)        # counters, adaptive γ, forget finished sequences

A verify step is an ordinary prefill chunk for the attention kernels: ``1 + k`` new tokens over a
cached paged prefix with causal alignment at the bottom right. Rejected guesses' K/V stay in their
slots past the sequence's computed count, where nothing reads them and the next step overwrites
them.

On the CPU backends (``torch``, ``sdpa``) the verify forward's attention is
:func:`~miniinfer.speculative.verify_attention.batched_verify_attention` (one SDPA call for the batch),
which also applies a tree mask: with ``tree_width`` the proposer returns token trees, the nodes' RoPE
positions follow their depths, acceptance walks the tree (greedy, or SpecInfer's multi-candidate rule),
and the accepted path's K/V are copied to consecutive slots before the commit's rollback.

Which sequences speculate: decoding ones (one new token, past the prompt) whose sampling needs
nothing but the distribution of each position — no penalties, logit bias, logprobs, stop strings,
or unmet ``min_tokens`` — in steps without forks (``n > 1``) or prompt logprobs. Everything else in
the same batch decodes or prefills as usual.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from miniinfer.engine.scheduler import SampledTokens, StepPlan
from miniinfer.engine.sequence import Sequence
from miniinfer.sampler import (
    SamplingBatch,
    SamplingRow,
    _signed64,
    batch_probabilities,
    derive_seed,
    uniform_from_seed,
)
from miniinfer.speculative.acceptance import accept_draft
from miniinfer.speculative.adaptive import AdaptiveGamma, SpeculationGate
from miniinfer.speculative.proposers import Proposer
from miniinfer.speculative.verify_attention import MAX_VERIFY_QUERIES

__all__ = ["SpeculativeDecoder", "ACCEPT_STREAM"]

ACCEPT_STREAM = 0x5EC0  # derive_seed(stream_seed, ACCEPT_STREAM): the uniforms of the acceptance tests
CATCH_UP_STEADY = 3     # tokens a draft catches up on between consecutive speculative steps, at most


def can_speculate(seq: Sequence) -> bool:
    """The request's next-token distribution depends on its logits alone (see the module docstring)."""
    p = seq.params
    return (not p.uses_penalties and not p.logit_bias and p.logprobs is None and not p.stop_strings
            and seq.num_output_tokens >= p.min_tokens and (p.n == 1 or seq.forked))


class _TreeShape(NamedTuple):
    """One sequence's token tree in a verify step: each node's parent (node 0, the newest token, is the
    root), and, for trees grown by calibrated acceptance rates, each node's (rank, draft probability) —
    what the proposer learns from once the target has verified the tree."""

    parents: list[int]
    confidence: list[tuple[int, float]] | None


class SpeculativeDecoder:
    """Owns a proposer, the choice of γ (fixed, or ``"auto"``: :class:`AdaptiveGamma`), the acceptance
    rule (``accept_fn``, default :func:`~miniinfer.speculative.acceptance.accept_draft`: the course's
    plug-in replaces it) and the counters."""

    def __init__(self, proposer: Proposer, num_speculative_tokens: int | str = 4, accept_fn=None,
                 max_gamma: int = 8, max_model_len: int = 1 << 30, tree_width: int | None = None, clock=None):
        self.tree_width = tree_width
        # Step timings for "auto": CPU time of this process on a CPU (what the work costs, whatever else the
        # machine runs), wall time on a GPU (each step ends with a device -> host copy, so it is complete).
        self.clock = clock or time.perf_counter
        self._gate_step: tuple[int, bool, float] | None = None
        self._one_off = False
        self._trees: dict[int, _TreeShape] = {}
        self._plan = None
        self._runner = None
        if num_speculative_tokens == "auto":
            self.adaptive: AdaptiveGamma | None = AdaptiveGamma(max_gamma=max_gamma)
            self.gate: SpeculationGate | None = SpeculationGate()  # and whether to speculate at all
            self.fixed_gamma = None
        else:
            if isinstance(num_speculative_tokens, bool) or not isinstance(num_speculative_tokens, int) \
                    or num_speculative_tokens < 1:
                raise ValueError(f"num_speculative_tokens must be a positive integer or 'auto', "
                                 f"got {num_speculative_tokens!r}")
            self.adaptive, self.gate, self.fixed_gamma = None, None, num_speculative_tokens
        self.proposer = proposer
        self.accept_fn = accept_fn or accept_draft
        self.custom_rule = accept_fn is not None
        self.max_model_len = max_model_len
        self.counters = dict(spec_steps=0, spec_verified_seqs=0, spec_draft_tokens=0, spec_accepted_tokens=0,
                             spec_emitted_tokens=0)
        self.gamma_history: list[int] = []
        self._draft_seconds = 0.0
        self._verify_start = 0.0
        self._last_gamma: int | None = None   # γ after the latest speculative step ("auto": for its batch size)

    @property
    def gamma(self) -> int:
        return self.fixed_gamma if self.adaptive is None else self.adaptive.gamma

    def gamma_for(self, batch_size: int) -> int:
        """γ for a step of ``batch_size`` sequences ("auto": from the costs measured at that batch size)."""
        return self.fixed_gamma if self.adaptive is None else self.adaptive.gamma_for(batch_size)

    # -- 1. propose ------------------------------------------------------------------------------

    def extend(self, plan: StepPlan, scheduler) -> None:
        """Add guesses to the plan's decoding sequences and give them slots (never by evicting or
        preempting: a sequence that does not fit guesses fewer tokens, or none)."""
        plan.draft_tokens = plan.draft_probs = None
        self._gate_step = None
        self._one_off = False
        self._trees: dict[int, _TreeShape] = {}   # id(seq) -> the shape of its token tree (tree speculation)
        if self.tree_width and max(plan.num_new_tokens) > MAX_VERIFY_QUERIES:
            return  # a long prefill chunk in this step: tree masks need the batched verify attention
        if len(plan.samples) != len(plan.seqs) and any(row.is_fork for row in plan.samples):
            return
        if any(seq.params.prompt_logprobs is not None and seq.num_computed_tokens < seq.num_prompt_tokens
               for seq in plan.seqs):
            return
        gamma = self.gamma_for(len(plan.seqs))
        candidates, wanted = [], []
        sampled_ids = {id(row.seq) for row in plan.samples}
        for b, (seq, num_new) in enumerate(zip(plan.seqs, plan.num_new_tokens)):
            if (num_new != 1 or seq.num_computed_tokens + 1 != seq.num_tokens or seq.num_output_tokens == 0
                    or id(seq) not in sampled_ids or not can_speculate(seq)):
                continue
            limit = min(gamma, seq.params.max_tokens - seq.num_output_tokens - 1,
                        self.max_model_len - seq.num_tokens - 1)
            if limit > 0:
                candidates.append(b)
                wanted.append(limit)
        if not candidates:
            return
        if self.gate is not None and all(n == 1 for n in plan.num_new_tokens):  # a decode step: timed
            speculate = self.gate.speculate(len(plan.seqs))
            self._gate_step = (len(plan.seqs), speculate, self.clock())
            if not speculate:
                return
        start = self.clock()
        proposals = self.proposer.propose([plan.seqs[b] for b in candidates], wanted)
        self._draft_seconds = self.clock() - start
        # A draft that met new sequences ran their prompts through itself first, and one that comes back
        # after plain steps catches up on every token it skipped: one-off costs that say nothing about the
        # next steps, kept out of the measurements "auto" decides by (the gate runs the next step
        # speculatively as well, to measure that one instead).
        self._one_off = bool(getattr(self.proposer, "num_new_sequences", 0)
                             or getattr(self.proposer, "max_catch_up", 0) > CATCH_UP_STEADY)
        manager = scheduler.block_manager
        budget = scheduler.config.max_num_batched_tokens - sum(plan.num_new_tokens)
        draft_tokens: list[list[int]] = [[] for _ in plan.seqs]
        draft_probs: list[torch.Tensor | None] = [None for _ in plan.seqs]
        for b, limit, proposal in zip(candidates, wanted, proposals):
            seq = plan.seqs[b]
            k = min(len(proposal.tokens), limit, budget)
            if proposal.parents is not None:  # a tree: its nodes, not its depth, take slots and budget
                k = min(len(proposal.tokens), self.max_model_len - seq.num_tokens - 1, budget,
                        MAX_VERIFY_QUERIES - 1)
            while k > 0 and not manager.can_allocate(seq, 1 + k):
                k -= 1
            if k <= 0:
                continue
            manager.allocate(seq, 1 + k)
            plan.num_new_tokens[b] = 1 + k
            budget -= k
            draft_tokens[b] = list(proposal.tokens[:k])
            draft_probs[b] = proposal.probs[:k] if proposal.probs is not None else None
            if proposal.parents is not None:
                # a prefix of the nodes is a tree
                confidence = list(proposal.confidence[:k + 1]) if proposal.confidence is not None else None
                self._trees[id(seq)] = _TreeShape(list(proposal.parents[:k + 1]), confidence)
        plan.copies = plan.copies + manager.take_pending_copies()
        if any(draft_tokens):
            plan.draft_tokens, plan.draft_probs = draft_tokens, draft_probs
            self._verify_start = self.clock()

    # -- 2. verify (called by the model runner with the logits of every verified position) ----------

    def attention_context(self, runner, metadata):
        """The verify forward's attention: the engine's backend, with the batched verify attention for
        short chunks on the reference / sdpa backends (their prefill loops over sequences)."""
        from miniinfer.engine.attention_context import PagedKVContext
        from miniinfer.speculative.verify_attention import wrap_backend

        self._runner = runner
        backend = wrap_backend(runner.backend)
        if self._trees:
            from miniinfer.speculative.tree import tree_attention_mask

            metadata.tree_masks = [tree_attention_mask(self._trees[id(seq)].parents) if id(seq) in self._trees else None
                                   for seq in self._plan.seqs]
        return PagedKVContext(runner.k_caches, runner.v_caches, metadata, backend, decode_hook=runner._decode_hook)

    def positions(self, plan: StepPlan, positions: list[int], cu_seqlens_q: list[int]) -> list[int]:
        """RoPE positions of a verify step: a tree node sits at (newest token's position + its depth), so
        siblings share a position; chains keep the packed positions."""
        self._plan = plan
        if not self._trees:
            return positions
        from miniinfer.speculative.tree import TokenTree

        positions = list(positions)
        for b, seq in enumerate(plan.seqs):
            shape = self._trees.get(id(seq))
            if shape is not None:
                parents = shape.parents
                start = cu_seqlens_q[b]
                first = positions[start]
                positions[start:cu_seqlens_q[b + 1]] = [first + d for d in TokenTree([0] * len(parents), parents).depths]
        return positions

    def logits_rows(self, plan: StepPlan, cu_seqlens_q: list[int]) -> list[int]:
        """Packed rows whose logits the verify step needs: every new token of a speculating sequence,
        the last one of any other sequence that samples."""
        sampled_ids = {id(row.seq) for row in plan.samples}
        rows = []
        for b, seq in enumerate(plan.seqs):
            if plan.draft_tokens[b]:
                rows.extend(range(cu_seqlens_q[b], cu_seqlens_q[b + 1]))
            elif id(seq) in sampled_ids:
                rows.append(cu_seqlens_q[b + 1] - 1)
        return rows

    def verify(self, logits: torch.Tensor, plan: StepPlan, sample_plain) -> SampledTokens:
        """logits [R, V] in the order of :meth:`logits_rows` -> one token per sample row, plus the accepted
        guesses before it (``spec_tokens``). ``sample_plain(logits, plan)`` is the ordinary sampler, for
        the rows that did not speculate."""
        logits = logits.float()
        draft_of = {id(seq): (tokens, probs) for seq, tokens, probs in
                    zip(plan.seqs, plan.draft_tokens, plan.draft_probs)}
        spec_rows, spec_logits, plain_rows, plain_logits = [], [], [], []
        offset = 0
        for i, row in enumerate(plan.samples):
            tokens, _ = draft_of[id(row.seq)]
            if tokens:
                spec_rows.append(i)
                spec_logits.append(logits[offset:offset + len(tokens) + 1])
                offset += len(tokens) + 1
            else:
                plain_rows.append(i)
                plain_logits.append(logits[offset:offset + 1])
                offset += 1
        token_ids = [-1] * len(plan.samples)
        spec_tokens: list[list[int] | None] = [None] * len(plan.samples)
        if plain_rows:
            sub = StepPlan(samples=[plan.samples[i] for i in plain_rows])
            plain = sample_plain(torch.cat(plain_logits), sub)
            for i, token in zip(plain_rows, plain.token_ids):
                token_ids[i] = token
        tree_rows = [i for i in spec_rows if id(plan.samples[i].seq) in self._trees]
        if tree_rows:
            tree_logits = dict(zip(spec_rows, spec_logits))
            for i in tree_rows:
                path_tokens, token = self._accept_tree(plan.samples[i], draft_of[id(plan.samples[i].seq)][0],
                                                       tree_logits[i])
                spec_tokens[i], token_ids[i] = path_tokens, token
            keep = [j for j, i in enumerate(spec_rows) if i not in set(tree_rows)]
            spec_rows, spec_logits = [spec_rows[j] for j in keep], [spec_logits[j] for j in keep]
        if spec_rows:
            rows = [plan.samples[i] for i in spec_rows]
            drafts = [draft_of[id(row.seq)] for row in rows]
            # Every row speculated (the usual verify step): their logits are the whole tensor, in order.
            whole = logits if not plain_rows and not tree_rows and offset == logits.shape[0] else None
            num_accepted, next_tokens = self._accept(rows, drafts, spec_logits, whole)
            for i, (tokens, _), a, token in zip(spec_rows, drafts, num_accepted, next_tokens):
                spec_tokens[i] = list(tokens[:a]) if token >= 0 else []
                token_ids[i] = token
        return SampledTokens(token_ids, spec_tokens=spec_tokens)

    def _accept_tree(self, row, guesses: list[int], logits: torch.Tensor) -> tuple[list[int], int]:
        """Walk the tree from the root: greedy follows the argmax child; sampling uses SpecInfer's
        multi-candidate rule (deterministic children). Then move the accepted path's K/V to consecutive
        slots, where the next steps expect them. -> (accepted guesses, next token)."""
        from miniinfer.sampler import uniform_from_seed_reference
        from miniinfer.speculative.tree import TokenTree, multi_candidate_accept

        seq = row.seq
        shape = self._trees[id(seq)]
        tree = TokenTree([seq.token_ids[-1], *guesses], shape.parents, shape.confidence)
        depths = tree.depths
        if not bool(torch.isfinite(logits).all()):
            return [], -1
        if seq.params.greedy:
            best = logits.argmax(dim=-1).tolist()
            probs = None
        else:
            step = seq.num_output_tokens
            batch = SamplingBatch.build([SamplingRow(seq.params, row.stream_seed, step + d, (), ()) for d in depths],
                                        logits.shape[-1], logits.device)
            probs = batch_probabilities(logits, batch)
        node, path = 0, []
        while True:
            children = tree.children(node)
            if probs is None:
                nxt = next((c for c in children if tree.tokens[c] == best[node]), None)
                token = best[node]
            else:
                step = seq.num_output_tokens + depths[node]
                u = [uniform_from_seed_reference(derive_seed(row.stream_seed, ACCEPT_STREAM + 1 + c), step)
                     for c in range(len(children))]
                u_sample = uniform_from_seed_reference(row.stream_seed, step)
                index, token = multi_candidate_accept(probs[node], [tree.tokens[c] for c in children],
                                                      [None] * len(children), u, u_sample)
                nxt = None if index is None else children[index]
            if nxt is None:
                break
            path.append(nxt)
            node = nxt
        self.proposer.observe_tree(tree, path)  # a tree proposer learns how often its guesses survive
        self._compact_kv(seq, path)
        return [tree.tokens[n] for n in path], int(token)

    def _compact_kv(self, seq: Sequence, path: list[int]) -> None:
        """Node i's K/V were written at position (newest + i); the accepted node at depth d belongs at
        (newest + d). Copy, in every layer (sources always lie after their destinations: no clobbering)."""
        moves = [(node, depth) for depth, node in enumerate(path, start=1) if node != depth]
        if not moves:
            return
        runner, P, base = self._runner, self._runner.block_size, seq.num_computed_tokens

        def slot(position):
            return seq.block_table[position // P] * P + position % P

        device = runner.k_caches[0].device
        source = torch.tensor([slot(base + node) for node, _ in moves], device=device)
        destination = torch.tensor([slot(base + depth) for _, depth in moves], device=device)
        for cache in (*runner.k_caches, *runner.v_caches):
            flat = cache.view(-1, *cache.shape[2:])
            flat[destination] = flat[source]

    def _accept(self, rows, drafts, spec_logits: list[torch.Tensor],
                whole: torch.Tensor | None = None) -> tuple[list[int], list[int]]:
        device = spec_logits[0].device
        if not self.custom_rule and all(row.seq.params.greedy for row in rows):
            # Greedy: a guess survives iff it is the target's argmax; the next token is the argmax after
            # the last survivor. (What accept_draft computes for one-hot p and q, without building them.)
            num_accepted, next_tokens = [], []
            # one argmax for the batch (and no copy when the rows are the whole logits tensor)
            values, best = (whole if whole is not None else torch.cat(spec_logits)).max(dim=-1)
            best = best.masked_fill(~torch.isfinite(values), -1).tolist()
            offset = 0
            for tokens, _ in drafts:
                row_best, offset = best[offset:offset + len(tokens) + 1], offset + len(tokens) + 1
                a = 0
                while a < len(tokens) and row_best[a] == tokens[a]:
                    a += 1
                num_accepted.append(a)
                next_tokens.append(row_best[a])
            return num_accepted, next_tokens
        R, K, V = len(rows), max(len(t) for t, _ in drafts), spec_logits[0].shape[-1]
        sampling_rows = []
        for row, (tokens, _) in zip(rows, drafts):
            step = row.seq.num_output_tokens
            sampling_rows.extend(SamplingRow(row.seq.params, row.stream_seed, step + j, (), ())
                                 for j in range(len(tokens) + 1))
        flat = batch_probabilities(torch.cat(spec_logits), SamplingBatch.build(sampling_rows, V, device))
        p = torch.zeros(R, K + 1, V, device=device)
        q = torch.zeros(R, K, V, device=device)
        draft = torch.zeros(R, K, dtype=torch.long, device=device)
        bad = []
        offset = 0
        for r, (tokens, probs) in enumerate(drafts):
            k = len(tokens)
            block = flat[offset:offset + k + 1]
            offset += k + 1
            bad.append(not bool(torch.isfinite(block).all()))
            p[r, :k + 1] = torch.nan_to_num(block, nan=0.0)
            draft[r, :k] = torch.tensor(tokens, device=device)
            if probs is not None:
                q[r, :k] = probs.to(device)
            else:
                q[r, torch.arange(k, device=device), draft[r, :k]] = 1.0
        num_draft = torch.tensor([len(t) for t, _ in drafts], device=device)
        streams = [row.stream_seed for row in rows]
        steps = torch.tensor([row.seq.num_output_tokens for row in rows], device=device)
        accept_seeds = torch.tensor([_signed64(derive_seed(s, ACCEPT_STREAM)) for s in streams], device=device)
        u_accept = uniform_from_seed(accept_seeds[:, None].expand(R, K).reshape(-1),
                                     (steps[:, None] + torch.arange(K, device=device)).reshape(-1)).view(R, K)
        u_sample = uniform_from_seed(torch.tensor([_signed64(s) for s in streams], device=device), steps)
        num_accepted, next_tokens = self.accept_fn(p, q, draft, num_draft, u_accept, u_sample)
        num_accepted = [int(a) for a in torch.as_tensor(num_accepted).tolist()]
        next_tokens = [int(t) for t in torch.as_tensor(next_tokens).tolist()]
        for r in range(R):
            if bad[r]:
                num_accepted[r], next_tokens[r] = 0, -1
            num_accepted[r] = max(0, min(num_accepted[r], len(drafts[r][0])))
        return num_accepted, next_tokens

    # -- 3. after the commit ---------------------------------------------------------------------

    def after_commit(self, plan: StepPlan, sampled: SampledTokens) -> None:
        now = self.clock()
        if self._gate_step is not None:
            batch_size, chose_speculation, start = self._gate_step
            accepted = sum(len(t) for t in sampled.spec_tokens or () if t is not None)
            speculative = plan.draft_tokens is not None
            if not (speculative and self._one_off):
                # A step the gate let speculate but that got no guesses (n-gram lookup found nothing) was a
                # plain decode step, and is measured as one.
                self.gate.observe(batch_size, speculative, now - start, len(plan.samples) + accepted)
            plain = self.gate.plain_step_seconds(batch_size)
            if speculative and not self._one_off and plain is not None and self.adaptive is not None:
                self.adaptive.observe_step_cost(batch_size, max(len(t) for t in plan.draft_tokens), now - start, plain)
            if chose_speculation and (self._one_off or not speculative):
                self.gate.measure_again(batch_size)  # no speculative step measured: the next one is
            self._gate_step = None
        if plan.draft_tokens is not None:
            verify_seconds = now - self._verify_start
            proposed = sum(len(t) for t in plan.draft_tokens)
            accepted = sum(len(t) for t in sampled.spec_tokens or () if t is not None)
            verified = sum(1 for t in plan.draft_tokens if t)
            c = self.counters
            c["spec_steps"] += 1
            c["spec_verified_seqs"] += verified
            c["spec_draft_tokens"] += proposed
            c["spec_accepted_tokens"] += accepted
            c["spec_emitted_tokens"] += accepted + verified
            if self.adaptive is not None:
                rejected = None  # trees: every node counts as a tested guess
                if not self._trees:  # chains: a sequence tests its guesses up to its first rejection
                    guesses = {id(seq): len(t) for seq, t in zip(plan.seqs, plan.draft_tokens) if t}
                    rejected = sum(1 for row, kept in zip(plan.samples, sampled.spec_tokens or ())
                                   if guesses.get(id(row.seq)) and (kept is None or len(kept) < guesses[id(row.seq)]))
                self.adaptive.observe(proposed, accepted, None if self._one_off else self._draft_seconds,
                                      verify_seconds, draft_steps=max(len(t) for t in plan.draft_tokens),
                                      num_rejected=rejected)
            self._last_gamma = self.gamma_for(len(plan.seqs))  # after this step's measurements
            self.gamma_history.append(self._last_gamma)
        for seq in plan.seqs:
            if seq.is_finished:
                self.proposer.release(seq)

    def stats(self) -> dict:
        c = dict(self.counters)
        verified = c["spec_verified_seqs"]
        c["spec_mean_accepted_length"] = c["spec_accepted_tokens"] / verified if verified else 0.0
        c["spec_tokens_per_verify"] = c["spec_emitted_tokens"] / verified if verified else 0.0
        c["spec_acceptance_rate"] = c["spec_accepted_tokens"] / c["spec_draft_tokens"] if c["spec_draft_tokens"] else 0.0
        c["spec_gamma"] = self.gamma if self._last_gamma is None else self._last_gamma  # the latest step's
        c["spec_proposer"] = self.proposer.name
        return c
