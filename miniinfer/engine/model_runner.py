"""The model runner: owns the KV pool tensors, packs a step's batch, runs the model.

A step's batch is **flat**: the new tokens of all scheduled sequences one after another, ``T`` of
them, with no padding. Each token carries its position (for RoPE) and its slot in the KV pool;
each sequence contributes its block table, its total key count and its query range. The model then
runs once over ``T`` tokens and the LM head only on the last token of each sequence that is ready
to sample (a prefill chunk that stops mid-prompt produces no token).

The packing itself is the pure function :func:`pack_batch` (chapter 06's exercise), which
``EngineHooks(pack_batch=...)`` replaces; the slots come from the block manager (chapter 07).
"""

from __future__ import annotations

import warnings
from bisect import bisect_right
from dataclasses import dataclass
from typing import NamedTuple

import torch

from miniinfer.engine.attention_context import PagedAttentionMetadata, PagedKVContext
from miniinfer.engine.block_manager import BlockManager
from miniinfer.engine.hooks import EngineHooks
from miniinfer.engine.scheduler import ScheduledBatch
from miniinfer.engine.sequence import Sequence
from miniinfer.kv_cache import kv_bytes_per_token


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor       # [T]
    positions: torch.Tensor       # [T]
    metadata: PagedAttentionMetadata
    logits_indices: torch.Tensor  # [N] rows of the T tokens whose logits we need
    sampling_seqs: list[Sequence]  # the N sequences those rows belong to


