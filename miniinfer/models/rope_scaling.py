"""RoPE frequency scaling: Llama 3.1's "llama3" rule, which stretches the low frequencies for long context.

Plain RoPE rotates pair ``i`` by ``p · θ_i`` with ``θ_i = theta ** (-2i / D)``. Llama 3.1 was trained
at ``original_max_position_embeddings`` (8192) and then extended (to 128k) by rescaling the
frequencies instead of the positions, differently by wavelength ``λ_i = 2π / θ_i``:

* short wavelengths (``λ < original / high_freq_factor``): kept — they encode local order;
* long wavelengths (``λ > original / low_freq_factor``): divided by ``factor`` — they now turn as
  slowly over the long context as they did over the original one;
* in between: a linear blend of the two, by ``s = (original / λ − low) / (high − low)``.

The cos/sin tables are then built as usual from the new frequencies (no attention scaling: the
"llama3" rule leaves the magnitudes alone). The formula follows HF transformers' float32 arithmetic
so that logits match theirs to 1e-5.
"""

from __future__ import annotations

import math

import torch

__all__ = ["rope_inv_freq", "scaled_rope_cos_sin"]


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """The D/2 inverse frequencies ``θ_i`` (float32), rescaled by ``scaling`` when given.  -> [D//2]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.get("rope_type") != "llama3":
        raise ValueError(f"unsupported rope scaling {scaling!r} (only 'llama3')")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, blended, scaled)


def scaled_rope_cos_sin(max_positions: int, head_dim: int, theta: float, scaling: dict | None,
                        device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`miniinfer.rope.rope_cos_sin`, with the frequencies of :func:`rope_inv_freq`. -> [S, D//2] x2."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, device)
    angles = torch.outer(torch.arange(max_positions, device=device).float(), inv_freq)  # [S, D//2]
    return angles.cos(), angles.sin()
