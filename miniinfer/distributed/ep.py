"""Expert parallelism (GShard, Switch Transformer): the experts of an MoE layer live on different ranks,
and tokens travel to their experts and back with two all-to-alls.

Each of N ranks holds X/N experts (rank r: experts ``[r·X/N, (r+1)·X/N)``) and its own tokens (the
attention and everything else is replicated: each rank runs its own sequences). In a sparse layer:

1. **route** (replicated router): each token picks its top-k experts with weights;
2. **dispatch**: each (token, choice) pair gets a slot in its expert's buffer of ``C`` slots
   (the *capacity*), in token order; pairs beyond ``C`` are **dropped** (they contribute nothing; the
   token keeps its residual and the shared expert). ``C = ceil(capacity_factor · T·k / X)`` per rank and
   expert; ``capacity_factor=None`` means no limit (C = T·k), nothing dropped. The send buffer
   ``[X, C, E]`` is ordered by expert, hence by owning rank, so one ``all_to_all`` delivers to rank r the
   ``[N, X/N, C, E]`` slots of its experts from every rank;
3. every local expert runs on its ``N·C`` slots (empty ones are zeros);
4. **combine**: a second ``all_to_all`` sends the outputs back, and each token sums its choices'
   outputs times their routing weights.

:func:`dispatch_plan` is the permutation (the chapter's exercise); :func:`moe_reference` computes the same
thing in one process, drops included, as the oracle. :func:`load_balance` gives per-expert loads and the
Switch Transformer auxiliary loss ``X · Σ_i f_i · P_i`` (f_i: share of routed slots that chose expert i,
P_i: mean router probability of expert i; 1.0 when perfectly balanced).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from miniinfer.distributed.comm import all_to_all
from miniinfer.models.qwen2_moe import Qwen2MoeSparseBlock, expert_forward, route

__all__ = ["capacity", "dispatch_plan", "DispatchPlan", "moe_reference", "ep_moe", "load_balance", "EPMoeBlock",
           "make_expert_parallel"]


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float | None) -> int:
    """Slots per expert (per rank): ``ceil(capacity_factor · T·k / X)``; None: T·k (nothing can be dropped)."""
    if capacity_factor is None:
        return max(1, num_tokens * top_k)
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


@dataclass
class DispatchPlan:
    """Where each (token, choice) pair goes. Pairs are flattened token-major: pair j = token j // k, choice j % k."""

    slot: torch.Tensor   # [T·k] int64: index into the [X·C] send buffer (expert·C + position), or -1 if dropped
    kept: torch.Tensor   # [T·k] bool
    counts: torch.Tensor  # [X] int64: pairs that chose each expert (before dropping)


def dispatch_plan(experts: torch.Tensor, num_experts: int, cap: int) -> DispatchPlan:
    """experts [T, k] -> :class:`DispatchPlan`. Within an expert, pairs take slots in token order (then choice
    order): the first ``cap`` are kept, the rest dropped."""
    flat = experts.reshape(-1)
    one_hot = torch.nn.functional.one_hot(flat, num_experts)          # [T·k, X]
    position = (one_hot.cumsum(0) - 1).gather(1, flat[:, None])[:, 0]  # rank of each pair within its expert
    kept = position < cap
    slot = torch.where(kept, flat * cap + position, torch.full_like(flat, -1))
    return DispatchPlan(slot, kept, one_hot.sum(0))


def moe_reference(x: torch.Tensor, block: Qwen2MoeSparseBlock, capacity_factor: float | None = None,
                  capacity_tokens: int | None = None) -> torch.Tensor:
    """The routed experts' output in one process, with the same drops as :func:`ep_moe`. x: [T, E] -> [T, E].
    ``capacity_tokens``: the T that sizes the capacity (EP uses the largest T over the ranks; default T)."""
    weights, experts = route(block.gate(x), block.top_k, block.norm_topk_prob)
    X = block.experts.num_experts
    plan = dispatch_plan(experts, X, capacity(capacity_tokens or x.shape[0], block.top_k, X, capacity_factor))
    out = torch.zeros_like(x)
    tokens = torch.arange(x.shape[0]).repeat_interleave(block.top_k)
    w = weights.reshape(-1)
    flat = experts.reshape(-1)
    for e in range(X):
        pairs = torch.nonzero((flat == e) & plan.kept)[:, 0]
        if len(pairs):
            y = expert_forward(x[tokens[pairs]], block.experts.gate_up_proj[e], block.experts.down_proj[e])
            out.index_add_(0, tokens[pairs], y * w[pairs, None].to(y.dtype))
    return out


