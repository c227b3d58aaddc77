"""Chapter 12 — Qwen2-MoE: Qwen2 with a mixture of experts in place of the dense MLP.

Everything but the MLP is Qwen2 (:mod:`miniinfer.models.qwen2`): the same attention, norms, RoPE
and forward contract, so the engine, the KV caches and the attention backends run it unchanged. The
MLP of a sparse layer (:class:`Qwen2MoeSparseBlock`) is

    router:  p = softmax(x @ W_gate.T)                 [T, X]   (X routed experts, in float32)
             w, e = top_k(p)                           [T, k]   (norm_topk_prob: w /= w.sum())
    experts: y = sum_j w_j * expert_{e_j}(x)           each expert a SwiGLU MLP of size I_moe
    shared:  y += sigmoid(x @ w_sg) * shared_expert(x) a dense SwiGLU MLP every token goes through

Weights in HF transformers' layout (``model.layers.N.mlp.gate.weight`` is the router [X, E];
``mlp.experts.gate_up_proj`` [X, 2·I_moe, E] and ``mlp.experts.down_proj`` [X, E, I_moe] are the
experts stacked, as transformers 5 stores them in memory); checkpoints with per-expert tensors
(``mlp.experts.3.gate_proj.weight``, the hub's layout, and the bundled ``shakespeare-moe``'s) are
stacked by :func:`load_qwen2_moe`.

The expert loop is the readable one (every expert gathers its tokens, runs, scatters back with its
routing weight). :mod:`miniinfer.distributed.ep` runs the same experts spread over processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from miniinfer.components import Components
from miniinfer.layers import SwiGLUMLP
from miniinfer.models.config import Qwen2Config, UnsupportedModelError
from miniinfer.models.qwen2 import Qwen2ForCausalLM

__all__ = ["Qwen2MoeConfig", "Qwen2MoeForCausalLM", "Qwen2MoeSparseBlock", "route", "load_qwen2_moe",
           "expert_forward"]


@dataclass
class Qwen2MoeConfig(Qwen2Config):
    """Qwen2's fields plus the mixture of experts' (HF ``Qwen2MoeConfig`` names)."""

    num_experts: int = 8                    # X routed experts per sparse layer
    num_experts_per_tok: int = 2            # k
    moe_intermediate_size: int = 64         # I_moe, each routed expert's MLP size
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    norm_topk_prob: bool = False            # renormalise the k chosen probabilities to sum to 1
    decoder_sparse_step: int = 1            # layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: list[int] = field(default_factory=list)  # ... and i is not listed here
    router_aux_loss_coef: float = 0.001

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"config: num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                             f"num_experts ({self.num_experts})")

    def is_sparse(self, layer_index: int) -> bool:
        return (self.num_experts > 0 and layer_index not in self.mlp_only_layers
                and (layer_index + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json", *, max_model_len: int | None = None
                     ) -> Qwen2MoeConfig:
        if not isinstance(hf, dict) or hf.get("model_type") != "qwen2_moe":
            raise UnsupportedModelError(f"{source}: not a Qwen2-MoE config (model_type "
                                        f"{hf.get('model_type') if isinstance(hf, dict) else None!r})")
        # The attention, norms and RoPE are Qwen2's: let Qwen2Config check those fields.
        base = Qwen2Config.from_hf_dict({**hf, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
                                        source, max_model_len=max_model_len)
        moe = {}
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            value = hf.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{source}: {name} must be a positive integer, got {value!r}")
            moe[name] = value
        shared = hf.get("shared_expert_intermediate_size") or 0
        if not isinstance(shared, int) or isinstance(shared, bool) or shared < 0:
            raise ValueError(f"{source}: shared_expert_intermediate_size must be an integer >= 0, got {shared!r}")
        moe["shared_expert_intermediate_size"] = shared
        moe["norm_topk_prob"] = bool(hf.get("norm_topk_prob", False))
        moe["decoder_sparse_step"] = int(hf.get("decoder_sparse_step") or 1)
        moe["mlp_only_layers"] = list(hf.get("mlp_only_layers") or [])
        moe["router_aux_loss_coef"] = float(hf.get("router_aux_loss_coef") or 0.0)
        fields_ = base.to_dict()
        fields_["attention_bias"] = bool(hf.get("qkv_bias", True))
        return cls(**fields_, **moe)

    @classmethod
    def from_folder(cls, folder: str | Path, *, max_model_len: int | None = None) -> Qwen2MoeConfig:
        import json

        path = Path(folder) / "config.json"
        return cls.from_hf_dict(json.loads(path.read_text(encoding="utf-8")), str(path),
                                max_model_len=max_model_len)


def route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool = False
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, X] -> (weights [T, k] float32, experts [T, k] int64).

    Softmax over all X experts first (in float32), then the k largest: the chosen weights do not sum
    to 1 unless ``norm_topk_prob`` (Qwen2-MoE's checkpoints say False; Mixtral renormalises).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def expert_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, swiglu=None) -> torch.Tensor:
    """One expert's SwiGLU MLP. x: [N, E], gate_up: [2·I, E], down: [E, I] -> [N, E]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    h = F.silu(gate) * up if swiglu is None else swiglu(gate, up)
    return F.linear(h, down)


