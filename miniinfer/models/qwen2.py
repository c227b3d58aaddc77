"""Chapter 04 — Qwen2 / Qwen2.5, the model the whole course runs, in one small file.

A decoder-only transformer: token embedding, N identical layers (RMSNorm → attention with RoPE →
residual add; RMSNorm → SwiGLU MLP → residual add), a final RMSNorm and the LM head (tied to the
embedding or not). Module names follow HF transformers (``model.layers.3.self_attn.o_proj.weight``),
except two fused projections that the loader builds from HF's separate ones:

* ``self_attn.qkv_proj`` = rows of ``q_proj``, ``k_proj``, ``v_proj`` ([(H + 2·H_kv)·D, E], with bias);
* ``mlp.gate_up_proj``   = rows of ``gate_proj``, ``up_proj``          ([2·I, E]).

One matmul instead of three (or two) reads the layer input once and launches fewer kernels, which
matters most when decoding one token at a time, where every layer is a handful of small matmuls.

Forward contract (the KV cache and the engine rely on it)::

    model(input_ids [B, L]) -> logits [B, L, V]                      # plain causal forward
    model(input_ids [*], positions [*], attention=ctx)               # * = [B, L] or packed [T]
    model(..., logits_indices [N]) -> logits [N, V]                  # LM head on chosen rows only

With ``attention=ctx`` every layer hands its q, k, v to ``ctx.attend(layer_index, q, k, v, scale)``
(see :class:`miniinfer.attention.AttentionContext`) instead of attending over the L new tokens only.

Two forward paths compute the same thing. The readable one (the layer modules' ``forward``) is this
chapter's model and calls the :class:`~miniinfer.components.Components` functions, so your own
``rms_norm`` or ``swiglu`` runs inside it. :meth:`Qwen2ForCausalLM.enable_fused_kernels` switches to
:meth:`Qwen2ForCausalLM._forward_fused`, which replaces the elementwise glue between the matmuls by
the fused kernels of :mod:`miniinfer.kernels.fused` (the engine turns it on on a GPU).

The same file runs Llama (2, 3, 3.1) and Qwen3 checkpoints: their decoders differ from Qwen2 by a few
switches in the config (:class:`~miniinfer.models.config.Qwen2Config`), not by structure:

=============  ==========================  ===================  ===============================
model_type     bias on q, k, v / o_proj    q/k RMSNorm per head RoPE
=============  ==========================  ===================  ===============================
``qwen2``      always / never              no                   plain
``llama``      ``attention_bias`` / same   no                   plain or "llama3" scaling
``qwen3``      ``attention_bias`` / same   yes (before RoPE)    plain
=============  ==========================  ===================  ===============================

:class:`LlamaForCausalLM` and :class:`Qwen3ForCausalLM` are this class under the name a reader expects.
"""

from __future__ import annotations

import torch
from torch import nn

from miniinfer.attention import AttentionContext
from miniinfer.components import Components
from miniinfer.layers import RMSNorm, SwiGLUMLP, embedding, lm_head
from miniinfer.models.config import Qwen2Config
from miniinfer.rope import RotaryEmbedding

__all__ = ["Qwen2ForCausalLM", "Qwen2Config", "LlamaForCausalLM", "Qwen3ForCausalLM"]


class Qwen2Attention(nn.Module):
    """x: [*, E] -> [*, E]: fused qkv projection, RoPE on q and k, attention, output projection."""

    def __init__(self, config: Qwen2Config, layer_index: int, components: Components):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        self.qkv_proj = nn.Linear(config.hidden_size, config.q_size + 2 * config.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=config.o_proj_bias)
        # Qwen3: RMSNorm over each head's D coordinates of q and k (one [D] weight each, shared by the heads),
        # before RoPE; it keeps the attention logits' scale in check without a bias.
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, components.rms_norm) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, components.rms_norm) if config.qk_norm else None
        self.apply_rope = components.apply_rope
        self.attention = components.attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                context: AttentionContext | None) -> torch.Tensor:
        H, H_kv = self.num_heads, self.num_kv_heads
        shape = x.shape[:-1]
        qkv = self.qkv_proj(x).view(*shape, H + 2 * H_kv, self.head_dim)  # [*, H + 2·H_kv, D]
        if self.q_norm is not None:
            qkv = torch.cat((self.q_norm(qkv[..., :H, :]), self.k_norm(qkv[..., H:H + H_kv, :]),
                             qkv[..., H + H_kv:, :]), dim=-2)
        # q and k heads are adjacent, and RoPE treats every head alike: rotate them in one call.
        qk = self.apply_rope(qkv[..., : H + H_kv, :], cos, sin)
        q, k, v = qk[..., :H, :], qk[..., H:, :], qkv[..., H + H_kv :, :]
        if context is None:
            out = self.attention(q, k, v, causal=True, scale=self.scale)  # [B, L, H, D]
        else:
            out = context.attend(self.layer_index, q, k, v, self.scale)  # [*, H, D]
        return self.o_proj(out.reshape(*shape, H * self.head_dim))


