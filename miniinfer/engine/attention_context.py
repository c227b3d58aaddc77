"""Attention over the paged KV pool: the engine's implementation of the model's attention hook.

The model computes q, k, v for the tokens of a step and calls ``context.attend(layer, q, k, v,
scale)`` (see :class:`miniinfer.attention.AttentionContext`). Here that means: store the new keys and
values into their slots of the pool, then let every query attend to its sequence's keys, read
through the block table. A decode-only step (one query per sequence) uses the backend's decode
kernel; a step with prefill chunks uses its prefill kernel, which handles a cached prefix plus causal
attention among the new tokens (decode rows are just sequences with one new token).

The backend is an object chosen once at start-up (:mod:`miniinfer.engine.attention_backends`).
``EngineHooks(paged_decode_attention=fn)`` replaces the decode kernel with ``fn`` (chapter 07's
exercise), with the signature of
:func:`~miniinfer.kernels.paged_attention.paged_decode_attention_torch`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from miniinfer.engine.attention_backends import AttentionBackend


@dataclass
class PagedAttentionMetadata:
    """Per-step batch layout, built once per step by the model runner and shared by all layers.

    T packed new tokens from B sequences; M = width of the block tables.
    """

    slot_mapping: torch.Tensor   # [T] int32: where each new token's K/V go (-1: padding, not stored)
    block_tables: torch.Tensor   # [B, M] int32: KV blocks of each sequence (unused entries: anything)
    seq_lens: torch.Tensor       # [B] int32: keys per sequence after this step (cached + new)
    cu_seqlens_q: torch.Tensor   # [B + 1] int32: new tokens of sequence b are rows cu[b]:cu[b+1]
    decode_only: bool            # every sequence has exactly one new token
    max_seq_len: int             # an upper bound of seq_lens (kernels size their grids with it, no device sync)
    max_q_len: int               # most new tokens of one sequence in this step
    has_padding: bool = False    # some slots are -1 (CUDA-graph padding rows): known on the host
    # Caches built by the first layer of the step and shared by the others.
    _gather: tuple | None = field(default=None, init=False, repr=False)   # decode_gather_index
    _slots_long: torch.Tensor | None = field(default=None, init=False, repr=False)
    _split: tuple | None = field(default=None, init=False, repr=False)    # split_single_token_rows

    @property
    def slots_long(self) -> torch.Tensor:
        """slot_mapping as int64, the index type of ``index_copy_`` (converted once per step)."""
        if self._slots_long is None:
            self._slots_long = self.slot_mapping.long()
        return self._slots_long

    def decode_gather_index(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For the "sdpa" decode path: the flat slot of every key of every sequence, ``[B, S_max]``, and
        a mask of the real ones (None when there is one sequence). Built once per step from the block
        tables and shared by all layers."""
        cached = self._gather
        if cached is None or cached[0] != block_size:
            positions = torch.arange(self.max_seq_len, device=self.block_tables.device)
            block_index = (positions // block_size).clamp(max=self.block_tables.shape[1] - 1)
            blocks = self.block_tables.long()[:, block_index]                      # [B, S_max]
            slots = blocks * block_size + positions % block_size
            mask = None
            if self.block_tables.shape[0] > 1:
                mask = positions[None, :] < self.seq_lens[:, None].long()          # [B, S_max]
            cached = (block_size, slots, mask)
            self._gather = cached
        return cached[1], cached[2]

    def split_single_token_rows(self) -> SingleTokenSplit | None:
        """For a step that mixes decodes with prompts (continuous batching: a new prompt joins the running
        decodes): the sequences with exactly one new token, and the others, each with metadata of its
        own, so that a backend can run the decodes through its batched decode path. None when the step
        has no such mix (no one-token sequence, or nothing else). Built once per step (host reads: the query
        offsets, and each group's longest sequence) and shared by all layers."""
        if self._split is None:
            starts = self.cu_seqlens_q.tolist()
            q_lens = [b - a for a, b in zip(starts, starts[1:])]
            single = [b for b, n in enumerate(q_lens) if n == 1]
            longer = [b for b, n in enumerate(q_lens) if n > 1]
            split = None
            if single and longer:
                single_rows, longer_rows = self._rows(single, starts, q_lens), self._rows(longer, starts, q_lens)
                split = SingleTokenSplit(self._subset(single, q_lens, single_rows),
                                         self._subset(longer, q_lens, longer_rows), single_rows, longer_rows)
            self._split = (split,)
        return self._split[0]

    def _rows(self, sequences: list[int], starts: list[int], q_lens: list[int]) -> torch.Tensor:
        """The token rows (of q, k, v) of ``sequences``, in order."""
        rows = [r for b in sequences for r in range(starts[b], starts[b] + q_lens[b])]
        return torch.tensor(rows, dtype=torch.long, device=self.cu_seqlens_q.device)

    def _subset(self, sequences: list[int], q_lens: list[int], rows: torch.Tensor) -> PagedAttentionMetadata:
        """The metadata of ``sequences`` alone (``rows``: their token rows)."""
        index = torch.tensor(sequences, dtype=torch.long, device=self.block_tables.device)
        counts = [q_lens[b] for b in sequences]
        offsets = [0]
        for count in counts:
            offsets.append(offsets[-1] + count)
        seq_lens = self.seq_lens[index]
        return PagedAttentionMetadata(
            slot_mapping=self.slot_mapping[rows], block_tables=self.block_tables[index], seq_lens=seq_lens,
            cu_seqlens_q=torch.tensor(offsets, dtype=self.cu_seqlens_q.dtype, device=self.cu_seqlens_q.device),
            decode_only=max(counts) == 1, max_seq_len=int(seq_lens.max()), max_q_len=max(counts),
            has_padding=self.has_padding)


class PagedKVContext:
    """Implements ``attend`` against per-layer pools ``k_caches[l], v_caches[l]: [num_blocks, P, H_kv, D]``
    with one :class:`~miniinfer.engine.attention_backends.AttentionBackend`; ``decode_hook`` (the
    chapter-07 plug-in) replaces the backend's decode when given."""

    def __init__(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                 metadata: PagedAttentionMetadata, backend: AttentionBackend, decode_hook: Callable | None = None):
        self.k_caches = k_caches
        self.v_caches = v_caches
        self.metadata = metadata
        self.backend = backend
        self.decode_hook = decode_hook

    def attend(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, H_kv, D] (RoPE applied) → [T, H, D]."""
        meta = self.metadata
        k_cache, v_cache = self.k_caches[layer_index], self.v_caches[layer_index]
        self.backend.write_kv(k, v, k_cache, v_cache, meta)
        if meta.decode_only:
            if self.decode_hook is not None:
                return self.decode_hook(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
            return self.backend.decode(q, k_cache, v_cache, meta, scale)
        return self.backend.prefill(q, k_cache, v_cache, meta, scale)


@dataclass
class SingleTokenSplit:
    """A mixed step's sequences in two groups (:meth:`PagedAttentionMetadata.split_single_token_rows`):
    ``decodes`` (one new token each: decode-only metadata) and ``prompts`` (more than one), with the
    token rows of each group in the step's packed q, k, v."""

    decodes: PagedAttentionMetadata
    prompts: PagedAttentionMetadata
    decode_rows: torch.Tensor   # [B_decode] long
    prompt_rows: torch.Tensor   # [T_prompt] long

