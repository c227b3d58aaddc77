"""Proposers: cheap ways to guess the next few tokens of many sequences at once.

Every proposer answers ``propose(seqs, num_tokens) -> list[Proposal]``: up to ``num_tokens[b]``
guesses for sequence ``b`` (fewer, even none, is always allowed), and the distribution each guess
was drawn from (None = deterministic: the guess had probability 1, as for a greedy request or a
lookup). The target then verifies them all in one forward (:mod:`miniinfer.speculative.acceptance`).

* :class:`NgramProposer` — prompt lookup: find the sequence's latest ``n`` tokens earlier in itself
  and guess what followed them then. Free, and very good when the output quotes the prompt.
* :class:`DraftModelProposer` — a small model of the same vocabulary (the bundled
  ``shakespeare-draft``), with its own paged KV pool and model runner, batched over the sequences.
  It keeps each sequence's KV between steps and rolls it back to the target's tokens when guesses
  were rejected.
* :func:`self_draft_model` — the target itself with only some of its layers (early exit): no second
  model to train or load; a :class:`DraftModelProposer` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from miniinfer.engine.block_manager import BlockManager
from miniinfer.engine.scheduler import SampleRow, StepPlan
from miniinfer.engine.sequence import Sequence
from miniinfer.sampler import (
    SamplingBatch,
    SamplingRow,
    _signed64,
    batch_probabilities,
    derive_seed,
    uniform_from_seed,
)

__all__ = ["Proposal", "Proposer", "NgramProposer", "DraftModelProposer", "LayerSkipModel", "self_draft_model",
           "TreeDraftProposer", "DRAFT_STREAM"]

DRAFT_STREAM = 0x5EC1  # derive_seed(stream_seed, DRAFT_STREAM): the random stream a draft model samples from


@dataclass
class Proposal:
    """Guesses for one sequence: ``tokens`` [k], and ``probs`` [k, V] they were drawn from (None: one-hot)."""

    tokens: list[int]
    probs: torch.Tensor | None = None
    #: a token tree instead of a chain: parents[i] of node i (node 0 = the sequence's newest token, parent
    #: -1; node i ≥ 1 is tokens[i − 1]); every guess deterministic (one-hot q)
    parents: list[int] | None = None


class Proposer:
    """The interface; :meth:`release` lets a stateful proposer forget a finished sequence."""

    name = "proposer"

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        raise NotImplementedError

    def release(self, seq: Sequence) -> None:
        pass


def ngram_lookup(token_ids: list[int], num_tokens: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's last
    ``n`` tokens (longest n first, ``max_n`` … ``min_n``), at most ``num_tokens`` of them; [] if none."""
    L = len(token_ids)
    if num_tokens <= 0:
        return []
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        suffix = token_ids[L - n:]
        first = suffix[0]
        # Latest match first: recent context predicts best. A match must end before the suffix starts.
        for start in range(L - n - 1, -1, -1):
            if token_ids[start] == first and token_ids[start:start + n] == suffix:
                return token_ids[start + n:start + n + num_tokens]
    return []


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, max_n: int = 3, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        return [Proposal(ngram_lookup(seq.token_ids, k, self.max_n, self.min_n)) for seq, k in zip(seqs, num_tokens)]


class LayerSkipModel(nn.Module):
    """The target with only ``layers`` of its decoder layers (the others skipped), then its own final
    norm and LM head: a self-draft that shares every weight. Same forward contract as the model."""

    def __init__(self, target: nn.Module, layers: list[int]):
        super().__init__()
        self.target = target
        self.config = target.config
        self.components = target.components
        self.layer_indices = list(layers)

    def forward(self, input_ids, positions=None, attention=None, logits_indices=None):
        from miniinfer.layers import embedding, lm_head

        inner = self.target.model
        cos, sin = inner.rotary_emb.cos_sin(positions)
        x = embedding(input_ids, inner.embed_tokens.weight)
        for index in self.layer_indices:  # each layer keeps its own index: its own KV pool slot
            x = inner.layers[index](x, cos, sin, attention)
        if logits_indices is not None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, logits_indices)
        return lm_head(inner.norm(x), self.target.lm_head_weight)


