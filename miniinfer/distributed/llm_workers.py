"""``LLM(path, tensor_parallel_size=N)`` / ``pipeline_parallel_size=M``: the engine on rank 0, workers following.

The calling process becomes rank 0: it runs the whole engine (scheduler, block manager, sampler) exactly
as with one process, over a :class:`DriverModel`. The other ranks are processes spawned here
(``torch.multiprocessing``, start method "spawn"), each holding its shard of the model and its own paged KV
cache with the same block layout. Every forward of the engine becomes:

1. rank 0 broadcasts the step (token ids, positions, the paged-attention metadata, the logits rows) on a
   *command* group: a gloo group with a long timeout, because workers wait there while the engine idles;
2. every rank runs its part of the forward with the same metadata (the block tables are rank 0's: all
   ranks store a token's K/V in the same slot of their own pool);
3. tensor parallel: the layers' all-reduces and the logits' all-gather leave the full logits on every
   rank; pipeline parallel: stage s receives the hidden states from s−1, sends them to s+1, and the last
   stage sends the logits rows to rank 0.

A mixture-of-experts model (Qwen2-MoE) with ``tensor_parallel_size=N`` runs **expert parallel** instead:
attention and the shared expert replicated, the routed experts split N ways, one all-reduce per sparse
layer (:class:`~miniinfer.distributed.ep.ExpertShardedBlock`).

Copy-on-write block copies (``n > 1``) are broadcast the same way. Compute collectives use the default
group's timeout, so a rank that dies makes the others raise instead of hang. Not supported together:
tensor *and* pipeline parallel in one LLM, speculative decoding, CUDA graphs (a broadcast of Python
objects cannot be captured: the engine runs eagerly).
"""

from __future__ import annotations

import atexit
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from miniinfer.distributed.group import free_port, init_distributed

__all__ = ["start_parallel_model", "DriverModel"]

COMMAND_TIMEOUT = datetime.timedelta(days=7)


def _load(path, tp: int, pp: int, rank: int, dtype, device, components, max_model_len):
    from miniinfer.loader import load_model

    model, tokenizer = load_model(path, dtype=dtype, device=device, components=components,
                                  max_model_len=max_model_len)
    from miniinfer.models.qwen2_moe import Qwen2MoeForCausalLM

    if tp > 1 and isinstance(model, Qwen2MoeForCausalLM):  # a mixture of experts: expert parallel
        from miniinfer.distributed.ep import shard_experts

        return shard_experts(model, rank, tp), tokenizer, model.config
    if tp > 1:
        from miniinfer.distributed.tp import shard_qwen2

        return shard_qwen2(model, rank, tp), tokenizer, model.config
    from miniinfer.distributed.pp import PipelineStage

    return PipelineStage(model, rank, pp), tokenizer, model.config


def _device_for(rank: int, device) -> torch.device:
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                          else "cpu")
    return torch.device("cuda", rank) if device.type == "cuda" else device