class Qwen2MoeExperts(nn.Module):
    """X SwiGLU experts with stacked weights: ``gate_up_proj`` [X, 2·I, E], ``down_proj`` [X, E, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, swiglu=None):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.swiglu = swiglu

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [T, E], weights/experts [T, k] -> sum over the k choices of weight · expert(x): [T, E]."""
        out = torch.zeros_like(x)
        # Which (token, choice) pairs go to each expert: one sort instead of X boolean masks.
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token_of = order // experts.shape[1]
        start = 0
        for e, count in enumerate(counts):
            if count:
                rows = order[start:start + count]
                tokens = token_of[start:start + count]
                y = expert_forward(x[tokens], self.gate_up_proj[e], self.down_proj[e], self.swiglu)
                out.index_add_(0, tokens, y * weights.reshape(-1)[rows, None].to(y.dtype))
            start += count
        return out


class Qwen2MoeSparseBlock(nn.Module):
    """The MoE MLP of one layer. x: [*, E] -> [*, E]. See the module docstring for the formula.

    ``record_routing = True`` keeps the latest ``router_logits`` [T, X] and ``experts`` [T, k] (for
    load-balance statistics and the auxiliary loss, :mod:`miniinfer.distributed.ep`).
    """

    def __init__(self, config: Qwen2MoeConfig, components: Components):
        super().__init__()
        E = config.hidden_size
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(E, config.num_experts, bias=False)  # the router
        self.experts = Qwen2MoeExperts(config.num_experts, E, config.moe_intermediate_size, components.swiglu)
        self.shared_expert = None
        self.shared_expert_gate = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = SwiGLUMLP(E, config.shared_expert_intermediate_size, components.swiglu)
            self.shared_expert_gate = nn.Linear(E, 1, bias=False)
        self.record_routing = False
        self.router_logits: torch.Tensor | None = None
        self.last_experts: torch.Tensor | None = None

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """The routed experts' part only. x: [T, E] -> [T, E]."""
        router_logits = self.gate(x)
        weights, experts = route(router_logits, self.top_k, self.norm_topk_prob)
        if self.record_routing:
            self.router_logits, self.last_experts = router_logits, experts
        return self.experts(x, weights, experts)

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.shared_expert is None:
            return None
        return torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        out = self.routed(x)
        shared = self.shared(x)
        if shared is not None:
            out = out + shared
        return out.reshape(shape)


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    """Qwen2 whose sparse layers' ``mlp`` is a :class:`Qwen2MoeSparseBlock` (dense layers keep Qwen2's MLP)."""

    def __init__(self, config: Qwen2MoeConfig, components: Components | None = None):
        super().__init__(config, components)
        for index, layer in enumerate(self.model.layers):
            if config.is_sparse(index):
                layer.mlp = Qwen2MoeSparseBlock(config, self.components)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        super().init_weights(std)
        for module in self.modules():
            if isinstance(module, Qwen2MoeExperts):
                module.gate_up_proj.normal_(0.0, std)
                module.down_proj.normal_(0.0, std)

    def enable_fused_kernels(self, enabled: bool = True, backend: str = "auto") -> Qwen2MoeForCausalLM:
        """The fused path is written for a dense MLP: an MoE model keeps the readable path."""
        self.fused_kernels = False
        return self

    def moe_blocks(self) -> list[Qwen2MoeSparseBlock]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, Qwen2MoeSparseBlock)]


