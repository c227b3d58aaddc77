"""Training-time Qwen2 and Qwen2-MoE in plain PyTorch, with Hugging Face parameter names.

Why not train the transformers classes directly? Three things a training run wants that inference
code does not have: dropout on the residual stream (the corpus is small, ~1.4 M tokens, so
regularisation matters), a mixture of experts computed *densely* (with 8 experts of 64 units it is
cheaper to run every expert on every token and zero the unrouted ones than to gather tokens per
expert; the result equals top-k routing exactly, and it compiles without graph breaks), and the
routing statistics for a load-balancing loss. In eval mode the forward is the same function as HF's,
which export.py checks on every export.

Module attribute names follow HF (``model.layers.3.self_attn.q_proj``), so ``state_dict()`` is the HF
checkpoint, except that the experts of a MoE layer are stacked here (``[n_experts, I, E]``) and split
into the hub's per-expert tensors by :func:`hf_state_dict`.

Shapes: B batch, L length, E hidden, H / H_kv query / key-value heads, D head dim, I MLP size,
V vocab, T = B * L tokens, X experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from common import ModelSpec
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 then cast back before the weight, exactly as HF's Qwen2RMSNorm does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(L: int, D: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: ``[L, D]`` for Qwen2's half-split rotary embedding (frequencies repeated twice)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
    freqs = torch.outer(torch.arange(L, device=device, dtype=torch.float32), inv_freq)  # [L, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: ``[B, H, L, D]``; rotates the pairs (i, i + D/2), Qwen2's layout."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, dropout: float):
        super().__init__()
        E, H, H_kv, D = spec.hidden_size, spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        self.H, self.H_kv, self.D = H, H_kv, D
        self.q_proj = nn.Linear(E, H * D, bias=True)
        self.k_proj = nn.Linear(E, H_kv * D, bias=True)
        self.v_proj = nn.Linear(E, H_kv * D, bias=True)
        self.o_proj = nn.Linear(H * D, E, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: ``[B, L, E]`` -> ``[B, L, E]``, causal."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.H, self.D).transpose(1, 2)  # [B, H, L, D]
        k = self.k_proj(x).view(B, L, self.H_kv, self.D).transpose(1, 2)  # [B, H_kv, L, D]
        v = self.v_proj(x).view(B, L, self.H_kv, self.D).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Grouped-query attention: query head h reads key/value head h // (H / H_kv), as HF's repeat_kv.
        k = k.repeat_interleave(self.H // self.H_kv, dim=1)
        v = v.repeat_interleave(self.H // self.H_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, self.H * self.D))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); x: ``[..., E]``."""

    def __init__(self, E: int, I: int):
        super().__init__()
        self.gate_proj = nn.Linear(E, I, bias=False)
        self.up_proj = nn.Linear(E, I, bias=False)
        self.down_proj = nn.Linear(I, E, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """HF's Qwen2MoeTopKRouter: one weight ``[X, E]`` saved as ``mlp.gate.weight``."""

    def __init__(self, E: int, X: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(X, E))


class SparseMoE(nn.Module):
    """Qwen2-MoE block: top-k of X routed SwiGLU experts plus a sigmoid-gated shared expert."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        E, X, I = spec.hidden_size, spec.num_experts, spec.moe_intermediate_size
        self.X, self.I, self.top_k, self.norm_topk_prob = X, I, spec.num_experts_per_tok, spec.norm_topk_prob
        self.gate = Router(E, X)
        # Stacked experts; exported as experts.{x}.{gate,up,down}_proj.weight.
        self.experts_gate = nn.Parameter(torch.empty(X, I, E))
        self.experts_up = nn.Parameter(torch.empty(X, I, E))
        self.experts_down = nn.Parameter(torch.empty(X, E, I))
        self.shared_expert = MLP(E, spec.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(E, 1, bias=False)
        self.last_aux_loss: torch.Tensor | None = None  # load-balancing loss of the last forward
        self.last_load: torch.Tensor | None = None  # [X] fraction of routed slots per expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, L, E]`` -> ``[B, L, E]``."""
        B, L, E = x.shape
        xt = x.reshape(B * L, E)  # [T, E]
        # Routing in fp32, as HF: softmax over all experts, keep the top k (optionally renormalised).
        probs = torch.softmax(F.linear(xt, self.gate.weight).float(), dim=-1)  # [T, X]
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # [T, k]
        if self.norm_topk_prob:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        weights = torch.zeros_like(probs).scatter(-1, top_i, top_p)  # [T, X], zero for unrouted experts

        # Dense experts: all X experts side by side form one [T, X*I] hidden layer; scaling each
        # expert's block by its routing weight before the down projection is the weighted sum of
        # expert outputs (the down projection is linear), and zero weights drop unrouted experts.
        h = F.silu(xt @ self.experts_gate.reshape(self.X * self.I, E).t()) * (
            xt @ self.experts_up.reshape(self.X * self.I, E).t())  # [T, X*I]
        h = (h.view(-1, self.X, self.I) * weights.to(h.dtype).unsqueeze(-1)).reshape(-1, self.X * self.I)
        w_down = self.experts_down.permute(0, 2, 1).reshape(self.X * self.I, E)  # [X*I, E]
        routed = h @ w_down  # [T, E]
        shared = torch.sigmoid(self.shared_expert_gate(xt)) * self.shared_expert(xt)

        # Switch-style balance loss: X * sum_x (fraction of slots routed to x) * (mean prob of x);
        # 1.0 when balanced. Computed always, used only when training.
        load = F.one_hot(top_i, self.X).float().mean(dim=(0, 1))  # [X]
        self.last_load = load.detach()
        self.last_aux_loss = self.X * (load * probs.mean(0)).sum()
        return (routed + shared).view(B, L, E)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, dropout: float):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, dropout)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = SparseMoE(spec) if spec.is_moe else MLP(spec.hidden_size, spec.intermediate_size)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