class Qwen2DecoderLayer(nn.Module):
    """One pre-norm transformer block. x: [*, E] -> [*, E]."""

    def __init__(self, config: Qwen2Config, layer_index: int, components: Components):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, components.rms_norm)
        self.self_attn = Qwen2Attention(config, layer_index, components)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, components.rms_norm)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, components.swiglu)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                context: AttentionContext | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, context)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """The decoder stack's weights (named ``model`` as in HF, so checkpoint names map one to one)."""

    def __init__(self, config: Qwen2Config, components: Components):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, i, components) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, components.rms_norm)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                          components.apply_rope)
        if config.rope_scaling is not None:  # Llama 3.1: the same tables from rescaled frequencies
            from miniinfer.models.rope_scaling import scaled_rope_cos_sin

            cos, sin = scaled_rope_cos_sin(config.max_position_embeddings, config.head_dim, config.rope_theta,
                                           config.rope_scaling, device="cpu")
            self.rotary_emb.register_buffer("cos", cos, persistent=False)
            self.rotary_emb.register_buffer("sin", sin, persistent=False)


class Qwen2ForCausalLM(nn.Module):
    """Qwen2 with its LM head. See the module docstring for the forward contract."""

    def __init__(self, config: Qwen2Config, components: Components | None = None):
        super().__init__()
        self.config = config
        self.components = components if components is not None else Components()
        self.model = Qwen2Model(config, self.components)
        # Tied: the LM head *is* the embedding table (no separate parameter, none in the checkpoint).
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                          bias=False)
        self.fused_kernels = False  # see enable_fused_kernels
        self.fused_backend = "auto"
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """GPT-2-style random init (normal(0, std) matrices, zero biases, unit norms), as HF does for Qwen2."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, E]: the untied head's weight, or the embedding table when tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                attention: AttentionContext | None = None,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: [B, L] (or packed [T] with ``attention``); positions: same shape, default ``arange(L)``
        per row (required with ``attention``); logits_indices: [N] rows of the flattened token dim.
        -> logits [B, L, V] (or [T, V]), or [N, V] with ``logits_indices``."""
        if self.fused_kernels:
            return self._forward_fused(input_ids, positions, attention, logits_indices)
        rotary = self.model.rotary_emb
        if attention is None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L] without an attention context, got shape "
                             f"{tuple(input_ids.shape)}")
        if positions is None:
            if attention is not None:
                raise ValueError("positions are required with an attention context (each token's position in "
                                 "its own sequence)")
            L = input_ids.shape[-1]
            if L > rotary.max_positions:
                raise ValueError(f"sequence length {L} exceeds max_position_embeddings {rotary.max_positions}")
            cos, sin = rotary.cos[:L], rotary.sin[:L]  # [L, D//2], broadcast over the batch
        else:
            cos, sin = rotary.cos_sin(positions)  # [*, D//2], gathered once for all layers
        x = embedding(input_ids, self.model.embed_tokens.weight)
        for layer in self.model.layers:
            x = layer(x, cos, sin, attention)
        if logits_indices is not None:
            # Norm and head only on the rows we need: at decode, the head ([V, E]) is often the largest matmul.
            x = x.reshape(-1, x.shape[-1]).index_select(0, logits_indices)
        return lm_head(self.model.norm(x), self.lm_head_weight)

    # ----------------------------------------------------------------------------------------------
    # The fused forward path (not part of chapter 04's model: the same computation in fewer kernels)
    # ----------------------------------------------------------------------------------------------

    def enable_fused_kernels(self, enabled: bool = True, backend: str = "auto") -> Qwen2ForCausalLM:
        """Run :meth:`_forward_fused` from now on (``enabled=False``: back to the readable path). -> self.

        ``backend`` is passed to every fused kernel: "auto" (Triton on a GPU, the torch references on
        a CPU), "torch" or "triton". The fused path does not call ``components.rms_norm``, ``swiglu``
        or ``apply_rope``, so it is refused (ValueError) when any of them was replaced: your function
        must be the one that runs. Both paths are capturable in a CUDA graph; the flag is plain Python
        state, read when the forward runs, so switch it before capturing.
        """
        from miniinfer.kernels.fused import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"enable_fused_kernels: backend must be one of {BACKENDS}, got {backend!r}")
        if enabled:
            defaults = Components()
            replaced = [name for name in ("rms_norm", "swiglu", "apply_rope")
                        if getattr(self.components, name) is not getattr(defaults, name)]
            if replaced:
                raise ValueError(f"enable_fused_kernels: the model's components replace {', '.join(replaced)}; the "
                                 "fused kernels would bypass them, so the model keeps the unfused path (where "
                                 "your functions run)")
        self.fused_kernels, self.fused_backend = bool(enabled), backend
        return self

    def _forward_fused(self, input_ids: torch.Tensor, positions: torch.Tensor | None,
                       attention: AttentionContext | None, logits_indices: torch.Tensor | None) -> torch.Tensor:
        """:meth:`forward` (same contract and results) with the elementwise work in fused kernels.

        Tokens are flattened to ``[T, E]``. The residual stream is carried separately from the
        sub-layer outputs: each ``fused_add_rms_norm`` adds the previous sub-layer's output to the
        stream and normalises the sum in one pass, so no residual add is a kernel of its own::

            x = embed(ids); residual = None
            per layer:  h, residual = add_norm(x, residual)      # residual += attn/MLP output; h = norm
                        qkv = qkv_proj(h); RoPE on q, k in place (cos/sin gathered at positions)
                        x = o_proj(attend(q, k, v))
                        h, residual = add_norm(x, residual)
                        x = down_proj(silu_and_mul(gate_up_proj(h)))
            final:      (rows at logits_indices) h, _ = add_norm(x, residual); logits = lm_head(h)

        No host synchronisation: capturable in a CUDA graph like the readable path.
        """
        from miniinfer.kernels.fused import fused_add_rms_norm, rope_qk_inplace_at_positions, silu_and_mul

        config, backend, rotary = self.config, self.fused_backend, self.model.rotary_emb
        if attention is None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L] without an attention context, got shape "
                             f"{tuple(input_ids.shape)}")
        shape = input_ids.shape  # [B, L] or packed [T]
        if positions is None:
            if attention is not None:
                raise ValueError("positions are required with an attention context (each token's position in "
                                 "its own sequence)")
            L = shape[-1]
            if L > rotary.max_positions:
                raise ValueError(f"sequence length {L} exceeds max_position_embeddings {rotary.max_positions}")
            positions = torch.arange(L, device=input_ids.device).expand(shape)
        H, H_kv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        eps = config.rms_norm_eps
        positions = positions.reshape(-1)
        x = embedding(input_ids.reshape(-1), self.model.embed_tokens.weight)  # [T, E]
        T = x.shape[0]
        residual = None
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            h, residual = fused_add_rms_norm(x, residual, layer.input_layernorm.weight, eps, backend)
            qkv = attn.qkv_proj(h).view(T, H + 2 * H_kv, D)
            if attn.q_norm is not None:  # Qwen3 (the default rms_norm: replaced components refuse this path)
                qkv[:, :H], qkv[:, H:H + H_kv] = attn.q_norm(qkv[:, :H]), attn.k_norm(qkv[:, H:H + H_kv])
            rope_qk_inplace_at_positions(qkv, positions, rotary.cos, rotary.sin, H + H_kv, backend)
            # Views of qkv, with the token dims the caller used ([B, L] or [T]), as the readable path gives.
            q, k, v = (part.unflatten(0, shape) for part in (qkv[:, :H], qkv[:, H:H + H_kv], qkv[:, H + H_kv:]))
            if attention is None:
                out = self.components.attention(q, k, v, causal=True, scale=attn.scale)  # [B, L, H, D]
            else:
                out = attention.attend(attn.layer_index, q, k, v, attn.scale)  # [*, H, D]
            x = attn.o_proj(out.reshape(T, H * D))
            h, residual = fused_add_rms_norm(x, residual, layer.post_attention_layernorm.weight, eps, backend)
            x = mlp.down_proj(silu_and_mul(mlp.gate_up_proj(h), backend))
        if logits_indices is not None:
            # As in the readable path: the last add, the norm and the head on the rows we need only.
            x, residual = x.index_select(0, logits_indices), residual.index_select(0, logits_indices)
        h, _ = fused_add_rms_norm(x, residual, self.model.norm.weight, eps, backend)
        logits = lm_head(h, self.lm_head_weight)
        return logits if logits_indices is not None else logits.unflatten(0, shape)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class LlamaForCausalLM(Qwen2ForCausalLM):
    """Llama 2/3/3.1 (``model_type: llama``): the same decoder, built from a config whose switches say Llama."""


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    """Qwen3 dense (``model_type: qwen3``): the same decoder with q/k RMSNorm and no q/k/v bias."""


#: config.model_type -> the class that runs it (the loader builds ``MODEL_CLASSES[config.model_type](config)``).
MODEL_CLASSES = {"qwen2": Qwen2ForCausalLM, "llama": LlamaForCausalLM, "qwen3": Qwen3ForCausalLM}
