"""Chapter 02 — rotary position embedding (RoPE).

RoPE encodes a token's position ``p`` by rotating pairs of coordinates of its query and key vectors
by the angles ``p · θ_i``, one frequency ``θ_i = theta ** (-2i / D)`` per pair (i = 0 … D/2 − 1).
A rotation by ``p·θ`` followed by a dot product with a vector rotated by ``p'·θ`` only sees the
difference ``(p − p')·θ``, so attention scores depend on *relative* positions while each token is
still embedded on its own (which is what lets a KV cache store keys once and reuse them).

Which coordinates form a pair is a convention, and checkpoints are trained with one of them:

* **interleaved** ("traditional"): pairs ``(2i, 2i+1)`` — the RoFormer paper, Meta's original LLaMA
  code (``torch.view_as_complex``), GPT-J's ``rotate_every_two``. :func:`apply_rope_interleaved`.
* **half-split**: pairs ``(i, i + D/2)`` — GPT-NeoX, and the ``rotate_half`` of HF transformers'
  Llama/Qwen2 code, hence of every Qwen2 checkpoint. :func:`apply_rope` (the model's default).

The two are the same rotation applied to a permuted head dimension (:func:`interleaved_to_half_split`):
HF's Llama conversion script permutes the rows of ``q_proj``/``k_proj`` once so that the cheaper
half-split form (two contiguous halves, no strided access) gives identical attention scores.

Shapes: ``H`` heads, ``D`` head dim, ``*`` leading token dims (``[B, L]`` or packed ``[T]``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "rope_cos_sin",
    "apply_rope",
    "apply_rope_interleaved",
    "interleaved_to_half_split",
    "half_split_to_interleaved",
    "make_positions",
    "RotaryEmbedding",
]


def rope_cos_sin(max_positions: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos and sin tables: ``cos[p, i] = cos(p · theta ** (-2i / D))``.  -> (cos, sin), each [S, D//2] float32.

    Computed with exactly HF transformers' float32 formula (inverse frequencies in float32, one float32
    product per angle): at position 10 000 the angle's rounding error is ~1e-3 rad either way, so the
    tables must be computed the *same* way, not merely accurately, for logits to match HF's to 1e-5.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(max_positions, device=device).float(), inv_freq)  # [S, D//2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE (Qwen2 / HF ``rotate_half``): rotate the pairs ``(x[i], x[i + D/2])``.

    x: [*, H, D]; cos, sin: [*, D//2] (one row per token, shared by all heads) -> [*, H, D].
    """
    x1, x2 = x.chunk(2, dim=-1)  # the pair partners live in the two contiguous halves
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved ("traditional", RoFormer / Meta LLaMA / GPT-J) RoPE: rotate the pairs ``(x[2i], x[2i+1])``.

    x: [*, H, D]; cos, sin: [*, D//2] -> [*, H, D].
    """
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def interleaved_to_half_split(x: torch.Tensor) -> torch.Tensor:
    """Reorder the head dim from interleaved pairs to half-split pairs: even coordinates first, then odd.

    x: [..., D] -> [..., D]. For any x: ``apply_rope(interleaved_to_half_split(x), cos, sin) ==
    interleaved_to_half_split(apply_rope_interleaved(x, cos, sin))``, and q·k is unchanged by the
    permutation, so a checkpoint trained with one convention runs with the other after permuting the
    rows of its q and k projections.
    """
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def half_split_to_interleaved(x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`interleaved_to_half_split`.  x: [..., D] -> [..., D]."""
    first, second = x.chunk(2, dim=-1)
    return torch.stack((first, second), dim=-1).flatten(-2)


def make_positions(spec: int | slice | torch.Tensor, length: int | None = None, device=None) -> torch.Tensor:
    """Positions (LongTensor) from the three usual ways of saying where tokens sit.

    * an ``int`` offset: ``length`` tokens starting there, ``[offset, offset + length)`` — e.g. the
      tokens that follow ``offset`` cached ones;
    * a ``slice`` ``start:stop[:step]`` (``length`` is not needed);
    * a tensor of per-token positions, returned as int64 on ``device`` (packed batches, where every
      sequence restarts at its own offset).
    """
    if isinstance(spec, torch.Tensor):
        return spec.to(device=device if device is not None else spec.device, dtype=torch.long)
    if isinstance(spec, slice):
        if spec.stop is None:
            raise ValueError("a positions slice needs a stop, e.g. slice(5, 12)")
        return torch.arange(spec.start or 0, spec.stop, spec.step or 1, device=device)
    if isinstance(spec, int) and not isinstance(spec, bool):
        if length is None:
            raise ValueError("an int offset needs length= (how many tokens follow the offset)")
        if spec < 0:
            raise ValueError(f"positions offset must be >= 0, got {spec}")
        return torch.arange(spec, spec + length, device=device)
    raise TypeError(f"positions must be an int offset, a slice or a tensor, got {type(spec).__name__}")


class RotaryEmbedding(nn.Module):
    """Owns the cos/sin tables ([max_positions, D//2], built once) and rotates q and k at given positions.

    ``forward(q [*, H, D], k [*, H_kv, D], positions [*]) -> (q, k)``: ``positions`` is a LongTensor
    with q's leading shape — ``[B, L]`` for a padded batch, ``[T]`` for a packed one. The tables are
    buffers (not saved with the weights) so that ``.to(dtype/device)`` moves them with the model.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, apply_fn: Callable = apply_rope):
        super().__init__()
        # Explicit device: the tables must hold real numbers even when the model is built on "meta".
        cos, sin = rope_cos_sin(max_positions, head_dim, theta, device="cpu")
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self.apply_fn = apply_fn

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Table rows at ``positions`` [*] -> (cos, sin), each [*, D//2]."""
        return self.cos[positions], self.sin[positions]

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin(positions)
        return self.apply_fn(q, cos, sin), self.apply_fn(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_positions={self.max_positions}, theta={self.theta}"
