"""The model runner: owns the KV pool tensors, packs a step's batch, runs the model.

A step's batch is **flat**: the new tokens of all scheduled sequences one after another, ``T`` of
them, with no padding. Each token carries its position (for RoPE) and its slot in the KV pool;
each sequence contributes its block table, its total key count and its query range. The model then
runs once over ``T`` tokens and the LM head only on the last token of each sequence that is ready
to sample (a prefill chunk that stops mid-prompt produces no token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miniinfer.engine.attention_context import PagedAttentionMetadata, PagedKVContext
from miniinfer.engine.block_manager import BlockManager
from miniinfer.engine.hooks import EngineHooks
from miniinfer.engine.scheduler import ScheduledBatch
from miniinfer.engine.sequence import Sequence


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor       # [T]
    positions: torch.Tensor       # [T]
    metadata: PagedAttentionMetadata
    logits_indices: torch.Tensor  # [N] rows of the T tokens whose logits we need
    sampling_seqs: list[Sequence]  # the N sequences those rows belong to


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers: keys and values, P tokens, H_kv heads of D numbers."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * itemsize


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, attention_backend: str = "auto",
                 hooks: EngineHooks | None = None):
        self.model = model
        self.hooks = hooks or EngineHooks()
        config = model.config
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.block_size = block_size
        self.attention_backend = attention_backend
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        # Zero-filled: slots past a sequence's length are never read by the kernels, but zeros keep a
        # buggy read from turning into NaN that spreads silently.
        self.k_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(config.num_hidden_layers)]
        self.v_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(config.num_hidden_layers)]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (every layer) before a sequence writes into its copy."""
        if not copies:
            return
        source = torch.tensor([s for s, _ in copies], device=self.device)
        destination = torch.tensor([d for _, d in copies], device=self.device)
        for cache in (*self.k_caches, *self.v_caches):
            cache[destination] = cache[source]

    def prepare(self, batch: ScheduledBatch, block_manager: BlockManager) -> PreparedBatch:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_seqlens_q = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        sampling_seqs: list[Sequence] = []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(block_manager.slots(seq, start, end))
            cu_seqlens_q.append(cu_seqlens_q[-1] + num_new)
            seq_lens.append(end)
            if end == seq.num_tokens:  # everything computed: this step's last logits give the next token
                logits_indices.append(cu_seqlens_q[-1] - 1)
                sampling_seqs.append(seq)
        width = max(len(seq.block_table) for seq in batch.seqs)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in batch.seqs]

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype, device=self.device)

        metadata = PagedAttentionMetadata(
            slot_mapping=tensor(slots, torch.int64),
            block_tables=tensor(tables, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            cu_seqlens_q=tensor(cu_seqlens_q, torch.int32),
            decode_only=len(input_ids) == len(batch.seqs),
            max_seq_len=max(seq_lens),
            max_q_len=max(batch.num_new_tokens),
        )
        return PreparedBatch(tensor(input_ids, torch.int64), tensor(positions, torch.int64), metadata,
                             tensor(logits_indices, torch.int64), sampling_seqs)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, block_manager: BlockManager) -> tuple[torch.Tensor, list[Sequence]]:
        """Run one step; return float32 logits ``[N, V]`` and the N sequences they belong to."""
        self.copy_blocks(block_manager.take_pending_copies())
        prepared = self.prepare(batch, block_manager)
        context = PagedKVContext(self.k_caches, self.v_caches, prepared.metadata, self.attention_backend,
                                 attention_fn=self.model.components.attention, hooks=self.hooks)
        if not prepared.sampling_seqs:
            # A step of prefill chunks only: run the layers for their KV, skip the LM head entirely.
            self.model(prepared.input_ids, prepared.positions, attention=context,
                       logits_indices=prepared.logits_indices)
            return torch.empty(0), []
        logits = self.model(prepared.input_ids, prepared.positions, attention=context,
                            logits_indices=prepared.logits_indices)
        return logits.float(), prepared.sampling_seqs
