"""Attention over the paged KV pool: the engine's implementation of the model's attention hook.

The model computes q, k, v for the tokens of a step and calls ``context.attend(layer, q, k, v,
scale)`` (see :class:`miniinfer.attention.AttentionContext`). Here that means: store the new keys and
values into their slots of the pool, then let every query attend to its sequence's keys, read
through the block table. A decode-only step (one query per sequence) uses the decode kernel; a step
with prefill chunks uses the prefill kernel, which handles a cached prefix plus causal attention
among the new tokens (decode rows are just sequences with one new token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    max_seq_len: int             # max of seq_lens (kernels size their loops with it)


class PagedKVContext:
    """Implements ``attend`` against per-layer pools ``k_caches[l], v_caches[l]: [num_blocks, P, H_kv, D]``."""

    def __init__(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                 metadata: PagedAttentionMetadata, backend: str = "auto"):
        self.k_caches = k_caches
        self.v_caches = v_caches
        self.metadata = metadata
        self.backend = backend

    def attend(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, H_kv, D] (RoPE applied) → [T, H, D]."""
        meta = self.metadata
        k_cache, v_cache = self.k_caches[layer_index], self.v_caches[layer_index]
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.decode_only:
            return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                          backend=self.backend)
        return paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.seq_lens,
                                       scale, backend=self.backend)