class _Follower:
    """A worker's side of the steps: its shard, its KV pool, the backend rank 0 uses."""

    def __init__(self, part, full_config, tp: int, pp: int, rank: int, device):
        self.part, self.full_config, self.tp, self.pp, self.rank = part, full_config, tp, pp, rank
        self.device = device
        self.k_caches = self.v_caches = None
        self.backend = None

    def _allocate(self, num_blocks: int, block_size: int, backend_name: str, max_model_len: int) -> None:
        from miniinfer.engine.attention_backends import select_attention_backend

        config = self.part.config if self.tp > 1 else self.full_config
        dtype = next(self.part.parameters()).dtype
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        layers = range(config.num_hidden_layers) if self.tp > 1 else self.part.layer_range
        self.k_caches = [torch.zeros(shape, dtype=dtype, device=self.device) if i in layers else None
                         for i in range(config.num_hidden_layers)]
        self.v_caches = [torch.zeros(shape, dtype=dtype, device=self.device) if i in layers else None
                         for i in range(config.num_hidden_layers)]
        components = getattr(self.part, "components", None)
        self.backend = select_attention_backend(backend_name, self.device, dtype, config, block_size,
                                                attention_fn=getattr(components, "attention", None),
                                                max_model_len=max_model_len)

    @torch.inference_mode()
    def step(self, message: dict) -> None:
        from miniinfer.engine.attention_context import PagedAttentionMetadata, PagedKVContext

        if self.k_caches is None:
            self._allocate(*message["pool"])
        to = self.device
        meta = message["meta"]
        metadata = PagedAttentionMetadata(
            slot_mapping=meta["slot_mapping"].to(to), block_tables=meta["block_tables"].to(to),
            seq_lens=meta["seq_lens"].to(to), cu_seqlens_q=meta["cu_seqlens_q"].to(to),
            decode_only=meta["decode_only"], max_seq_len=meta["max_seq_len"], max_q_len=meta["max_q_len"],
            has_padding=meta["has_padding"])
        context = PagedKVContext(self.k_caches, self.v_caches, metadata, self.backend)
        input_ids, positions = message["input_ids"].to(to), message["positions"].to(to)
        indices = message["logits_indices"]
        indices = None if indices is None else indices.to(to)
        if self.tp > 1:
            self.part(input_ids, positions, attention=context, logits_indices=indices)  # joins the collectives
            return
        _stage_forward(self.part, input_ids, positions, context, indices, self.full_config, self.rank, self.pp)

    @torch.inference_mode()
    def copy_blocks(self, copies) -> None:
        if self.k_caches is None or not copies:
            return
        source = torch.tensor([s for s, _ in copies], device=self.device)
        destination = torch.tensor([d for _, d in copies], device=self.device)
        for cache in (*self.k_caches, *self.v_caches):
            if cache is not None:
                cache[destination] = cache[source]


def _stage_forward(stage, input_ids, positions, context, logits_indices, config, rank: int, pp: int):
    """One pipeline stage of a packed step: [T] ids (stage 0) or hidden [T, E] from rank−1 -> the next rank;
    the last stage sends logits [N, V] to rank 0 (which returns them)."""
    T, E = input_ids.shape[0], config.hidden_size
    dtype = next(stage.parameters()).dtype
    cos, sin = stage.rotary.cos_sin(positions)
    if stage.first:
        x = torch.nn.functional.embedding(input_ids, stage.embed.weight)
    else:
        x = torch.empty(T, E, dtype=dtype, device=input_ids.device)
        dist.recv(x, src=rank - 1)
    for layer in stage.layers:
        x = layer(x, cos, sin, context)
    if not stage.last:
        dist.send(x.contiguous(), dst=rank + 1)
    else:
        if logits_indices is not None:
            x = x.index_select(0, logits_indices)
        logits = torch.nn.functional.linear(stage.norm(x), stage.head_weight)
        if rank != 0:
            dist.send(logits.contiguous(), dst=0)
        return logits
    if rank == 0:
        N = T if logits_indices is None else logits_indices.shape[0]
        logits = torch.empty(N, config.vocab_size, dtype=dtype, device=input_ids.device)
        dist.recv(logits, src=pp - 1)
        return logits
    return None


def _worker_main(rank: int, world: int, port: int, path, tp: int, pp: int, dtype, device, max_model_len,
                 timeout_s: float) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    init_distributed(rank, world, backend=None if _device_for(rank, device).type == "cuda" else "gloo",
                     timeout_s=timeout_s, master_port=port)
    commands = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
    device = _device_for(rank, device)
    part, _, full_config = _load(path, tp, pp, rank, dtype, device, None, max_model_len)
    follower = _Follower(part, full_config, tp, pp, rank, device)
    dist.barrier(group=commands)  # loaded
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=commands)
        message = box[0]
        if message["op"] == "stop":
            break
        if message["op"] == "copy":
            follower.copy_blocks(message["copies"])
        else:
            follower.step(message)