def self_draft_model(target: nn.Module, num_layers: int | None = None) -> LayerSkipModel:
    """Early exit: the first ``num_layers`` layers of the target (default: a third, at least one)."""
    total = target.config.num_hidden_layers
    num_layers = max(1, total // 3) if num_layers is None else num_layers
    if not 1 <= num_layers <= total:
        raise ValueError(f"a self-draft keeps 1 … {total} layers, got {num_layers}")
    return LayerSkipModel(target, list(range(num_layers)))


class DraftModelProposer(Proposer):
    """A small model guessing autoregressively, batched over sequences, with its own paged KV pool.

    For each target sequence it keeps a *shadow* :class:`Sequence` holding the draft's own KV. At
    every call the shadow is synchronised with the target's tokens — its computed count cut back
    to the common prefix (the KV of rejected guesses is simply overwritten later; whole blocks past
    it are released) — then each shadow catches up on new tokens and guesses one token at a time.
    """

    name = "draft"

    def __init__(self, model: nn.Module, num_blocks: int, block_size: int = 16, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, max_model_len: int = 1024, eos_token_ids=(),
                 name: str = "draft", backend=None):
        from miniinfer.engine.attention_backends import select_attention_backend
        from miniinfer.engine.model_runner import ModelRunner

        self.name = name
        self.model = model
        parameter = next(model.parameters())
        if backend is None:  # the engine passes its own; alone: the CPU's default, or Triton on a GPU
            backend = select_attention_backend("auto" if parameter.device.type == "cpu" else "triton",
                                               parameter.device, parameter.dtype, model.config, block_size,
                                               max_model_len=max_model_len)
        from miniinfer.speculative.verify_attention import wrap_backend

        backend = wrap_backend(backend)  # catch-up chunks of a few tokens: batched, not per sequence
        self.block_manager = BlockManager(num_blocks, block_size)
        self.runner = ModelRunner(model, num_blocks, block_size, backend, max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                                  eos_token_ids=tuple(eos_token_ids))
        self.budget = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.shadows: dict[int, tuple[Sequence, Sequence]] = {}  # target seq_id -> (target, shadow)

    def release(self, seq: Sequence) -> None:
        entry = self.shadows.pop(seq.seq_id, None)
        if entry is not None:
            self.block_manager.free(entry[1])

    def _sync(self, seq: Sequence) -> Sequence:
        entry = self.shadows.get(seq.seq_id)
        if entry is None:
            shadow = Sequence(seq.request_id, list(seq.token_ids), seq.params, stream_seed=seq.stream_seed)
            self.shadows[seq.seq_id] = (seq, shadow)
            return shadow
        shadow = entry[1]
        old, new = shadow.token_ids, seq.token_ids
        common = min(len(old), len(new), shadow.num_computed_tokens)
        while common > 0 and old[common - 1] != new[common - 1]:
            common -= 1
        if old[:common] != new[:common]:  # diverged earlier (should not happen): start over
            common = 0
        shadow.num_computed_tokens = common
        shadow.token_ids = list(new)
        keep = -(-common // self.block_manager.block_size)
        for block in shadow.block_table[keep:]:   # rolled back: whole blocks past the kept KV go back
            self.block_manager.release(block)
        del shadow.block_table[keep:]
        return shadow

    def _collect_finished(self) -> None:
        for target, _ in list(self.shadows.values()):
            if target.is_finished:
                self.release(target)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        self._collect_finished()
        proposals = [Proposal([]) for _ in seqs]
        want = {b: k for b, k in enumerate(num_tokens) if k > 0}
        shadows = {b: self._sync(seqs[b]) for b in want}
        start = {b: len(shadows[b].token_ids) for b in want}
        probs: dict[int, list[torch.Tensor]] = {b: [] for b in want}
        manager = self.block_manager
        while want:
            plan, rows = StepPlan(), []
            budget = self.budget
            for b in list(want):
                shadow = shadows[b]
                num_new = min(shadow.num_uncomputed_tokens, budget)
                if num_new <= 0 or len(plan.seqs) >= self.max_num_seqs:
                    continue
                if not manager.can_allocate(shadow, num_new):
                    self.release(seqs[b])  # the draft pool is full: this sequence gets no more guesses
                    del want[b]
                    continue
                manager.allocate(shadow, num_new)
                plan.seqs.append(shadow)
                plan.num_new_tokens.append(num_new)
                budget -= num_new
                if shadow.num_computed_tokens + num_new == shadow.num_tokens:
                    plan.samples.append(SampleRow(shadow, 0, shadow.stream_seed))
                    rows.append(b)
            if not plan.seqs:
                break
            plan.copies = manager.take_pending_copies()
            self.runner.copy_blocks(plan.copies)
            inputs = self.runner.prepare(plan, manager)
            logits = self.model(inputs.input_ids, inputs.positions, attention=self.runner.context(inputs.metadata),
                                logits_indices=inputs.logits_indices).float()
            for shadow, num_new in zip(plan.seqs, plan.num_new_tokens):
                shadow.num_computed_tokens += num_new
            if rows:
                tokens, row_probs = self._choose(logits, [shadows[b] for b in rows], [seqs[b] for b in rows],
                                                 [len(shadows[b].token_ids) - start[b] for b in rows])
                for i, b in enumerate(rows):
                    shadows[b].token_ids.append(tokens[i])
                    proposals[b].tokens.append(tokens[i])
                    if row_probs is not None:
                        probs[b].append(row_probs[i])
                    if len(proposals[b].tokens) >= want[b]:
                        del want[b]
        for b, rows_of_b in probs.items():
            if rows_of_b and not seqs[b].params.greedy:
                proposals[b].probs = torch.stack(rows_of_b)
        return proposals

    def _choose(self, logits: torch.Tensor, shadows: list[Sequence], targets: list[Sequence], offsets: list[int]):
        """Greedy rows take the argmax (their proposal is one-hot); sampled rows draw from the draft's
        distribution under the request's temperature / top-k / top-p / min-p, from their own stream."""
        if all(t.params.greedy for t in targets):
            return logits.argmax(dim=-1).tolist(), None
        steps = [t.num_output_tokens + o for t, o in zip(targets, offsets)]
        batch = SamplingBatch.build([SamplingRow(t.params, t.stream_seed, s, (), ()) for t, s in zip(targets, steps)],
                                    logits.shape[-1], logits.device)
        p = batch_probabilities(logits, batch)
        seeds = torch.tensor([_signed64(derive_seed(t.stream_seed, DRAFT_STREAM)) for t in targets],
                             device=logits.device)
        u = uniform_from_seed(seeds, torch.tensor(steps, device=logits.device))
        from miniinfer.speculative.acceptance import draw_from

        return draw_from(torch.nan_to_num(p, nan=1.0), u).tolist(), p


class TreeDraftProposer(Proposer):
    """Token trees from a draft model: its top-``width`` next tokens, each continued greedily, so about
    ``num_tokens`` guesses per sequence (depth ``num_tokens // width``). Each tree comes from plain
    forwards of the draft over the whole sequence (no KV cache: simple, and fine for a tiny draft over
    short contexts; it makes trees slower in wall time than they need to be)."""

    name = "draft-tree"

    def __init__(self, model: nn.Module, width: int):
        if width < 2:
            raise ValueError(f"a token tree needs a width of at least 2, got {width}")
        self.model, self.width = model, width

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        from miniinfer.speculative.tree import draft_tree

        proposals = []
        for seq, k in zip(seqs, num_tokens):
            width = min(self.width, k)
            tree = draft_tree(self.model, seq.token_ids, width, max(1, k // width))
            proposals.append(Proposal(tree.tokens[1:], parents=tree.parents))
        return proposals