class Backbone(nn.Module):
    def __init__(self, spec: ModelSpec, dropout: float):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, dropout) for _ in range(spec.num_hidden_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class CausalLM(nn.Module):
    """``forward(ids [B, L]) -> logits [B, L, V]`` (fp32). Tied input and output embeddings."""

    def __init__(self, spec: ModelSpec, dropout: float = 0.0):
        super().__init__()
        assert spec.tie_word_embeddings and spec.hidden_size == spec.num_attention_heads * spec.head_dim
        self.spec = spec
        self.model = Backbone(spec, dropout)
        self.drop = nn.Dropout(dropout)
        cos, sin = rope_cos_sin(spec.max_position_embeddings, spec.head_dim, spec.rope_theta, "cpu")
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers)."""
        std, n = 0.02, self.spec.num_hidden_layers
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "experts_down")):
                nn.init.normal_(p, std=std / math.sqrt(2 * n))
            else:
                nn.init.normal_(p, std=std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        L = ids.shape[1]
        cos, sin = self.rope_cos[:L], self.rope_sin[:L]
        x = self.drop(self.model.embed_tokens(ids))
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        x = self.model.norm(x)
        return F.linear(x, self.model.embed_tokens.weight).float()  # tied head

    def aux_loss(self) -> torch.Tensor | float:
        """Mean load-balancing loss over the MoE layers of the last forward (0.0 for a dense model)."""
        losses = [m.last_aux_loss for m in self.modules() if isinstance(m, SparseMoE)]
        return torch.stack(losses).mean() if losses else 0.0

    def expert_load(self) -> list[list[float]]:
        """Per MoE layer, the fraction of routed slots each expert received in the last forward."""
        return [m.last_load.tolist() for m in self.modules() if isinstance(m, SparseMoE)]


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def hf_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under the hub's Qwen2 / Qwen2-MoE names (per-expert tensors, no lm_head)."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        for kind in ("gate", "up", "down"):
            suffix = f"mlp.experts_{kind}"
            if name.endswith(suffix):
                prefix = name[: -len(suffix)]
                for x in range(t.shape[0]):
                    out[f"{prefix}mlp.experts.{x}.{kind}_proj.weight"] = t[x]
                break
        else:
            out[name] = t
    return out


def load_hf_state_dict(model: CausalLM, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`hf_state_dict`: stack per-expert tensors, ignore a tied ``lm_head.weight``."""
    tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    state = {}
    for name, p in model.state_dict().items():
        for kind in ("gate", "up", "down"):
            suffix = f"mlp.experts_{kind}"
            if name.endswith(suffix):
                prefix = name[: -len(suffix)]
                keys = [f"{prefix}mlp.experts.{x}.{kind}_proj.weight" for x in range(p.shape[0])]
                state[name] = torch.stack([tensors.pop(k) for k in keys])
                break
        else:
            state[name] = tensors.pop(name)
    if tensors:
        raise KeyError(f"unexpected tensors: {sorted(tensors)[:5]}")
    model.load_state_dict(state)