class DriverModel(nn.Module):
    """Rank 0's model for the engine: broadcasts each forward to the workers, then runs its own part.

    ``config`` is what the engine sizes rank 0's KV pool by (the local head counts under tensor parallel)."""

    def __init__(self, part, full_config, tp: int, pp: int, processes, commands):
        super().__init__()
        self.part, self.full_config, self.tp, self.pp = part, full_config, tp, pp
        self.config = part.config if tp > 1 else full_config
        self.components = part.components
        self._processes, self._commands = processes, commands
        self.fused_kernels = False

    def enable_fused_kernels(self, enabled: bool = True, backend: str = "auto") -> DriverModel:
        return self

    def _send(self, message: dict) -> None:
        dist.broadcast_object_list([message], src=0, group=self._commands)

    def copy_blocks(self, copies) -> None:
        """Mirror the engine's copy-on-write block copies on every worker's pool."""
        if copies:
            self._send({"op": "copy", "copies": list(copies)})

    def forward(self, input_ids, positions=None, attention=None, logits_indices=None):
        if attention is None or positions is None:
            raise ValueError("a parallel LLM's model runs inside the engine (packed ids, positions and the paged "
                             "attention context)")
        meta = attention.metadata
        k_cache = attention.k_caches[0]
        cpu = torch.device("cpu")
        self._send({
            "op": "forward",
            "pool": (k_cache.shape[0], k_cache.shape[1], attention.backend.name,
                     int(self.full_config.max_position_embeddings)),
            "input_ids": input_ids.to(cpu), "positions": positions.to(cpu),
            "logits_indices": None if logits_indices is None else logits_indices.to(cpu),
            "meta": {"slot_mapping": meta.slot_mapping.to(cpu), "block_tables": meta.block_tables.to(cpu),
                     "seq_lens": meta.seq_lens.to(cpu), "cu_seqlens_q": meta.cu_seqlens_q.to(cpu),
                     "decode_only": meta.decode_only, "max_seq_len": meta.max_seq_len, "max_q_len": meta.max_q_len,
                     "has_padding": meta.has_padding}})
        if self.tp > 1:
            return self.part(input_ids, positions, attention=attention, logits_indices=logits_indices)
        return _stage_forward(self.part, input_ids, positions, attention, logits_indices, self.full_config, 0, self.pp)

    def shutdown(self) -> None:
        """Stop the workers (idempotent); the LLM calls it at exit."""
        if self._processes is None:
            return
        try:
            self._send({"op": "stop"})
        except Exception:  # noqa: BLE001 - workers already gone
            pass
        for p in self._processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self._processes = None
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def start_parallel_model(path, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, *, dtype=None,
                         device=None, components=None, max_model_len=None, timeout_s: float = 120.0):
    """Spawn the workers, join the group as rank 0, load rank 0's part -> ``(DriverModel, tokenizer)``."""
    import torch.multiprocessing as mp

    tp, pp = int(tensor_parallel_size), int(pipeline_parallel_size)
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor_parallel_size and pipeline_parallel_size must be >= 1, got {tp} and {pp}")
    if tp > 1 and pp > 1:
        raise ValueError("tensor and pipeline parallel together are not supported by LLM yet; use one of them")
    if dist.is_initialized():
        raise RuntimeError("a process group already exists in this process; one parallel LLM per process")
    if components is not None:
        raise ValueError("custom components are not supported with tensor/pipeline parallel (the workers load "
                         "the default model)")
    world = tp * pp
    resolved = _device_for(0, device)
    if resolved.type == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"{world} ranks need {world} GPUs; this machine has {torch.cuda.device_count()}")
    from miniinfer.loader import resolve_model_path

    folder = resolve_model_path(path)  # a hub id is downloaded once, here, not by every worker
    port = free_port()
    ctx = mp.get_context("spawn")
    processes = [ctx.Process(target=_worker_main, daemon=True,
                             args=(r, world, port, str(folder), tp, pp, dtype, device, max_model_len, timeout_s))
                 for r in range(1, world)]
    for p in processes:
        p.start()
    try:
        init_distributed(0, world, backend=None if resolved.type == "cuda" else "gloo", timeout_s=timeout_s,
                         master_port=port)
        commands = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
        part, tokenizer, full_config = _load(folder, tp, pp, 0, dtype, resolved, None, max_model_len)
        dist.barrier(group=commands)
    except BaseException:
        for p in processes:
            p.kill()
        raise
    driver = DriverModel(part, full_config, tp, pp, processes, commands)
    atexit.register(driver.shutdown)
    return driver, tokenizer
