"""CUDA graphs for decode steps: launch a whole forward pass with one call.

A decode step of a small model is launch-bound: every layer issues a dozen small kernels, and the
CPU spends longer launching them (and running the Python around them) than the GPU spends running
them. A CUDA graph records the kernels of one forward pass once and replays them with a single
launch. Replays reuse the recorded memory addresses and shapes, so:

* the inputs are views of the model runner's one device input buffer, at the offsets of the
  bucket's :class:`~miniinfer.engine.model_runner.StepLayout`; a step writes its inputs there (one
  host→device copy) and replays;
* one graph is captured per **batch size bucket** (1, 2, 4, 8, 16, 32, …), all at engine start-up
  (a first step at a new size must not stall mid-stream); a batch of 5 runs in the graph for 8, with
  3 padding rows whose slot is −1 (their K/V are not stored) and whose length is 0 (their attention
  reads nothing); their logits are dropped;
* the attention kernels size their grid from a fixed ``max_seq_len`` (the block table's capacity),
  never from the batch's data, and nothing in the forward synchronises with the host.

A capture that fails is an error at start-up naming the backend — never a silent fallback to eager
steps. Prefill steps (variable numbers of tokens) run eagerly; they are few and compute-heavy.
"""

from __future__ import annotations

import contextlib
import gc

import torch
from tqdm.auto import tqdm


def batch_size_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to (and including) ``max_batch``."""
    sizes = [size for size in (1, 2, 4, 8) if size < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))



@contextlib.contextmanager
def _no_garbage_collection():
    """Pause Python's cyclic garbage collector while a CUDA graph records.

    A collection can start at any allocation, and it may free an *earlier* engine's CUDA graphs and their
    memory pool (engines hold reference cycles, so only the collector frees them). Destroying a graph or
    returning a pool's memory during a capture is an operation the capture forbids: CUDA invalidates the
    capture and the next launch fails with "operation failed due to a previous error during capture".
    Seen on an H200 in benchmarks/speculative.py, which builds dozens of engines in one process: the
    decode capture failed at batch 128 or 192, and passed under CUDA_LAUNCH_BLOCKING=1 (other timing).
    ``torch.cuda.graph`` collects once on entry; this keeps the collector off until the capture ends."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()

class GraphCaptureError(RuntimeError):
    """A decode graph could not be recorded (raised at start-up; ``enforce_eager=True`` avoids graphs)."""


class DecodeGraphs:
    """Captured decode forwards over the runner's paged KV pool, one per batch-size bucket."""

    def __init__(self, runner, max_batch: int):
        self.runner = runner
        self.buckets = batch_size_buckets(max_batch)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None  # one memory pool shared by every graph

    def bucket_for(self, batch: int) -> int | None:
        return next((size for size in self.buckets if size >= batch), None)

    def _padding_inputs(self, size: int):
        """Write the padding state of bucket ``size`` into the buffer; return its device views."""
        from miniinfer.engine.model_runner import StepLayout

        runner = self.runner
        layout = StepLayout(size, size, size, runner.max_blocks_per_seq)
        host, o = runner.buffers.host_np, layout.offsets
        host[:layout.size] = 0
        host[o[2]:o[3]] = -1                       # slots: store nothing
        host[o[4]:o[5]] = range(size + 1)          # cu_seqlens_q: one token per row
        host[o[5]:o[6]] = range(size)              # logits_indices: every row
        runner.buffers.upload(layout.size)
        return runner.buffers.views(layout, layout.width * runner.block_size, decode_only=True, max_q_len=1,
                                    has_padding=True)

    def _forward(self, inputs) -> torch.Tensor:
        runner = self.runner
        return runner.model(inputs.input_ids, inputs.positions, attention=runner.context(inputs.metadata),
                            logits_indices=inputs.logits_indices)

    @torch.inference_mode()
    def capture(self, size: int) -> None:
        """Record the decode step of ``size`` rows (see :func:`_no_garbage_collection` for why Python's
        garbage collector is paused while recording)."""
        inputs = self._padding_inputs(size)
        try:
            # Warm up on a side stream (kernel builds, autotuning, allocator), then record.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward(inputs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool), _no_garbage_collection():
                logits = self._forward(inputs)
        except Exception as error:
            raise GraphCaptureError(
                f"capturing the decode CUDA graph for batch {size} with the {self.runner.backend.name!r} attention "
                f"backend failed: {type(error).__name__}: {error}. Use another attention_backend, or "
                "enforce_eager=True to run without CUDA graphs") from error
        self.pool = graph.pool()
        self.graphs[size], self.logits[size] = graph, logits

    def capture_all(self, progress: bool = False) -> None:
        """Capture every bucket, largest first (the memory pool is sized by the first capture)."""
        for size in tqdm(sorted(self.buckets, reverse=True), desc="capturing CUDA graphs", unit="graph",
                         disable=not progress):
            if size not in self.graphs:
                self.capture(size)
        torch.cuda.synchronize()

    def replay(self, size: int) -> torch.Tensor:
        """Run the graph of bucket ``size`` on the inputs already in the buffer → logits ``[size, V]``."""
        self.graphs[size].replay()
        return self.logits[size]
