"""Attention backends: how a step's attention runs over the paged KV pool, chosen once at start-up.

Each backend is an object with three operations, called by every layer through
:class:`~miniinfer.engine.attention_context.PagedKVContext`:

* ``write_kv(k, v, k_cache, v_cache, metadata)`` — store the step's new keys and values at
  ``metadata.slot_mapping``;
* ``decode(q, k_cache, v_cache, metadata, scale)`` — one query per sequence (a decode-only step);
* ``prefill(q, k_cache, v_cache, metadata, scale)`` — packed new tokens over a cached prefix
  (prefill chunks, mixed with decodes).

and one property, ``graph_safe``: whether its decode can be recorded in a CUDA graph (no host
synchronisation, no data-dependent shapes). The engine resolves a name to an object in
:func:`select_attention_backend` once, so a step never compares strings or probes the machine:

| name | decode | prefill | graphs |
|---|---|---|---|
| ``torch`` | reference, one sequence at a time | reference | no |
| ``sdpa`` | gather through the block tables + torch SDPA (the CPU's fastest) | reference | no |
| ``triton`` | our split-KV Triton kernel | our paged flash-attention Triton kernel | yes |
| ``cuda`` | our CUDA kernel (``csrc/paged_attention.cu``) | Triton | yes |
| ``components`` | the model's own attention function, per sequence (the course's plug-in) | same | no |

``auto`` means ``sdpa`` on a CPU and, on a GPU, ``triton`` unless ``cuda`` measures clearly faster on
this machine, for this model's shapes, on every one of three decode workloads
(:func:`measure_decode_backends`, :func:`choose_decode_backend`).

The GPU backends' prefill runs one of several **prefill kernels** (``prefill_kernel=``), all reading the
cached prefix through the block tables, so a chunk of a long prompt attends to the earlier chunks in place:

| name | kernel |
|---|---|
| ``paged_triton`` | chapter 07's Triton kernel: one program per (query tile, sequence, query head) |
| ``flash_triton`` | chapter 09's Triton flash kernel: a program serves a KV head's whole query group (GQA-packed) |
| ``flash_cuda`` | chapter 09's CUDA kernel (``csrc/flash_attention.cu``: mma.sync, ldmatrix, cp.async) |
| ``flash_attn`` | the flash-attn library (FA4 on Hopper/Blackwell, else FA2), paged through ``page_table`` |

``auto`` checks each available kernel against the reference on a small paged batch (a kernel that is
wrong here is never chosen), then times the survivors on three prefill workloads shaped like this model
(one long prompt, a chunk over a long cached prefix, many short prompts) and keeps the one with the
smallest total time (:func:`measure_prefill_kernels`, :func:`choose_prefill_kernel`).
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable

import torch

from miniinfer.kernels import triton_available
from miniinfer.kernels.paged_attention import (
    cuda_supports,
    paged_decode_attention_cuda,
    paged_decode_attention_torch,
    paged_decode_attention_triton,
    paged_prefill_attention_torch,
    paged_prefill_attention_triton,
    write_kv_torch,
    write_kv_triton,
)

ATTENTION_BACKENDS = ("auto", "torch", "sdpa", "triton", "cuda", "components")
PREFILL_KERNELS = ("auto", "paged_triton", "flash_triton", "flash_cuda", "flash_attn")


# --------------------------------------------------------------------------------------------------
# Prefill kernels: (q [T, H, D], k_cache, v_cache, metadata, scale) -> [T, H, D], causal over the paged
# prefix + the new tokens (already written). Imports are lazy: a kernel's module loads when chosen.
# --------------------------------------------------------------------------------------------------

def _prefill_paged_triton(q, k_cache, v_cache, metadata, scale: float) -> torch.Tensor:
    return paged_prefill_attention_triton(q, k_cache, v_cache, metadata.block_tables, metadata.cu_seqlens_q,
                                          metadata.seq_lens, scale, max_q_len=metadata.max_q_len,
                                          max_seq_len=metadata.max_seq_len)


def _prefill_flash_triton(q, k_cache, v_cache, metadata, scale: float) -> torch.Tensor:
    from miniinfer.kernels.flash_attention import flash_attention_triton

    return flash_attention_triton(q, k_cache, v_cache, metadata.cu_seqlens_q, None, metadata.block_tables,
                                  metadata.seq_lens, True, scale, max_seqlen_q=metadata.max_q_len,
                                  max_seqlen_k=metadata.max_seq_len)


def _prefill_flash_cuda(q, k_cache, v_cache, metadata, scale: float) -> torch.Tensor:
    from miniinfer.kernels.flash_attention_cuda import flash_attention_cuda

    return flash_attention_cuda(q, k_cache, v_cache, metadata.cu_seqlens_q, None, metadata.block_tables,
                                metadata.seq_lens, True, scale, max_seqlen_q=metadata.max_q_len,
                                max_seqlen_k=metadata.max_seq_len)


def _prefill_flash_attn(q, k_cache, v_cache, metadata, scale: float) -> torch.Tensor:
    from miniinfer.kernels.flash_attention import flash_attention_flash_attn

    return flash_attention_flash_attn(q, k_cache, v_cache, metadata.cu_seqlens_q, None, metadata.block_tables,
                                      metadata.seq_lens, True, scale, max_seqlen_q=metadata.max_q_len,
                                      max_seqlen_k=metadata.max_seq_len)


PREFILL_KERNEL_FUNCTIONS: dict[str, Callable] = {
    "paged_triton": _prefill_paged_triton,
    "flash_triton": _prefill_flash_triton,
    "flash_cuda": _prefill_flash_cuda,
    "flash_attn": _prefill_flash_attn,
}


class AttentionBackend:
    """The reference backend (``torch``): readable loops over sequences, float32 math, any device."""

    name = "torch"
    graph_safe = False  # reads lengths on the host (.tolist())

    def write_kv(self, k, v, k_cache, v_cache, metadata) -> None:
        if metadata.has_padding:
            write_kv_torch(k, v, k_cache, v_cache, metadata.slot_mapping)
            return
        # No padding rows: two index copies, with the int64 slots converted once for all layers.
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, metadata.slots_long, k.to(k_cache.dtype))
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, metadata.slots_long, v.to(v_cache.dtype))

    def decode(self, q, k_cache, v_cache, metadata, scale: float) -> torch.Tensor:
        return paged_decode_attention_torch(q, k_cache, v_cache, metadata.block_tables, metadata.seq_lens, scale)

    def prefill(self, q, k_cache, v_cache, metadata, scale: float) -> torch.Tensor:
        return paged_prefill_attention_torch(q, k_cache, v_cache, metadata.block_tables, metadata.cu_seqlens_q,
                                             metadata.seq_lens, scale)

    def __repr__(self) -> str:
        return f"<attention backend {self.name!r}>"


class SdpaBackend(AttentionBackend):
    """Decode: gather every sequence's keys through its block table (one index for all layers), then
    torch's fused attention. Prefill: the reference, but for the one-token sequences of a mixed step."""

    name = "sdpa"

    def decode(self, q, k_cache, v_cache, metadata, scale: float) -> torch.Tensor:
        slots, mask = metadata.decode_gather_index(k_cache.shape[1])
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        keys = k_cache.view(-1, num_kv_heads, head_dim)[slots].transpose(1, 2)    # [B, H_kv, S, D]
        values = v_cache.view(-1, num_kv_heads, head_dim)[slots].transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None, :], keys, values, attn_mask=None if mask is None else mask[:, None, None, :],
            scale=scale, enable_gqa=True)                                             # [B, H, 1, D]
        return out[:, :, 0, :]

    def prefill(self, q, k_cache, v_cache, metadata, scale: float) -> torch.Tensor:
        """A step with prompts. In continuous batching most of its sequences are decodes (one new token)
        beside a few new prompts: those go through :meth:`decode` (one batched attention), and only
        the prompts through the reference's loop over sequences, which otherwise ran over all of them
        (on a CPU, a mixed step of 128 sequences then cost several decode steps)."""
        split = metadata.split_single_token_rows()
        if split is None:
            return super().prefill(q, k_cache, v_cache, metadata, scale)
        out = torch.empty_like(q)
        out[split.decode_rows] = self.decode(q[split.decode_rows], k_cache, v_cache, split.decodes, scale)
        out[split.prompt_rows] = super().prefill(q[split.prompt_rows], k_cache, v_cache, split.prompts, scale)
        return out


