"""Tensor parallelism (Megatron-LM style): each rank holds a slice of every weight matrix.

A linear layer ``y = x W^T`` (W: [out, in]) splits two ways over N ranks:

* **column-parallel**: rank r holds rows ``W[r·out/N : (r+1)·out/N]`` and computes its slice of ``y``
  from the full ``x``, no communication (:class:`ColumnParallelLinear`);
* **row-parallel**: rank r holds columns ``W[:, r·in/N : (r+1)·in/N]``, reads its slice of ``x`` and
  produces a *partial sum* of the full ``y``; one all-reduce adds the N partial sums
  (:class:`RowParallelLinear`).

A transformer block pairs them so that each sub-block communicates once: attention's q/k/v projections
are column-parallel (whole heads per rank: attention itself is independent per head), ``o_proj`` is
row-parallel; the MLP's gate/up are column-parallel (SwiGLU is elementwise, so the slices never mix),
``down_proj`` is row-parallel. Two all-reduces of ``[T, E]`` per layer in all.

**GQA.** Query heads split evenly; a rank needs the K/V heads its query heads read. With H_kv ≥ N each
rank holds H_kv/N of them; with H_kv < N, N/H_kv ranks share a KV head and each keeps a *replica* of it
(:func:`head_split`), so the KV cache does not shrink below one head per rank.

**Vocabulary.** The embedding table splits by rows (rank r owns token ids ``[r·V/N, (r+1)·V/N)``, others
look up zeros, an all-reduce sums); the LM head splits the same way (each rank computes logits for
its ids; an all-gather assembles ``[*, V]``). V is padded to a multiple of N with zero rows.

:func:`shard_qwen2` turns a loaded :class:`~miniinfer.models.qwen2.Qwen2ForCausalLM` into this rank's
:class:`TPQwen2ForCausalLM`: the same modules and forward contract (engine, KV caches and attention
backends run it unchanged, with the local head counts), plus the collectives.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from miniinfer.distributed.comm import all_gather_last, all_reduce
from miniinfer.models.qwen2 import Qwen2ForCausalLM

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "head_split", "shard_qwen2",
           "TPQwen2ForCausalLM", "split_rows", "split_columns", "tp_bytes_per_token"]


def _range(n: int, rank: int, world: int, what: str) -> tuple[int, int]:
    if n % world:
        raise ValueError(f"tensor parallel: {what} ({n}) is not divisible by tensor_parallel_size ({world})")
    size = n // world
    return rank * size, (rank + 1) * size


def split_rows(weight: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Column-parallel shard: rows (output features) of W [out, in] -> [out/N, in]."""
    start, end = _range(weight.shape[0], rank, world, "output features")
    return weight[start:end]


def split_columns(weight: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Row-parallel shard: columns (input features) of W [out, in] -> [out, in/N]."""
    start, end = _range(weight.shape[1], rank, world, "input features")
    return weight[:, start:end]


class ColumnParallelLinear(nn.Module):
    """x [..., in] -> this rank's slice of y [..., out/N] (or all of y with ``gather_output``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, gather_output: bool = False,
                 group=None):
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=weight.requires_grad)
        self.bias = None if bias is None else nn.Parameter(bias.contiguous(), requires_grad=bias.requires_grad)
        self.gather_output, self.group = gather_output, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return all_gather_last(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """x slice [..., in/N] -> y [..., out], summed over ranks by one all-reduce. The bias (if any) is
    added once, after the sum (every rank adding it would count it N times)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group=None):
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=weight.requires_grad)
        self.bias = None if bias is None else nn.Parameter(bias.contiguous(), requires_grad=bias.requires_grad)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, start + V/N)`` of the (padded) table. ids [...] -> [..., E]: every rank looks up the ids it
    owns (zeros for the others), an all-reduce sums the N partial lookups."""

    def __init__(self, weight_shard: torch.Tensor, start: int, group=None):
        super().__init__()
        self.weight = nn.Parameter(weight_shard.contiguous(), requires_grad=weight_shard.requires_grad)
        self.start, self.group = start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids.long() - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * mine[..., None].to(self.weight.dtype)
        return all_reduce(x, self.group)


def head_split(num_heads: int, num_kv_heads: int, rank: int, world: int) -> tuple[int, int, int, int]:
    """-> (q_start, q_end, kv_start, kv_end): the query heads of ``rank`` and the K/V heads they read.

    Query head h reads KV head ``h // (H / H_kv)``. H must divide evenly; with H_kv ≥ N each rank gets
    H_kv/N KV heads, with H_kv < N each rank gets (a replica of) the one KV head of its queries.
    """
    q_start, q_end = _range(num_heads, rank, world, "num_attention_heads")
    group = num_heads // num_kv_heads
    if num_kv_heads >= world and num_kv_heads % world:
        raise ValueError(f"tensor parallel: num_key_value_heads ({num_kv_heads}) must be a multiple of "
                         f"tensor_parallel_size ({world}) when it is larger")
    if num_kv_heads < world and world % num_kv_heads:
        raise ValueError(f"tensor parallel: tensor_parallel_size ({world}) must be a multiple of "
                         f"num_key_value_heads ({num_kv_heads}) so that ranks share KV heads evenly")
    kv_start, kv_end = q_start // group, (q_end - 1) // group + 1
    return q_start, q_end, kv_start, kv_end


class TPQwen2ForCausalLM(Qwen2ForCausalLM):
    """One rank's shard of a Qwen2 (built by :func:`shard_qwen2`); ``config`` holds the *local* head counts and
    MLP size (what the KV cache and attention see), ``full_config`` the model's."""

    def init_weights(self, std: float = 0.02) -> None:
        pass  # shard_qwen2 fills every weight with a slice of the loaded model

    def enable_fused_kernels(self, enabled: bool = True, backend: str = "auto") -> TPQwen2ForCausalLM:
        self.fused_kernels = False  # the fused path calls the embedding and head functions directly
        return self

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, attention=None,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        rotary = self.model.rotary_emb
        if positions is None:
            if attention is not None:
                raise ValueError("positions are required with an attention context")
            L = input_ids.shape[-1]
            cos, sin = rotary.cos[:L], rotary.sin[:L]
        else:
            cos, sin = rotary.cos_sin(positions)
        x = self.model.embed_tokens(input_ids)  # vocab-parallel: one all-reduce
        for layer in self.model.layers:
            x = layer(x, cos, sin, attention)  # two all-reduces (o_proj, down_proj)
        if logits_indices is not None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, logits_indices)
        logits = all_gather_last(F.linear(self.model.norm(x), self.lm_head_weight), self.tp_group)
        return logits[..., : self.full_config.vocab_size]

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight


@torch.no_grad()
def shard_qwen2(model: Qwen2ForCausalLM, rank: int, world: int, group=None) -> TPQwen2ForCausalLM:
    """This rank's :class:`TPQwen2ForCausalLM` from a full model (every rank loads the checkpoint, keeps its
    slices: simple, and fine for the models we run; a large model would read only its slices)."""
    if type(model) is not Qwen2ForCausalLM:
        raise ValueError(f"tensor parallel runs dense Qwen2 models, not {type(model).__name__} (run a "
                         "mixture of experts expert-parallel: miniinfer.distributed.ep)")
    config = model.config
    H, H_kv, D, E = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
    q0, q1, k0, k1 = head_split(H, H_kv, rank, world)
    i0, i1 = _range(config.intermediate_size, rank, world, "intermediate_size")
    local = dataclasses.replace(config, num_attention_heads=q1 - q0, num_key_value_heads=k1 - k0,
                                intermediate_size=i1 - i0)
    device = next(model.parameters()).device
    # Built on the model's device, not on "meta": a module initialised under torch.device("meta") imports
    # torch._dynamo in a fresh worker (seconds), and every weight below is replaced by a slice anyway.
    with torch.device(device):
        shard = TPQwen2ForCausalLM(local, model.components)
    shard.full_config, shard.tp_group, shard.tp_rank, shard.tp_size = config, group, rank, world
    shard.model.rotary_emb = model.model.rotary_emb
    V = config.vocab_size
    V_pad = math.ceil(V / world) * world
    rows = V_pad // world

    def vocab_shard(weight):
        padded = torch.cat([weight, weight.new_zeros(V_pad - V, E)]) if V_pad > V else weight
        return padded[rank * rows:(rank + 1) * rows].clone()

    shard.model.embed_tokens = VocabParallelEmbedding(vocab_shard(model.model.embed_tokens.weight), rank * rows, group)
    if model.lm_head is not None:
        shard.lm_head = nn.Module()  # only its weight is read (lm_head_weight)
        shard.lm_head.weight = nn.Parameter(vocab_shard(model.lm_head.weight), requires_grad=False)
    shard.model.norm = model.model.norm
    for full, mine in zip(model.model.layers, shard.model.layers):
        mine.input_layernorm, mine.post_attention_layernorm = full.input_layernorm, full.post_attention_layernorm
        qkv = full.self_attn.qkv_proj
        q_rows = slice(q0 * D, q1 * D)
        k_rows = slice(H * D + k0 * D, H * D + k1 * D)
        v_rows = slice((H + H_kv) * D + k0 * D, (H + H_kv) * D + k1 * D)
        weight = torch.cat([qkv.weight[q_rows], qkv.weight[k_rows], qkv.weight[v_rows]])
        bias = None if qkv.bias is None else torch.cat([qkv.bias[q_rows], qkv.bias[k_rows], qkv.bias[v_rows]])
        mine.self_attn.qkv_proj = ColumnParallelLinear(weight, bias, group=group)
        mine.self_attn.o_proj = RowParallelLinear(full.self_attn.o_proj.weight[:, q0 * D:q1 * D], group=group)
        I = config.intermediate_size
        gate_up = full.mlp.gate_up_proj.weight
        mine.mlp.gate_up_proj = ColumnParallelLinear(torch.cat([gate_up[i0:i1], gate_up[I + i0:I + i1]]), group=group)
        mine.mlp.down_proj = RowParallelLinear(full.mlp.down_proj.weight[:, i0:i1], group=group)
    shard.requires_grad_(False).eval()
    return shard


def tp_bytes_per_token(hidden_size: int, num_layers: int, vocab_size: int, world: int, dtype_bytes: int = 2,
                       gather_logits: bool = True) -> dict[str, float]:
    """What one token costs a rank in a TP forward: all-reduce payload (2 per layer + the embedding's), the
    all-gather of the logits, and the ring's wire bytes (2·(N−1)/N of each all-reduce)."""
    if world == 1:
        return {"all_reduce_bytes": 0.0, "all_gather_bytes": 0.0, "wire_bytes": 0.0}
    all_reduce_bytes = (2 * num_layers + 1) * hidden_size * dtype_bytes
    all_gather_bytes = math.ceil(vocab_size / world) * dtype_bytes if gather_logits else 0
    wire = 2 * (world - 1) / world * all_reduce_bytes + (world - 1) * all_gather_bytes
    return {"all_reduce_bytes": float(all_reduce_bytes), "all_gather_bytes": float(all_gather_bytes),
            "wire_bytes": float(wire)}
