"""Packing low-bit integers into bytes and words, and GPTQ's tensor layout.

Two layouts:

* :func:`pack_int4` / :func:`unpack_int4`: two 4-bit values per byte along the last dim, the even
  index in the low nibble (``byte = q[2i] | q[2i+1] << 4``): the simplest packing, the chapter's exercise.
* :func:`pack_int32` / :func:`unpack_int32`: ``32 // bits`` values per int32 word along one dim, the
  first value in the lowest bits: the layout of GPTQ checkpoints (``qweight`` packs along the input
  dim K, ``qzeros`` along the output dim N). A 4-bit ``qweight`` of a [N, K] layer is int32 [K / 8, N],
  so that neighbouring output features (neighbouring threads of a GEMV) read neighbouring words.
"""

from __future__ import annotations

import torch

__all__ = ["pack_int4", "unpack_int4", "pack_int32", "unpack_int32"]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q: [..., K] integers in 0 … 15, K even -> uint8 [..., K // 2] (even index in the low nibble)."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dim, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K // 2] -> uint8 [..., K] in 0 … 15 (inverse of :func:`pack_int4`)."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


def pack_int32(q: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack unsigned ``bits``-bit values along ``dim`` into int32 words (32 // bits per word, first value
    lowest). q: integers in [0, 2**bits), size along dim a multiple of 32 // bits."""
    if 32 % bits:
        raise ValueError(f"pack_int32 packs 2, 4 or 8 bits, got {bits}")
    per_word = 32 // bits
    q = q.movedim(dim, 0).to(torch.int64)
    if q.shape[0] % per_word:
        raise ValueError(f"size {q.shape[0]} along dim {dim} is not a multiple of {per_word}")
    q = q.reshape(q.shape[0] // per_word, per_word, *q.shape[1:])
    shifts = (torch.arange(per_word, device=q.device) * bits).view(1, per_word, *([1] * (q.dim() - 2)))
    words = (q << shifts).sum(dim=1)  # int64 in [0, 2**32): reinterpreted as int32 below
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(0, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 words -> int32 values in [0, 2**bits), ``32 // bits`` times
    longer along ``dim``."""
    per_word = 32 // bits
    w = words.movedim(dim, 0)
    shifts = (torch.arange(per_word, device=w.device, dtype=torch.int32) * bits).view(
        1, per_word, *([1] * (w.dim() - 1)))
    values = (w.unsqueeze(1) >> shifts) & (2**bits - 1)  # arithmetic shift, then mask: sign bits drop out
    return values.reshape(w.shape[0] * per_word, *w.shape[1:]).movedim(0, dim).contiguous()
