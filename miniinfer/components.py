"""The swappable functions inside the model: how a chapter's exercise runs inside the real engine.

    from miniinfer.components import Components
    model, tokenizer = miniinfer.load_model(path, components=Components(rms_norm=my_rms_norm))

The model (and, for `probabilities`, the engine's sampler) calls these functions, and nothing else, for the parts the course asks you to write.
Each default is the package's reference, with the same signature as the chapter's stub. A
replacement is passed explicitly to the constructor (``Qwen2ForCausalLM``, ``load_model``, ``LLM``):
no monkey-patching, and two models with different components can live side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from miniinfer import attention, layers, rope, sampling

__all__ = ["Components"]


@dataclass(frozen=True)
class Components:
    """The functions the model calls. Shapes in the book's vocabulary (B, L, S, T, H, H_kv, D, E, I, V)."""

    #: (x [..., E], weight [E], eps: float) -> [..., E]
    rms_norm: Callable = layers.rms_norm
    #: (gate [..., I], up [..., I]) -> silu(gate) * up
    swiglu: Callable = layers.swiglu
    #: (x [*, H, D], cos [*, D//2], sin [*, D//2]) -> [*, H, D]   (Qwen2 half-split). The model rotates
    #: the q and k heads of a token in one call, so "H" here is H + H_kv: treat every head alike.
    apply_rope: Callable = rope.apply_rope
    #: (q [B, L, H, D], k [B, S, H_kv, D], v [B, S, H_kv, D], *, causal: bool = True,
    #:  scale: float | None = None) -> [B, L, H, D]
    attention: Callable = attention.grouped_query_attention
    #: (logits [V], params: SamplingParams) -> probs [V]: the distribution each new token is drawn from
    #: (temperature, then top-k, then top-p). Used by the engine's sampler, not by the model's forward.
    probabilities: Callable = sampling.probabilities
