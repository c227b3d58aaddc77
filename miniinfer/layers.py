"""Chapter 01 — the building blocks of a decoder-only transformer.

Every block exists twice: as a plain function (what a chapter exercise asks you to write, with the
same signature) and, where it owns weights, as a small ``nn.Module`` that holds the weights and calls
the function. The model (``miniinfer.models.qwen2``) is assembled from these modules, and the
functions it calls come from a :class:`~miniinfer.components.Components` object, so a student's
``rms_norm`` or ``swiglu`` can run inside the real model.

Shapes: ``E`` hidden size, ``I`` MLP (intermediate) size, ``V`` vocabulary size; ``...`` any leading
dimensions (``[B, L]`` for a padded batch, ``[T]`` for a packed one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "linear",
    "silu",
    "swiglu",
    "rms_norm",
    "embedding",
    "lm_head",
    "RMSNorm",
    "SwiGLUMLP",
]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``.  x: [..., in], weight: [out, in] (PyTorch/HF layout), bias: [out] -> [..., out].

    Weights are stored as [out, in] so that each output feature's weights are one contiguous row;
    ``F.linear`` does the transposed matmul and the bias add in one call.
    """
    return F.linear(x, weight, bias)


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU (a.k.a. swish): ``x * sigmoid(x)``, elementwise. x: [...] -> [...]."""
    return F.silu(x)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated activation of the SwiGLU MLP: ``silu(gate) * up``.  gate, up: [..., I] -> [..., I].

    The gate decides, per feature, how much of the linear ``up`` projection passes; this works better
    than a plain activation at the same parameter count (Shazeer, "GLU Variants Improve Transformer").
    """
    return F.silu(gate) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: ``x / sqrt(mean(x**2) + eps) * weight`` over the last dim.  x: [..., E], weight: [E] -> [..., E].

    The statistics are computed in float32 even for bf16/fp16 inputs: a mean of squares over thousands
    of features overflows fp16 and loses most of its digits in bf16. As in HF transformers, the
    normalised value is cast back to the input dtype *before* the multiplication by ``weight``.
    """
    if x.dtype == torch.float32:
        # One fused kernel, numerically the same formula.
        return F.rms_norm(x, weight.shape, weight, eps)
    normalized = F.rms_norm(x.float(), weight.shape, None, eps)
    return normalized.to(x.dtype) * weight


def embedding(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Look up rows of the embedding table.  ids: [...] (int64), table: [V, E] -> [..., E]."""
    return F.embedding(ids, table)


def lm_head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits from the final hidden states: ``hidden @ weight.T``.  hidden: [..., E], weight: [V, E] -> [..., V].

    A *tied* model passes its embedding table as ``weight`` (the same [V, E] matrix maps ids to vectors
    and vectors back to scores, saving V·E parameters, a large share of a small model); an untied
    model has a separate ``lm_head.weight``.
    """
    return F.linear(hidden, weight)


class RMSNorm(nn.Module):
    """Holds the RMSNorm gain ``weight`` [E]; ``forward(x [..., E]) -> [..., E]`` calls ``fn`` (default :func:`rms_norm`)."""

    def __init__(self, size: int, eps: float, fn: Callable = rms_norm):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLUMLP(nn.Module):
    """The feed-forward block ``down(swiglu(gate(x), up(x)))``.  x: [..., E] -> [..., E].

    ``gate`` and ``up`` read the same input, so their weights are stacked into one ``gate_up_proj``
    ([2·I, E]: rows 0..I-1 are ``gate_proj``, rows I..2I-1 are ``up_proj``) and computed by one matmul
    instead of two — fewer kernel launches and one pass over ``x``. The loader does the stacking.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, fn: Callable = swiglu):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.fn(gate, up))