class TritonBackend(AttentionBackend):
    """Our Triton kernels for KV writes and decode; prefill with ``prefill_kernel`` (a name of
    :data:`PREFILL_KERNELS`, resolved at start-up). Nothing synchronises with the host."""

    name = "triton"
    graph_safe = True

    def __init__(self, prefill_kernel: str = "paged_triton"):
        if prefill_kernel not in PREFILL_KERNEL_FUNCTIONS:
            raise ValueError(f"prefill_kernel must be one of {tuple(PREFILL_KERNEL_FUNCTIONS)}, got {prefill_kernel!r}")
        self.prefill_kernel = prefill_kernel
        self._prefill = PREFILL_KERNEL_FUNCTIONS[prefill_kernel]

    def write_kv(self, k, v, k_cache, v_cache, metadata) -> None:
        write_kv_triton(k, v, k_cache, v_cache, metadata.slot_mapping)

    def decode(self, q, k_cache, v_cache, metadata, scale: float) -> torch.Tensor:
        return paged_decode_attention_triton(q, k_cache, v_cache, metadata.block_tables, metadata.seq_lens, scale,
                                             max_seq_len=metadata.max_seq_len)

    def prefill(self, q, k_cache, v_cache, metadata, scale: float) -> torch.Tensor:
        return self._prefill(q, k_cache, v_cache, metadata, scale)

    def __repr__(self) -> str:
        return f"<attention backend {self.name!r}, prefill kernel {self.prefill_kernel!r}>"


