"""CUDA graphs for decode steps: launch a whole forward pass with one call.

A decode step of a small model is launch-bound: every layer issues a dozen small kernels, and the
CPU spends longer launching them (and running the Python around them) than the GPU spends running
them. A CUDA graph records the kernels of one forward pass once and replays them with a single
launch. Replays reuse the recorded memory addresses and shapes, so:

* inputs live in **static buffers** that each step overwrites (token ids, positions, slot mapping,
  block tables, sequence lengths), sized for the largest batch;
* one graph is captured per **batch size bucket** (1, 2, 4, 8, 16, 32, …); a batch of 5 runs in the
  graph for 8, with 3 padding rows whose slot is −1 (their K/V are not stored) and whose length is
  0 (their attention reads nothing); their logits are dropped;
* the attention kernels size their grid from a fixed ``max_seq_len`` (the block table's capacity),
  never from the batch's data, and nothing in the forward synchronises with the host.

Prefill steps (variable numbers of tokens) run eagerly; they are few and compute-heavy.
"""

from __future__ import annotations

import torch

from miniinfer.engine.attention_context import PagedAttentionMetadata, PagedKVContext


def batch_size_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to (and including) ``max_batch``."""
    sizes = [size for size in (1, 2, 4, 8) if size < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    """Captured decode forwards of ``model`` over the paged KV pool, one per batch-size bucket."""

    def __init__(self, model: torch.nn.Module, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                 max_batch: int, max_blocks_per_seq: int, backend: str, attention_fn=None, hooks=None):
        self.model = model
        self.k_caches, self.v_caches = k_caches, v_caches
        self.backend, self.attention_fn, self.hooks = backend, attention_fn, hooks
        self.buckets = batch_size_buckets(max_batch)
        self.block_size = k_caches[0].shape[1]
        self.max_blocks_per_seq = max_blocks_per_seq
        device = k_caches[0].device
        largest = self.buckets[-1]
        self.input_ids = torch.zeros(largest, dtype=torch.int64, device=device)
        self.positions = torch.zeros(largest, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((largest,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(largest, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(largest, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self.rows = torch.arange(largest, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None  # one memory pool shared by every graph

    def bucket_for(self, batch: int) -> int | None:
        return next((size for size in self.buckets if size >= batch), None)

    def _context(self, size: int) -> PagedKVContext:
        metadata = PagedAttentionMetadata(
            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size], cu_seqlens_q=self.cu_seqlens_q[:size + 1], decode_only=True,
            max_seq_len=self.max_blocks_per_seq * self.block_size, max_q_len=1)
        return PagedKVContext(self.k_caches, self.v_caches, metadata, self.backend,
                              attention_fn=self.attention_fn, hooks=self.hooks)

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], attention=self._context(size),
                          logits_indices=self.rows[:size])

    @torch.inference_mode()
    def capture(self, size: int) -> None:
        # Padding state: no K/V written (slot −1), nothing attended (length 0).
        self.slot_mapping[:size].fill_(-1)
        self.seq_lens[:size].zero_()
        # Warm up on a side stream (kernel builds, autotuning, allocator), then record.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(size)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(size)
        self.pool = graph.pool()
        self.graphs[size], self.logits[size] = graph, logits

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], slot_mapping: list[int], block_tables: list[list[int]],
            seq_lens: list[int]) -> torch.Tensor:
        """One decode step for ``B = len(input_ids)`` sequences → logits ``[B, V]``."""
        batch = len(input_ids)
        size = self.bucket_for(batch)
        if size not in self.graphs:
            self.capture(size)
        width = max(len(row) for row in block_tables)
        # Fill the static buffers with one host-to-device copy per buffer (padding rows included).
        pad = size - batch
        self.input_ids[:size].copy_(torch.tensor(input_ids + [0] * pad), non_blocking=True)
        self.positions[:size].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slot_mapping[:size].copy_(torch.tensor(slot_mapping + [-1] * pad), non_blocking=True)
        self.seq_lens[:size].copy_(torch.tensor(seq_lens + [0] * pad, dtype=torch.int32), non_blocking=True)
        tables = [table + [0] * (width - len(table)) for table in block_tables] + [[0] * width] * pad
        self.block_tables[:size, :width].copy_(torch.tensor(tables, dtype=torch.int32), non_blocking=True)
        self.graphs[size].replay()
        return self.logits[size][:batch]
