"""What each rank runs for ``benchmarks/parallelism.py`` and chapter 12's measurements (module-level, so
that spawned workers import them by name)."""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from miniinfer.distributed import comm

__all__ = ["tp_step_cost", "ep_routing_cost", "tp_decode_random", "qwen25_7b_config"]


@torch.no_grad()
def tp_step_cost(model, batch: int, length: int, repeats: int = 5) -> dict:
    """Time and collectives of one TP forward of [batch, length] tokens (median of ``repeats``)."""
    from miniinfer.distributed.tp import shard_qwen2

    world = dist.get_world_size()
    part = shard_qwen2(model, dist.get_rank(), world) if world > 1 else model
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    part(ids)  # warm-up
    times = []
    for _ in range(repeats):
        comm.reset_stats()
        dist.barrier()
        start = time.perf_counter()
        part(ids)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "comm": comm.snapshot()}


@torch.no_grad()
def ep_routing_cost(model, ids_per_rank: list[list[int]], capacity_factor: float | None) -> dict:
    """The whole MoE model expert-parallel over the ranks, each rank its own text: per-layer drops, all-to-all
    bytes and load balance (over all ranks), and the forward's time."""
    from miniinfer.distributed.ep import EPMoeBlock, load_balance, make_expert_parallel

    rank, world = dist.get_rank(), dist.get_world_size()
    make_expert_parallel(model, rank, world, capacity_factor)
    ids = torch.tensor([ids_per_rank[rank]])
    dist.barrier()
    start = time.perf_counter()
    model(ids)
    seconds = time.perf_counter() - start
    layers = []
    for layer in model.model.layers:
        if isinstance(layer.mlp, EPMoeBlock):
            s = layer.mlp.stats
            balance = load_balance(s["counts"], s["prob_sum"], s["tokens"])
            dropped = torch.tensor([float(s["dropped"]), float(s["pairs"])])
            dist.all_reduce(dropped)
            layers.append({"dropped_share": float(dropped[0] / dropped[1]), "all_to_all_bytes": s["all_to_all_bytes"],
                           "capacity": s["capacity"], **balance})
    return {"seconds": seconds, "layers": layers}


def qwen25_7b_config(max_position_embeddings: int = 4096):
    from miniinfer.models.config import Qwen2Config

    return Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, head_dim=128, rope_theta=1e6,
                       max_position_embeddings=max_position_embeddings, tie_word_embeddings=False)


@torch.no_grad()
def tp_decode_random(config_kwargs: dict | None, prompt_len: int = 128, new_tokens: int = 64,
                     dtype: str = "bfloat16") -> dict:
    """GPU: batch-1 greedy decode tok/s of a TP shard of a random model (default the Qwen2.5-7B shape),
    built directly on this rank's GPU (random weights, no checkpoint): each rank makes its own slices."""
    import dataclasses

    from miniinfer.distributed.tp import (
        ColumnParallelLinear,
        RowParallelLinear,
        TPQwen2ForCausalLM,
        VocabParallelEmbedding,
        head_split,
    )
    from miniinfer.kv_cache import KVCache

    rank, world = dist.get_rank(), dist.get_world_size()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    torch_dtype = getattr(torch, dtype)
    config = qwen25_7b_config() if config_kwargs is None else qwen25_7b_config().__class__(**config_kwargs)
    H, H_kv = config.num_attention_heads, config.num_key_value_heads
    q0, q1, k0, k1 = head_split(H, H_kv, rank, world)
    I_local = config.intermediate_size // world
    rows = -(-config.vocab_size // world)
    local = dataclasses.replace(config, num_attention_heads=q1 - q0, num_key_value_heads=k1 - k0,
                                intermediate_size=I_local)
    torch.manual_seed(rank)
    with torch.device(device):
        shard = TPQwen2ForCausalLM(local).to(torch_dtype)
        shard.full_config, shard.tp_group = config, None
        for layer in shard.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv_proj = ColumnParallelLinear(attn.qkv_proj.weight.data.normal_(0, 0.02), attn.qkv_proj.bias.data)
            attn.o_proj = RowParallelLinear(attn.o_proj.weight.data.normal_(0, 0.02))
            mlp.gate_up_proj = ColumnParallelLinear(mlp.gate_up_proj.weight.data.normal_(0, 0.02))
            mlp.down_proj = RowParallelLinear(mlp.down_proj.weight.data.normal_(0, 0.02))
        shard.model.embed_tokens = VocabParallelEmbedding(
            torch.randn(rows, config.hidden_size, dtype=torch_dtype) * 0.02, rank * rows)
        shard.lm_head = torch.nn.Module()
        shard.lm_head.weight = torch.nn.Parameter(torch.randn(rows, config.hidden_size, dtype=torch_dtype) * 0.02,
                                                  requires_grad=False)
    shard.model.rotary_emb.to(device)
    shard.eval()
    cache = KVCache.for_model(shard, batch_size=1, max_len=prompt_len + new_tokens + 8)
    ids = torch.randint(0, config.vocab_size, (1, prompt_len), device=device)
    positions = torch.arange(prompt_len, device=device)[None]
    logits = shard(ids, positions, attention=cache)
    token = logits[:, -1].argmax(-1, keepdim=True)
    sync()
    dist.barrier()
    start = time.perf_counter()
    for step in range(new_tokens):
        position = torch.tensor([[prompt_len + step]], device=device)
        token = shard(token, position, attention=cache)[:, -1].argmax(-1, keepdim=True)
    sync()
    seconds = time.perf_counter() - start
    weight_bytes = sum(p.numel() * p.element_size() for p in shard.parameters())
    return {"tok_s": new_tokens / seconds, "ms_per_token": 1000 * seconds / new_tokens,
            "weight_gb_per_rank": weight_bytes / 1e9,
            "memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if on_gpu else None}
