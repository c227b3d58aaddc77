"""Attention over the paged KV pool: the engine's implementation of the model's attention hook.

The model computes q, k, v for the tokens of a step and calls ``context.attend(layer, q, k, v,
scale)`` (see :class:`miniinfer.attention.AttentionContext`). Here that means: store the new keys and
values into their slots of the pool, then let every query attend to its sequence's keys, read
through the block table. A decode-only step (one query per sequence) uses the decode kernel; a step
with prefill chunks uses the prefill kernel, which handles a cached prefix plus causal attention
among the new tokens (decode rows are just sequences with one new token).

``EngineHooks(paged_decode_attention=fn)`` replaces the decode kernel with ``fn`` (chapter 07's
exercise), with the signature of
:func:`~miniinfer.kernels.paged_attention.paged_decode_attention_torch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from miniinfer.engine.hooks import EngineHooks
from miniinfer.kernels.paged_attention import paged_decode_attention, paged_prefill_attention, write_kv


@dataclass
class PagedAttentionMetadata:
    """Per-step batch layout, built once per step by the model runner and shared by all layers.

    T packed new tokens from B sequences; M = widest block table in the batch.
    """

    slot_mapping: torch.Tensor   # [T] int64: where each new token's K/V go
    block_tables: torch.Tensor   # [B, M] int32: KV blocks of each sequence (unused entries: 0)
    seq_lens: torch.Tensor       # [B] int32: keys per sequence after this step (cached + new)
    cu_seqlens_q: torch.Tensor   # [B + 1] int32: new tokens of sequence b are rows cu[b]:cu[b+1]
    decode_only: bool            # every sequence has exactly one new token
    max_seq_len: int             # max of seq_lens (kernels size their grids with it, no device sync)
    max_q_len: int               # most new tokens of one sequence in this step
    # Cache of decode_gather_index: (block_size, slots, mask), built by the first layer of the step.
    _gather: tuple | None = field(default=None, init=False, repr=False)

    def decode_gather_index(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For the "sdpa" decode path: the flat slot of every key of every sequence, ``[B, S_max]``, and
        a mask of the real ones (None when every sequence has ``S_max`` keys). Built once per step from
        the block tables and shared by all layers."""
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


class PagedKVContext:
    """Implements ``attend`` against per-layer pools ``k_caches[l], v_caches[l]: [num_blocks, P, H_kv, D]``.

    ``backend="components"`` runs the model's own attention function (``Components.attention``,
    e.g. the one you wrote in chapter 03) once per sequence on keys gathered through its block
    table: slow, but it puts that function inside the real engine.
    """

    def __init__(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                 metadata: PagedAttentionMetadata, backend: str = "auto", attention_fn=None,
                 hooks: EngineHooks | None = None):
        self.k_caches = k_caches
        self.v_caches = v_caches
        self.metadata = metadata
        self.backend = backend
        self.attention_fn = attention_fn
        self.hooks = hooks or EngineHooks()

    def attend(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, H_kv, D] (RoPE applied) → [T, H, D]."""
        meta = self.metadata
        k_cache, v_cache = self.k_caches[layer_index], self.v_caches[layer_index]
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.decode_only:
            decode = self.hooks.get("paged_decode_attention", self._decode_attention)
            return decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
        if self.backend == "components":
            return self._attend_per_sequence(q, k_cache, v_cache, scale)
        prefill_backend = "auto" if self.backend == "sdpa" else self.backend  # no prefill variant of "sdpa"
        return paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.seq_lens,
                                       scale, backend=prefill_backend, max_q_len=meta.max_q_len,
                                       max_seq_len=meta.max_seq_len)

    def _decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
        """The package's decode: q [B, H, D] -> [B, H, D] with this context's backend."""
        if self.backend == "components":
            return self._attend_per_sequence(q, k_cache, v_cache, scale)
        if self.backend == "sdpa" or (self.backend == "auto" and q.device.type == "cpu"):
            return self._decode_sdpa(q, k_cache, v_cache, scale)
        return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                      backend=self.backend, max_seq_len=self.metadata.max_seq_len)

    def _decode_sdpa(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        """Gather each sequence's keys/values through its block table (one index shared by all layers),
        then torch's fused attention: the fastest decode path on a CPU. q [B, H, D] -> [B, H, D]."""
        slots, mask = self.metadata.decode_gather_index(k_cache.shape[1])
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        keys = k_cache.view(-1, num_kv_heads, head_dim)[slots].transpose(1, 2)    # [B, H_kv, S, D]
        values = v_cache.view(-1, num_kv_heads, head_dim)[slots].transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None, :], keys, values, attn_mask=None if mask is None else mask[:, None, None, :],
            scale=scale, enable_gqa=True)                                             # [B, H, 1, D]
        return out[:, :, 0, :]

    def _attend_per_sequence(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             scale: float) -> torch.Tensor:
        meta = self.metadata
        block_size = k_cache.shape[1]
        out = torch.empty_like(q)
        starts, lengths = meta.cu_seqlens_q.tolist(), meta.seq_lens.tolist()
        for b, seq_len in enumerate(lengths):
            num_blocks = -(-seq_len // block_size)
            blocks = meta.block_tables[b, :num_blocks].long()
            keys = k_cache[blocks].flatten(0, 1)[:seq_len]           # [S, H_kv, D]
            values = v_cache[blocks].flatten(0, 1)[:seq_len]
            rows = slice(starts[b], starts[b + 1])
            # q [1, L, H, D] against k/v [1, S, H_kv, D]: causal, aligned so the last query sees every key.
            out[rows] = self.attention_fn(q[rows][None], keys[None], values[None], causal=True, scale=scale)[0]
        return out