class CudaBackend(TritonBackend):
    """Decode with our CUDA kernel (``csrc/paged_attention.cu``); KV writes with Triton, prefill with
    ``prefill_kernel``."""

    name = "cuda"

    def decode(self, q, k_cache, v_cache, metadata, scale: float) -> torch.Tensor:
        return paged_decode_attention_cuda(q, k_cache, v_cache, metadata.block_tables, metadata.seq_lens, scale,
                                           max_seq_len=metadata.max_seq_len)


class ComponentsBackend(AttentionBackend):
    """The model's own attention function (``Components.attention``, e.g. the one written in chapter 03),
    called once per sequence on keys gathered through its block table: slow, but it puts that function
    inside the real engine. ``attention_fn(q [1, L, H, D], k [1, S, H_kv, D], v, causal=True, scale=…)``."""

    name = "components"

    def __init__(self, attention_fn: Callable):
        self.attention_fn = attention_fn

    def decode(self, q, k_cache, v_cache, metadata, scale: float) -> torch.Tensor:
        return self.prefill(q, k_cache, v_cache, metadata, scale)

    def prefill(self, q, k_cache, v_cache, metadata, scale: float) -> torch.Tensor:
        block_size = k_cache.shape[1]
        out = torch.empty_like(q)
        starts, lengths = metadata.cu_seqlens_q.tolist(), metadata.seq_lens.tolist()
        for b, seq_len in enumerate(lengths):
            num_blocks = -(-seq_len // block_size)
            blocks = metadata.block_tables[b, :num_blocks].long()
            keys = k_cache[blocks].flatten(0, 1)[:seq_len]           # [S, H_kv, D]
            values = v_cache[blocks].flatten(0, 1)[:seq_len]
            rows = slice(starts[b], starts[b + 1])
            # q [1, L, H, D] against k/v [1, S, H_kv, D]: causal, aligned so the last query sees every key.
            out[rows] = self.attention_fn(q[rows][None], keys[None], values[None], causal=True, scale=scale)[0]
        return out


def _decode_time(fn: Callable, q, k_cache, v_cache, block_tables, seq_lens, scale: float, repeats: int = 20) -> float:
    """Median-free quick timing on the GPU: mean seconds per call after a warm-up call."""
    fn(q, k_cache, v_cache, block_tables, seq_lens, scale)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn(q, k_cache, v_cache, block_tables, seq_lens, scale)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def decode_workloads(device: str, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
                     block_size: int, long_context: int, capacity: int) -> list[tuple]:
    """The three timing workloads of :func:`measure_decode_backends`: (q, k_cache, v_cache, block_tables,
    seq_lens, max_seq_len) each. The block tables are as wide as the engine's (``capacity`` keys, or the
    context if longer): the CUDA kernel sizes its grid by ``max_seq_len`` and refuses a ``max_seq_len``
    past the tables' width. Entries past a sequence's blocks point at block 0, as padding does."""
    generator = torch.Generator(device=device).manual_seed(0)
    workloads = []
    for batch, context in ((1, 2048), (1, long_context), (64, 1024)):
        blocks_per_seq = -(-context // block_size)
        width = -(-max(capacity, context) // block_size)
        num_blocks = batch * blocks_per_seq
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        k_cache = torch.randn(shape, device=device, dtype=dtype, generator=generator)
        v_cache = torch.randn(shape, device=device, dtype=dtype, generator=generator)
        q = torch.randn(batch, num_heads, head_dim, device=device, dtype=dtype, generator=generator)
        tables = torch.zeros(batch, width, dtype=torch.int32, device=device)
        tables[:, :blocks_per_seq] = torch.randperm(num_blocks, device=device, generator=generator).view(
            batch, blocks_per_seq).int()
        lengths = torch.full((batch,), context, dtype=torch.int32, device=device)
        workloads.append((q, k_cache, v_cache, tables, lengths, width * block_size))
    return workloads


@functools.cache
def measure_decode_backends(device: str, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
                            block_size: int, long_context: int = 32768,
                            capacity: int = 32768) -> dict[str, list[float]]:
    """Seconds per decode call of each GPU backend on this GPU, for the model's shapes.

    Three workloads that bracket what a server sees — batch 1 at 2,048 tokens of context (latency),
    batch 1 at ``long_context`` tokens (a long document) and batch 64 at 1,024 (throughput) — each
    with the grid the engine's CUDA graphs use: sized for ``capacity`` keys (the block tables' full
    width), not for the batch's actual lengths. Returns, per backend, its time on each workload
    divided by the best backend's (1.0 = fastest). Backends that cannot run these inputs (the CUDA
    kernel takes head dims 64 and 128 only) are left out.
    """
    workloads = decode_workloads(device, dtype, num_heads, num_kv_heads, head_dim, block_size, long_context, capacity)
    candidates = {"triton": paged_decode_attention_triton}
    if cuda_supports(workloads[0][0], workloads[0][1]) is None:
        candidates["cuda"] = paged_decode_attention_cuda
    per_workload: dict[str, list[float]] = {}
    for name, fn in candidates.items():
        try:
            per_workload[name] = [_decode_time(functools.partial(fn, max_seq_len=workload[-1]), *workload[:-1],
                                               head_dim ** -0.5) for workload in workloads]
        except Exception:  # noqa: BLE001 - e.g. the CUDA extension does not build here: not a candidate
            continue
    if not per_workload:
        return {}
    best = [min(times[i] for times in per_workload.values()) for i in range(len(workloads))]
    return {name: [t / b for t, b in zip(values, best)] for name, values in per_workload.items()}


def choose_decode_backend(relative: dict[str, list[float]], margin: float = 0.9) -> str:
    """``triton`` unless ``cuda`` is clearly faster on *every* workload (at most ``margin`` × Triton's time).

    Why not simply the smaller sum: on an H200 the end-to-end engine runs (``benchmarks/results/
    engine_throughput_h200*.json``) found the two equal at batch 1 on short contexts, CUDA 8 % ahead
    at batch 256, and Triton 3.6× ahead at batch-1 decode over 32k tokens. A backend should win by
    being better everywhere, not by a few percent on the common case while failing a long document.
    """
    triton, cuda = relative.get("triton"), relative.get("cuda")
    if cuda is not None and (triton is None or all(c <= margin * t for c, t in zip(cuda, triton))):
        return "cuda"
    return "triton"


# --------------------------------------------------------------------------------------------------
# Choosing the prefill kernel: correct first, then fastest
# --------------------------------------------------------------------------------------------------

class _PrefillInputs:
    """A paged prefill batch (the metadata fields the prefill kernels read) with random K/V in the pool."""

    def __init__(self, q_lens: list[int], prefix_lens: list[int], num_heads: int, num_kv_heads: int,
                 head_dim: int, block_size: int, device: str, dtype: torch.dtype, generator: torch.Generator):
        seq_lens = [p + n for p, n in zip(prefix_lens, q_lens)]
        blocks_per_seq = [-(-s // block_size) for s in seq_lens]
        width = max(blocks_per_seq)
        num_blocks = sum(blocks_per_seq) + 1
        pool_shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = torch.randn(pool_shape, device=device, dtype=dtype, generator=generator)
        self.v_cache = torch.randn(pool_shape, device=device, dtype=dtype, generator=generator)
        # Permuted blocks: a kernel that assumes contiguous pages fails the correctness check.
        order = torch.randperm(num_blocks, device=device, generator=generator)
        tables = torch.zeros(len(q_lens), width, dtype=torch.int32, device=device)
        used = 0
        for b, count in enumerate(blocks_per_seq):
            tables[b, :count] = order[used:used + count].int()
            used += count
        self.block_tables = tables
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        starts = [0]
        for n in q_lens:
            starts.append(starts[-1] + n)
        self.cu_seqlens_q = torch.tensor(starts, dtype=torch.int32, device=device)
        self.q = torch.randn(starts[-1], num_heads, head_dim, device=device, dtype=dtype, generator=generator)
        self.max_q_len = max(q_lens)
        self.max_seq_len = width * block_size
        self.scale = head_dim ** -0.5


def available_prefill_kernels(device: torch.device, dtype: torch.dtype, head_dim: int) -> dict[str, str]:
    """Every prefill kernel name with why it cannot run here ("" when it can)."""
    reasons = {name: "" for name in PREFILL_KERNEL_FUNCTIONS}
    if not triton_available():
        reasons["paged_triton"] = reasons["flash_triton"] = "triton is not installed"
    if device.type != "cuda":
        reasons["flash_cuda"] = "needs a CUDA GPU"
        reasons["flash_attn"] = "needs a CUDA GPU"
        return reasons
    try:
        from miniinfer.kernels.flash_attention_cuda import cuda_flash_supports

        probe = torch.empty(1, 1, head_dim, device=device, dtype=dtype)
        reasons["flash_cuda"] = cuda_flash_supports(probe, probe) or ""
    except Exception as error:  # noqa: BLE001 - the module or its build is missing: not a candidate
        reasons["flash_cuda"] = f"unavailable ({error})"
    from miniinfer.kernels.flash_attention import FLASH_ATTN_INSTALL, flash_attn_library

    if dtype not in (torch.float16, torch.bfloat16):
        reasons["flash_attn"] = f"takes float16/bfloat16, the model is {dtype}"
    elif flash_attn_library() is None:
        reasons["flash_attn"] = f"not installed ({FLASH_ATTN_INSTALL})"
    return reasons


def _prefill_error(name: str, inputs: _PrefillInputs) -> float:
    """Largest error of a prefill kernel against the float32 reference on ``inputs``."""
    from miniinfer.kernels.paged_attention import paged_prefill_attention_torch

    got = PREFILL_KERNEL_FUNCTIONS[name](inputs.q, inputs.k_cache, inputs.v_cache, inputs, inputs.scale)
    want = paged_prefill_attention_torch(inputs.q.float(), inputs.k_cache.float(), inputs.v_cache.float(),
                                         inputs.block_tables, inputs.cu_seqlens_q, inputs.seq_lens, inputs.scale)
    return float((got.float() - want).abs().max())


@functools.cache
def measure_prefill_kernels(device: str, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
                            block_size: int, max_model_len: int = 32768,
                            candidates: tuple[str, ...] | None = None) -> dict[str, list[float] | str]:
    """Check, then time, the prefill kernels that can run here, for the model's shapes.

    Returns, per kernel, its seconds per call on each workload, or a string saying why it was left out
    (cannot run here, raised, or differs from the reference). On a CPU nothing is timed: the kernels
    that pass the check get ``[0.0]``. The
    workloads: one prompt of ``min(8192, max_model_len)`` tokens; a 2,048-token chunk over a cached
    prefix (``min(16384, max_model_len)`` keys in all); 16 prompts of 512 tokens.
    """
    torch_device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(0)
    reasons = available_prefill_kernels(torch_device, dtype, head_dim)
    names = [n for n in (candidates or tuple(PREFILL_KERNEL_FUNCTIONS)) if not reasons[n]]
    results: dict[str, list[float] | str] = {n: reasons[n] for n in (candidates or PREFILL_KERNEL_FUNCTIONS)
                                             if reasons[n]}
    shapes = (num_heads, num_kv_heads, head_dim, block_size, device, dtype, generator)
    check = _PrefillInputs([77, 1, 130], [0, 45, 300], *shapes)
    tolerance = 2e-3 if dtype == torch.float32 else 3e-2
    survivors = []
    for name in names:
        try:
            error = _prefill_error(name, check)
        except Exception as failure:  # noqa: BLE001 - a kernel that raises is not a candidate
            results[name] = f"raised {type(failure).__name__}: {failure}"
            continue
        if not error <= tolerance:
            results[name] = f"differs from the reference by {error:.3g} (tolerance {tolerance:g})"
            warnings.warn(f"prefill kernel {name!r} {results[name]}: not used", stacklevel=2)
            continue
        survivors.append(name)
    if not survivors or torch_device.type != "cuda":
        return {**results, **{n: [0.0] for n in survivors}}
    long_prompt = min(8192, max_model_len)
    total = min(16384, max_model_len)
    chunk = min(2048, total // 2)
    workloads = [_PrefillInputs([long_prompt], [0], *shapes),
                 _PrefillInputs([chunk], [total - chunk], *shapes),
                 _PrefillInputs([512] * 16, [0] * 16, *shapes)]
    times: dict[str, list[float]] = {}
    for name in survivors:
        fn = PREFILL_KERNEL_FUNCTIONS[name]
        per_workload = []
        for inputs in workloads:
            call = functools.partial(fn, inputs.q, inputs.k_cache, inputs.v_cache, inputs, inputs.scale)
            per_workload.append(_gpu_seconds_per_call(call))
        times[name] = per_workload
    return {**results, **times}


def _gpu_seconds_per_call(call: Callable[[], object], repeats: int = 5) -> float:
    """GPU time of one call, without its host overhead.

    A prefill step calls attention once per layer between that layer's matmuls, and the host runs
    ahead of the GPU, so a kernel's Python-side cost (a library's argument handling: a few hundred µs
    for flash-attn's CuTe DSL entry point) hides behind the GPU work of a long prefill. Timing calls
    back to back with a host clock would charge that cost in full. So the GPU is first kept busy with
    a spin kernel (``torch.cuda._sleep``) while the host queues the calls; the CUDA events then time
    the kernels alone.
    """
    call()  # compile / JIT outside the timing
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(50_000_000)  # ~25 ms of GPU clock cycles: longer than queuing the calls takes
    start.record()
    for _ in range(repeats):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def choose_prefill_kernel(measured: dict[str, list[float] | str]) -> str:
    """The kernel with the smallest total time over the workloads (ties: the earlier in
    :data:`PREFILL_KERNELS`); ``paged_triton`` when nothing was measured.

    A total, not a mean of ratios: the long prefills are where prefill time goes (a 30k-token prompt's
    time to first token). The times are GPU times (:func:`_gpu_seconds_per_call`). Measured on an H200
    (0.5B shape): FA4 through flash-attn gave a 1.5x shorter 30k-token TTFT than our kernels, yet lost
    both a geometric mean of ratios and a host-clock total, which charged its per-call host overhead.
    """
    timed = {n: v for n, v in measured.items() if not isinstance(v, str)}
    if not timed:
        return "paged_triton"
    order = list(PREFILL_KERNELS)
    return min(timed, key=lambda n: (sum(timed[n]), order.index(n)))


def _resolve_prefill_kernel(name: str, device: torch.device, dtype: torch.dtype, model_config, block_size: int,
                            max_model_len: int) -> str:
    """A prefill kernel name of :data:`PREFILL_KERNELS` → one that runs here (``auto``: measured)."""
    if name not in PREFILL_KERNELS:
        raise ValueError(f"prefill_kernel must be one of {PREFILL_KERNELS}, got {name!r}")
    if name == "auto":
        if device.type != "cuda":
            return "paged_triton"  # the Triton interpreter on a CPU: nothing to measure
        relative = measure_prefill_kernels(str(device), dtype, model_config.num_attention_heads,
                                           model_config.num_key_value_heads, model_config.head_dim, block_size,
                                           max_model_len=max_model_len)
        return choose_prefill_kernel(relative)
    reason = available_prefill_kernels(device, dtype, model_config.head_dim)[name]
    if reason:
        raise ValueError(f"prefill_kernel={name!r} cannot run here: {reason}")
    return name


def select_attention_backend(name: str, device: torch.device, dtype: torch.dtype, model_config, block_size: int,
                             attention_fn: Callable | None = None, max_model_len: int = 32768,
                             prefill_kernel: str = "auto") -> AttentionBackend:
    """Resolve a backend name (see the module docstring) to an object, once, at engine start-up.

    ``prefill_kernel`` applies to the ``triton`` and ``cuda`` backends (see :data:`PREFILL_KERNELS`).
    Raises ValueError naming the problem when the backend cannot run here (e.g. ``cuda`` on a CPU).
    """
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if prefill_kernel not in PREFILL_KERNELS:
        raise ValueError(f"prefill_kernel must be one of {PREFILL_KERNELS}, got {prefill_kernel!r}")
    on_gpu = device.type == "cuda"
    if name == "auto":
        if not on_gpu or not triton_available():
            if prefill_kernel != "auto":
                raise ValueError(f"prefill_kernel={prefill_kernel!r} needs attention_backend 'triton' or 'cuda' "
                                 "(on a CPU, 'auto' is 'sdpa', which prefills with its own code)")
            return SdpaBackend() if not on_gpu else AttentionBackend()
        capacity = -(-int(max_model_len) // block_size) * block_size
        relative = measure_decode_backends(str(device), dtype, model_config.num_attention_heads,
                                           model_config.num_key_value_heads, model_config.head_dim, block_size,
                                           long_context=max(2048, min(32768, capacity)), capacity=capacity)
        name = choose_decode_backend(relative)
    if name in ("torch", "sdpa", "components") and prefill_kernel != "auto":
        raise ValueError(f"prefill_kernel={prefill_kernel!r} needs attention_backend 'triton' or 'cuda' "
                         f"(the {name!r} backend prefills with its own code)")
    if name == "torch":
        return AttentionBackend()
    if name == "sdpa":
        return SdpaBackend()
    if name == "components":
        if attention_fn is None:
            raise ValueError("attention_backend='components' needs the model's attention function")
        return ComponentsBackend(attention_fn)
    if not triton_available():
        raise ValueError(f"attention_backend={name!r} needs the triton package (pip install triton)")
    prefill = _resolve_prefill_kernel(prefill_kernel, device, dtype, model_config, block_size, max_model_len)
    if name == "triton":
        return TritonBackend(prefill)
    # cuda
    if not on_gpu:
        raise ValueError("attention_backend='cuda' needs a CUDA GPU: the model is on the CPU "
                         "(use 'auto', 'sdpa', 'torch' or 'triton')")
    probe_q = torch.empty(1, model_config.num_attention_heads, model_config.head_dim, device=device, dtype=dtype)
    probe_cache = torch.empty(1, block_size, model_config.num_key_value_heads, model_config.head_dim,
                              device=device, dtype=dtype)
    problem = cuda_supports(probe_q, probe_cache)
    if problem:
        raise ValueError(f"attention_backend='cuda': {problem}; use 'triton' or 'auto'")
    from miniinfer.kernels.paged_attention import _cuda_extension

    try:
        _cuda_extension()
    except Exception as error:  # noqa: BLE001 - say why at start-up, not at the first step
        raise ValueError(f"attention_backend='cuda': the CUDA kernel cannot be built here: {error}") from error
    return CudaBackend(prefill)