def ep_moe(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, norm_topk_prob: bool,
           local_gate_up: torch.Tensor, local_down: torch.Tensor, num_experts: int,
           capacity_factor: float | None = None, group=None, stats: dict | None = None,
           dispatch=None) -> torch.Tensor:
    """This rank's tokens x [T, E] through experts spread over the group -> [T, E] (routed part only).

    ``local_gate_up`` [X/N, 2·I, E] and ``local_down`` [X/N, E, I] are this rank's experts. Every rank must
    use the same capacity: C comes from the largest T over the ranks (one small all-reduce). ``stats``, when
    given, receives per-expert counts, drops, probabilities and the all-to-all bytes. ``dispatch``: your own
    ``(experts [T, k], num_experts, capacity) -> slot [T·k]`` (chapter 12's exercise) instead of
    :func:`dispatch_plan`'s.
    """
    N = dist.get_world_size(group) if dist.is_initialized() else 1
    T, E = x.shape
    X_local = local_gate_up.shape[0]
    router_logits = torch.nn.functional.linear(x, router_weight)
    weights, experts = route(router_logits, top_k, norm_topk_prob)
    T_max = torch.tensor([T])
    if N > 1:
        dist.all_reduce(T_max, op=dist.ReduceOp.MAX, group=group)
    cap = capacity(int(T_max), top_k, num_experts, capacity_factor)
    plan = dispatch_plan(experts, num_experts, cap)
    if dispatch is not None:
        slot = torch.as_tensor(dispatch(experts, num_experts, cap)).reshape(-1).long()
        plan = DispatchPlan(slot, slot >= 0, plan.counts)
    tokens = torch.arange(T).repeat_interleave(top_k)
    send = x.new_zeros(num_experts * cap, E)
    kept = plan.kept
    send[plan.slot[kept]] = x[tokens[kept]]
    # [N, X/N·C, E]: block r holds the slots of rank r's experts.
    received = all_to_all(send.view(N, X_local * cap, E), group)                 # from each rank, for my experts
    received = received.view(N, X_local, cap, E).transpose(0, 1).reshape(X_local, N * cap, E)
    outputs = torch.stack([expert_forward(received[e], local_gate_up[e], local_down[e]) for e in range(X_local)])
    outputs = outputs.view(X_local, N, cap, E).transpose(0, 1).reshape(N, X_local * cap, E)
    returned = all_to_all(outputs, group).view(num_experts * cap, E)            # my tokens' outputs
    out = torch.zeros_like(x)
    w = weights.reshape(-1)[kept].to(x.dtype)
    out.index_add_(0, tokens[kept], returned[plan.slot[kept]] * w[:, None])
    if stats is not None:
        stats["counts"] = stats.get("counts", 0) + plan.counts
        stats["dropped"] = stats.get("dropped", 0) + int((~kept).sum())
        stats["pairs"] = stats.get("pairs", 0) + int(kept.numel())
        stats["prob_sum"] = stats.get("prob_sum", 0) + torch.softmax(router_logits.float(), -1).sum(0)
        stats["tokens"] = stats.get("tokens", 0) + T
        stats["all_to_all_bytes"] = stats.get("all_to_all_bytes", 0) + 2 * send.numel() * send.element_size()
        stats["capacity"] = cap
    return out


