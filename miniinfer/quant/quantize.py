"""Round-to-nearest (RTN) quantization: scales, zero points, quantize, dequantize, fake-quantize.

A weight matrix ``w: [N, K]`` (PyTorch layout: one row per output feature) is cut into groups along
its input dimension K, and every group gets its own scale (and, asymmetric, its own zero point):

* per-tensor:  one scale for the whole tensor (``group_size=0`` with ``per_tensor=True``);
* per-channel: one scale per row (``group_size=None``): the usual int8 choice;
* group-wise:  one scale per ``group_size`` consecutive inputs of a row (int4's g128 / g32).

Symmetric (signed integers, zero point 0)::

    scale = max|w| / qmax                 q = clamp(round(w / scale), qmin, qmax)      w ≈ scale · q

Asymmetric (unsigned integers 0 … 2**b − 1, the range stretched over [min, max] of the group, which
is widened to contain 0 so that zero is exactly representable)::

    scale = (max − min) / (2**b − 1)      zero = round(−min / scale)
    q = clamp(round(w / scale) + zero, 0, 2**b − 1)                                   w ≈ scale · (q − zero)

Inside the range the error of one element is at most ``scale / 2``: that is the bound the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miniinfer.quant.formats import int_format

__all__ = ["QuantizedTensor", "compute_qparams", "quantize", "dequantize", "quantize_dequantize",
           "quantize_per_token", "group_view"]

EPS = 1e-12  # a group of zeros still gets a positive scale (its values quantize to exactly 0)


@dataclass
class QuantizedTensor:
    """``q`` (int8 for signed formats, uint8 for unsigned) with ``scale`` and ``zero`` of shape
    ``[*lead, num_groups]`` (float / int32; zero is None when symmetric). ``w ≈ dequantize(self)``."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int  # inputs per group along the last dim (= K for per-channel, = numel for per-tensor)
    shape: tuple[int, ...]
    per_tensor: bool = False

    @property
    def symmetric(self) -> bool:
        return self.zero is None


def group_view(x: torch.Tensor, group_size: int | None, per_tensor: bool = False) -> tuple[torch.Tensor, int]:
    """x: [..., K] -> ([..., K // g, g], g). ``group_size=None`` is one group per row; ``per_tensor`` one group."""
    if per_tensor:
        return x.reshape(1, 1, -1), x.numel()
    K = x.shape[-1]
    g = K if group_size in (None, 0, -1) else group_size
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
    if K % g:
        raise ValueError(f"the last dim ({K}) must be a multiple of group_size ({g})")
    return x.reshape(*x.shape[:-1], K // g, g), g


def compute_qparams(groups: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) per group. groups: [..., G, g] -> scale [..., G] (float32 at least), zero [..., G]."""
    fmt = int_format(bits, symmetric)
    g = groups.double() if groups.dtype == torch.float64 else groups.float()
    if symmetric:
        scale = g.abs().amax(dim=-1) / fmt.qmax
        return scale.clamp_min(EPS), None
    lo = g.amin(dim=-1).clamp_max(0.0)
    hi = g.amax(dim=-1).clamp_min(0.0)
    scale = ((hi - lo) / fmt.qmax).clamp_min(EPS)
    zero = torch.round(-lo / scale).clamp(0, fmt.qmax)
    return scale, zero.to(torch.int32)


def quantize(w: torch.Tensor, bits: int = 8, *, symmetric: bool = True, group_size: int | None = None,
             per_tensor: bool = False) -> QuantizedTensor:
    """RTN-quantize ``w: [..., K]`` (see the module docstring). -> :class:`QuantizedTensor`."""
    groups, g = group_view(w, group_size, per_tensor)
    scale, zero = compute_qparams(groups, bits, symmetric)
    fmt = int_format(bits, symmetric)
    x = groups.to(scale.dtype) / scale[..., None]
    if zero is not None:
        x = torch.round(x) + zero[..., None].to(x.dtype)
    else:
        x = torch.round(x)
    q = x.clamp(fmt.qmin, fmt.qmax).to(torch.int8 if symmetric else torch.uint8)
    return QuantizedTensor(q.reshape(w.shape), scale, zero, bits, g, tuple(w.shape), per_tensor)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale · (q − zero)`` with the group structure of ``qt``. -> [..., K] in ``dtype``."""
    groups, _ = group_view(qt.q, qt.group_size, qt.per_tensor)
    x = groups.to(qt.scale.dtype)
    if qt.zero is not None:
        x = x - qt.zero[..., None].to(x.dtype)
    return (x * qt.scale[..., None]).reshape(qt.shape).to(dtype)


def quantize_dequantize(w: torch.Tensor, bits: int = 8, *, symmetric: bool = True, group_size: int | None = None,
                        per_tensor: bool = False) -> torch.Tensor:
    """What the model computes with after RTN quantization: ``dequantize(quantize(w))`` in w's dtype."""
    return dequantize(quantize(w, bits, symmetric=symmetric, group_size=group_size, per_tensor=per_tensor),
                      w.dtype)


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric activation quantization, one scale per token (row).
    x: [T, K] -> (q int8 [T, K], scale float32 [T, 1]). Computed at run time from each token's own max."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / (2 ** (bits - 1) - 1)).clamp_min(EPS)
    q = torch.round(x.float() / scale).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).to(torch.int8)
    return q, scale