def hf_moe_tensor_shapes(config: Qwen2MoeConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Qwen2-MoE checkpoint in the per-expert (hub) layout, and its shape."""
    from miniinfer.loader import hf_tensor_shapes

    shapes = hf_tensor_shapes(config)
    E, X, I_moe, I_sh = (config.hidden_size, config.num_experts, config.moe_intermediate_size,
                         config.shared_expert_intermediate_size)
    for i in range(config.num_hidden_layers):
        if not config.is_sparse(i):
            continue
        p = f"model.layers.{i}.mlp."
        for name in ("gate_proj", "up_proj", "down_proj"):
            del shapes[p + name + ".weight"]
        shapes[p + "gate.weight"] = (X, E)
        for x in range(X):
            shapes |= {f"{p}experts.{x}.gate_proj.weight": (I_moe, E), f"{p}experts.{x}.up_proj.weight": (I_moe, E),
                       f"{p}experts.{x}.down_proj.weight": (E, I_moe)}
        if I_sh:
            shapes |= {p + "shared_expert.gate_proj.weight": (I_sh, E), p + "shared_expert.up_proj.weight": (I_sh, E),
                       p + "shared_expert.down_proj.weight": (E, I_sh), p + "shared_expert_gate.weight": (1, E)}
    return shapes


def _stack_experts(tensors: dict[str, torch.Tensor], config: Qwen2MoeConfig) -> None:
    """Accept transformers 5's stacked layout too: ``mlp.experts.gate_up_proj`` [X, 2I, E] -> per-expert names."""
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts."
        if p + "gate_up_proj" in tensors:
            gate_up, down = tensors.pop(p + "gate_up_proj"), tensors.pop(p + "down_proj")
            for x in range(gate_up.shape[0]):
                gate, up = gate_up[x].chunk(2, dim=0)
                tensors[f"{p}{x}.gate_proj.weight"], tensors[f"{p}{x}.up_proj.weight"] = gate, up
                tensors[f"{p}{x}.down_proj.weight"] = down[x]


def load_qwen2_moe(folder: Path, *, dtype=None, device=None, components: Components | None = None,
                   max_model_len: int | None = None):
    """Load a Qwen2-MoE folder -> ``(model, tokenizer)``, as :func:`miniinfer.loader.load_model` does a Qwen2."""
    from miniinfer.loader import (
        FUSED,
        IGNORED_SUFFIXES,
        _read_safetensors,
        _safetensors_files,
        resolve_device,
        resolve_dtype,
    )
    from miniinfer.tokenizer import Tokenizer

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    folder = Path(folder)
    config = Qwen2MoeConfig.from_folder(folder, max_model_len=max_model_len)
    tensors = _read_safetensors(_safetensors_files(folder))
    for name in list(tensors):
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_word_embeddings):
            del tensors[name]
        elif ".shared_expert" in name and config.shared_expert_intermediate_size == 0:
            del tensors[name]  # transformers saves an empty shared expert (size 0) and a gate that multiplies 0
    _stack_experts(tensors, config)
    expected = hf_moe_tensor_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{folder}: the checkpoint does not match its config.json: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{folder}: tensor {name} has shape {tuple(tensors[name].shape)}, but config.json "
                             f"implies {shape}")
    state = {}
    X = config.num_experts
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for fused, parts in FUSED.items():
            if p + parts[0] in tensors:
                state[p + fused] = torch.cat([tensors.pop(p + part) for part in parts], dim=0)
        if config.is_sparse(i):
            e = p + "mlp.experts."
            state[e + "gate_up_proj"] = torch.stack([
                torch.cat([tensors.pop(f"{e}{x}.gate_proj.weight"), tensors.pop(f"{e}{x}.up_proj.weight")])
                for x in range(X)])
            state[e + "down_proj"] = torch.stack([tensors.pop(f"{e}{x}.down_proj.weight") for x in range(X)])
            s = p + "mlp.shared_expert."
            if s + "gate_proj.weight" in tensors:
                state[s + "gate_up_proj.weight"] = torch.cat([tensors.pop(s + "gate_proj.weight"),
                                                              tensors.pop(s + "up_proj.weight")])
    state |= tensors
    state = {name: t.to(device=device, dtype=dtype) for name, t in state.items()}
    with torch.device("meta"):
        model = Qwen2MoeForCausalLM(config, components)
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device=device, dtype=dtype)
    model.requires_grad_(False).eval()
    tokenizer = Tokenizer.from_folder(folder) if (folder / "tokenizer.json").is_file() else None
    return model, tokenizer