class StepEntry(NamedTuple):
    """One sequence of a step, as the model runner ran it (for inspection: chapter 06 draws from it)."""

    request_id: str
    index: int               # which of the request's n completions
    num_computed: int        # tokens with K/V in the cache before this step
    num_new: int             # tokens computed in this step
    num_prompt_tokens: int

    @property
    def num_prefill(self) -> int:
        """How many of this step's tokens are prompt tokens (the rest are decode tokens)."""
        return max(0, min(self.num_new, self.num_prompt_tokens - self.num_computed))


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers: keys and values, P tokens, H_kv heads of D numbers."""
    return block_size * kv_bytes_per_token(config, dtype)


def pack_batch(token_ids: list[list[int]], num_computed: list[int], num_new: list[int]
               ) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """Pack a step's sequences into one flat batch of T tokens, without padding.

    For each of the B sequences: all its token ids so far, how many already have K/V in the cache
    (``num_computed``) and how many this step computes (``num_new``: 1 when decoding, up to the whole
    rest of the prompt when prefilling). Returns, as lists of ints:

    * ``input_ids`` [T] — the new tokens, sequence after sequence;
    * ``positions`` [T] — each token's position in its own sequence;
    * ``cu_seqlens_q`` [B + 1] — sequence b's new tokens are rows ``cu[b] … cu[b+1]−1``;
    * ``seq_lens`` [B] — keys per sequence after this step (cached + new);
    * ``logits_indices`` [N] — the row of the last new token of each sequence that has then computed
      all its tokens (it samples the next one); a prefill chunk that stops mid-prompt has none.
    """
    input_ids: list[int] = []
    positions: list[int] = []
    cu_seqlens_q = [0]
    seq_lens: list[int] = []
    logits_indices: list[int] = []
    for tokens, start, count in zip(token_ids, num_computed, num_new):
        end = start + count
        input_ids.extend(tokens[start:end])
        positions.extend(range(start, end))
        cu_seqlens_q.append(cu_seqlens_q[-1] + count)
        seq_lens.append(end)
        if end == len(tokens):  # everything computed: this step's last logits give the next token
            logits_indices.append(cu_seqlens_q[-1] - 1)
    return input_ids, positions, cu_seqlens_q, seq_lens, logits_indices


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, attention_backend: str = "auto",
                 hooks: EngineHooks | None = None, cuda_graph_max_batch: int = 0, max_model_len: int = 0):
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
        self.last_step: list[StepEntry] = []  # what the latest step ran, one entry per sequence
        # Decode steps replay CUDA graphs (see cuda_graphs.py) when nothing in the step is user Python:
        # hooks and the "components" attention backend run eagerly so that your code really runs.
        self.decode_graphs = None
        uses_hooks = any(value is not None for value in vars(self.hooks).values())
        # The torch reference backends read lengths on the host (.tolist()), which a graph cannot capture.
        if (cuda_graph_max_batch > 0 and self.device.type == "cuda" and attention_backend not in ("components", "torch")
                and not uses_hooks):
            from miniinfer.engine.cuda_graphs import DecodeGraphs

            self.decode_graphs = DecodeGraphs(model, self.k_caches, self.v_caches, cuda_graph_max_batch,
                                              -(-max_model_len // block_size), attention_backend,
                                              attention_fn=model.components.attention, hooks=self.hooks)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (every layer) before a sequence writes into its copy."""
        if not copies:
            return
        source = torch.tensor([s for s, _ in copies], device=self.device)
        destination = torch.tensor([d for _, d in copies], device=self.device)
        for cache in (*self.k_caches, *self.v_caches):
            cache[destination] = cache[source]

    def prepare(self, batch: ScheduledBatch, block_manager: BlockManager) -> PreparedBatch:
        seqs = batch.seqs
        pack = self.hooks.get("pack_batch", pack_batch)
        packed = pack([seq.token_ids for seq in seqs], [seq.num_computed_tokens for seq in seqs],
                      list(batch.num_new_tokens))
        # Lists of ints (the reference); a hook may also return 1-D tensors.
        input_ids, positions, cu_seqlens_q, seq_lens, logits_indices = (
            values.tolist() if isinstance(values, torch.Tensor) else list(values) for values in packed)
        slots: list[int] = []
        for seq, num_new in zip(seqs, batch.num_new_tokens):
            slots.extend(block_manager.slots(seq, seq.num_computed_tokens, seq.num_computed_tokens + num_new))
        if len(input_ids) != len(slots) or len(cu_seqlens_q) != len(seqs) + 1 or len(seq_lens) != len(seqs):
            raise ValueError(f"pack_batch returned {len(input_ids)} tokens, {len(cu_seqlens_q)} cu_seqlens_q and "
                             f"{len(seq_lens)} seq_lens for {len(seqs)} sequences with {len(slots)} new tokens")
        # The sequence that owns each logits row samples from it.
        sampling_seqs = [seqs[bisect_right(cu_seqlens_q, index) - 1] for index in logits_indices]
        width = max(len(seq.block_table) for seq in seqs)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in seqs]

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype, device=self.device)

        metadata = PagedAttentionMetadata(
            slot_mapping=tensor(slots, torch.int64),
            block_tables=tensor(tables, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            cu_seqlens_q=tensor(cu_seqlens_q, torch.int32),
            decode_only=len(input_ids) == len(seqs),
            max_seq_len=max(seq_lens),
            max_q_len=max(batch.num_new_tokens),
        )
        return PreparedBatch(tensor(input_ids, torch.int64), tensor(positions, torch.int64), metadata,
                             tensor(logits_indices, torch.int64), sampling_seqs)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, block_manager: BlockManager) -> tuple[torch.Tensor, list[Sequence]]:
        """Run one step; return float32 logits ``[N, V]`` and the N sequences they belong to."""
        self.copy_blocks(block_manager.take_pending_copies())
        self.last_step = [StepEntry(seq.request_id, seq.index, seq.num_computed_tokens, num_new, seq.num_prompt_tokens)
                          for seq, num_new in zip(batch.seqs, batch.num_new_tokens)]
        if self._is_graphable_decode(batch):
            return self._execute_decode_graph(batch, block_manager)
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

    def _is_graphable_decode(self, batch: ScheduledBatch) -> bool:
        """Every sequence computes exactly its one newest token (so every one samples), and a graph fits."""
        return (self.decode_graphs is not None and self.decode_graphs.bucket_for(len(batch.seqs)) is not None
                and all(n == 1 and seq.num_computed_tokens + 1 == seq.num_tokens
                        for seq, n in zip(batch.seqs, batch.num_new_tokens)))

    def _execute_decode_graph(self, batch: ScheduledBatch, block_manager: BlockManager) -> tuple[torch.Tensor, list[Sequence]]:
        seqs = batch.seqs
        positions = [seq.num_computed_tokens for seq in seqs]
        slots = [block_manager.slots(seq, pos, pos + 1)[0] for seq, pos in zip(seqs, positions)]
        try:
            logits = self.decode_graphs.run([seq.token_ids[-1] for seq in seqs], positions, slots,
                                            [seq.block_table for seq in seqs], [pos + 1 for pos in positions])
        except RuntimeError as error:
            # A kernel that cannot be captured (e.g. a backend falling back to the torch reference for an
            # unsupported head size): run this and every later step eagerly instead.
            warnings.warn(f"CUDA graphs disabled, decode runs eagerly: {error}", stacklevel=2)
            self.decode_graphs = None
            torch.cuda.synchronize()
            return self.execute(batch, block_manager)
        return logits.float(), list(seqs)