def load_balance(counts: torch.Tensor, prob_sum: torch.Tensor, num_tokens: int, group=None) -> dict:
    """Per-expert load over all ranks (counts [X] of routed pairs, prob_sum [X] of router probabilities over
    ``num_tokens`` tokens) -> shares, max/mean imbalance and the Switch auxiliary loss X·Σ f_i·P_i."""
    counts, prob_sum = counts.double().clone(), prob_sum.double().clone()
    total = torch.tensor([float(num_tokens)], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        for t in (counts, prob_sum, total):
            dist.all_reduce(t, group=group)
    X = counts.numel()
    f = counts / counts.sum()
    P = prob_sum / total
    return {"share": f.tolist(), "imbalance": float(f.max() / f.mean()), "aux_loss": float(X * (f * P).sum())}


class EPMoeBlock(nn.Module):
    """A :class:`Qwen2MoeSparseBlock` whose routed experts run expert-parallel (router and shared expert
    replicated, X/N experts here). Same forward contract: x [*, E] -> [*, E]."""

    def __init__(self, block: Qwen2MoeSparseBlock, rank: int, world: int, capacity_factor: float | None = None,
                 group=None, dispatch=None):
        super().__init__()
        X = block.experts.num_experts
        if X % world:
            raise ValueError(f"expert parallel: num_experts ({X}) is not divisible by the number of ranks ({world})")
        per = X // world
        self.gate, self.top_k, self.norm_topk_prob = block.gate, block.top_k, block.norm_topk_prob
        self.num_experts, self.capacity_factor, self.group = X, capacity_factor, group
        self.gate_up_proj = nn.Parameter(block.experts.gate_up_proj[rank * per:(rank + 1) * per].detach().clone(),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(block.experts.down_proj[rank * per:(rank + 1) * per].detach().clone(),
                                      requires_grad=False)
        self.shared_expert, self.shared_expert_gate = block.shared_expert, block.shared_expert_gate
        self.stats: dict = {}
        self.dispatch = dispatch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        out = ep_moe(x, self.gate.weight, self.top_k, self.norm_topk_prob, self.gate_up_proj, self.down_proj,
                     self.num_experts, self.capacity_factor, self.group, self.stats, self.dispatch)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)


def make_expert_parallel(model, rank: int, world: int, capacity_factor: float | None = None, group=None,
                         dispatch=None):
    """Replace every sparse block of a loaded Qwen2-MoE by its :class:`EPMoeBlock` (in place) -> model.

    Each rank then runs *its own* sequences through the whole model; the sparse layers exchange tokens.
    Every rank must call the model the same number of times (the all-to-alls pair them up)."""
    for layer in model.model.layers:
        if isinstance(layer.mlp, Qwen2MoeSparseBlock):
            layer.mlp = EPMoeBlock(layer.mlp, rank, world, capacity_factor, group, dispatch)
    return model



class ExpertShardedBlock(nn.Module):
    """Expert parallel for *replicated* tokens (what ``LLM(moe_path, tensor_parallel_size=N)`` runs): every
    rank sees every token of the step (attention replicated), runs only its X/N experts on the pairs routed
    to them, and one all-reduce sums the experts' contributions. No capacity, nothing dropped; the
    all-reduce replaces the two all-to-alls of :class:`EPMoeBlock`, which need each rank to own its tokens."""

    def __init__(self, block: Qwen2MoeSparseBlock, rank: int, world: int, group=None):
        super().__init__()
        X = block.experts.num_experts
        if X % world:
            raise ValueError(f"expert parallel: num_experts ({X}) is not divisible by the number of ranks ({world})")
        per = X // world
        self.first, self.group = rank * per, group
        self.gate, self.top_k, self.norm_topk_prob = block.gate, block.top_k, block.norm_topk_prob
        self.gate_up_proj = nn.Parameter(block.experts.gate_up_proj[rank * per:(rank + 1) * per].detach().clone(),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(block.experts.down_proj[rank * per:(rank + 1) * per].detach().clone(),
                                      requires_grad=False)
        self.shared_expert, self.shared_expert_gate = block.shared_expert, block.shared_expert_gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from miniinfer.distributed.comm import all_reduce

        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = route(self.gate(x), self.top_k, self.norm_topk_prob)
        out = torch.zeros_like(x)
        for local in range(self.gate_up_proj.shape[0]):
            tokens, choice = torch.nonzero(experts == self.first + local, as_tuple=True)
            if len(tokens):
                y = expert_forward(x[tokens], self.gate_up_proj[local], self.down_proj[local])
                out.index_add_(0, tokens, y * weights[tokens, choice, None].to(y.dtype))
        out = all_reduce(out, self.group)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)


def shard_experts(model, rank: int, world: int, group=None):
    """Replace every sparse block by its :class:`ExpertShardedBlock` (in place) -> model."""
    for layer in model.model.layers:
        if isinstance(layer.mlp, Qwen2MoeSparseBlock):
            layer.mlp = ExpertShardedBlock(layer.mlp, rank, world, group)
    return model
