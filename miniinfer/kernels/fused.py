"""Fused elementwise kernels for the decoder layer: add + RMSNorm, RoPE on q and k in place, SiLU-and-mul.

A batch-1 decode step of a small model is mostly *glue*: in the unfused model (chapter 04) a bf16
RMSNorm is four kernels, RoPE seven, SwiGLU two, and every residual add one more, each reading what
the previous one wrote. These three operations do the same arithmetic in one kernel each:

* :func:`fused_add_rms_norm` — ``residual_out = x + residual``, ``normed = rms_norm(residual_out)``.
  The add that closes one sub-layer and the norm that opens the next read the same row, so they are
  one pass; the model carries the un-normalised sum (the residual stream) from norm to norm.
* :func:`rope_qk_inplace` / :func:`rope_qk_inplace_at_positions` — half-split RoPE on the q and k heads
  of the fused qkv projection's output, in place (no new tensor, no cat); the second gathers the
  cos/sin rows at the tokens' positions inside the kernel.
* :func:`silu_and_mul` — ``silu(gate) * up`` straight from the fused gate_up projection ``[T, 2I]``.

Each has a torch reference (``*_torch``, built from the teaching functions of :mod:`miniinfer.layers`
and :mod:`miniinfer.rope`) and a Triton kernel (``*_triton``, :mod:`miniinfer.kernels.fused_triton`).
``backend="auto"`` picks Triton when the tensors are on a CUDA GPU and triton imports (and the dtype is
float32, float16 or bfloat16), the torch reference otherwise; on a CPU the Triton kernels run only
when asked for (through the interpreter, for tests).

Numerics (float32 statistics and arithmetic, rounding to the storage dtype):

* ``fused_add_rms_norm`` rounds where the unfused model rounds — the sum to x's dtype, the normalised
  value to x's dtype before the gain (as HF does) — so it gives the unfused numbers (up to the
  summation order of the mean and sqrt vs rsqrt).
* ``rope_qk_inplace`` and ``silu_and_mul`` compute in float32 and round once. The unfused bf16 model
  rounds after each op (``F.silu(gate)`` then ``* up``; RoPE with bf16 tables rounds each product),
  so in 16-bit dtypes the fused results are slightly *more* accurate than the unfused ones; in
  float32 the torch references equal the teaching functions exactly.

The GPU paths never synchronise with the host (no ``.item()``, launch sizes from shapes only), so they
can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools

import torch

from miniinfer import layers, rope
from miniinfer.kernels import triton_available

__all__ = [
    "BACKENDS",
    "fused_add_rms_norm",
    "fused_add_rms_norm_torch",
    "fused_add_rms_norm_triton",
    "rope_qk_inplace",
    "rope_qk_inplace_torch",
    "rope_qk_inplace_triton",
    "rope_qk_inplace_at_positions",
    "rope_qk_inplace_at_positions_torch",
    "rope_qk_inplace_at_positions_triton",
    "silu_and_mul",
    "silu_and_mul_torch",
    "silu_and_mul_triton",
]

BACKENDS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_NORM_SIZE = 32768  # one row in registers: 64 elements per thread at 16 warps


@functools.cache
def _have_triton() -> bool:
    return triton_available()  # cached: "auto" is resolved on every call of a decode step


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for 16-bit inputs, the input's dtype for float32 and float64."""
    return torch.promote_types(t.dtype, torch.float32)


def _resolve(backend: str, fn: str, t: torch.Tensor, extra_ok: bool = True) -> str:
    """The backend to run: "auto" -> Triton for supported CUDA tensors, else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if t.is_cuda and t.dtype in TRITON_DTYPES and extra_ok and _have_triton() else "torch"
    if backend == "triton":
        if not _have_triton():
            raise RuntimeError(f"{fn}: triton is not installed; use backend='torch'")
        if t.dtype not in TRITON_DTYPES:
            raise ValueError(f"{fn}: the Triton kernel supports {TRITON_DTYPES}, got {t.dtype}")
    return backend


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., N] as a 2-D [rows, N] tensor whose last dim is contiguous (a view when possible)."""
    t = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _norm_warps(block: int) -> int:
    return min(16, max(4, block // 512))


# --------------------------------------------------------------------------------------------------
# Add + RMSNorm
# --------------------------------------------------------------------------------------------------

def _check_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> None:
    E = x.shape[-1] if x.dim() else 0
    if x.dim() < 1 or weight.shape != (E,):
        raise ValueError(f"fused_add_rms_norm: x must be [..., E] and weight [E], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device):
        raise ValueError(f"fused_add_rms_norm: residual must match x ({tuple(x.shape)} {x.dtype} on {x.device}), "
                         f"got {tuple(residual.shape)} {residual.dtype} on {residual.device}")
    if weight.device != x.device:
        raise ValueError(f"fused_add_rms_norm: weight on {weight.device}, x on {x.device}")


def fused_add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``residual_out = x + residual`` (x itself when residual is None), then
    :func:`miniinfer.layers.rms_norm` of it. -> (normed, residual_out)."""
    residual_out = x if residual is None else x + residual
    return layers.rms_norm(residual_out, weight, eps), residual_out


def fused_add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                              eps: float, *, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One Triton kernel, one program per row (see :func:`fused_add_rms_norm`)."""
    from miniinfer.kernels.fused_triton import fused_add_rms_norm_kernel

    E = x.shape[-1]
    if E > MAX_NORM_SIZE:
        raise ValueError(f"fused_add_rms_norm: the Triton kernel holds a row in registers, E <= {MAX_NORM_SIZE}, "
                         f"got {E}")
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    residual_out = x if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    x2 = _rows(x)
    T = x2.shape[0]
    if T == 0 or E == 0:
        if residual is not None:
            residual_out.copy_(x + residual)
        return out, residual_out
    r2 = _rows(residual) if residual is not None else x2  # unused when HAS_RESIDUAL is False
    out2, ro2 = out.view(-1, E), residual_out.view(-1, E) if residual is not None else x2
    block = _next_pow2(E)
    fused_add_rms_norm_kernel[(T,)](
        x2, r2, weight, out2, ro2, x2.stride(0), r2.stride(0), out2.stride(0), ro2.stride(0), E, float(eps),
        BLOCK=block, HAS_RESIDUAL=residual is not None, ROUND_BEFORE_WEIGHT=x.dtype != torch.float32,
        num_warps=num_warps or _norm_warps(block))
    return out, residual_out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add and RMSNorm in one pass.  x, residual: [T, E] (or [..., E]), weight: [E]
    -> (normed [T, E], residual_out [T, E]).

    ``residual_out = x + residual`` in x's dtype (the add rounds like the unfused model's), or x itself
    when ``residual`` is None (a model's first layer); ``normed = layers.rms_norm(residual_out, weight,
    eps)``: float32 statistics, and for 16-bit inputs the normalised value is rounded to the input
    dtype before the multiplication by ``weight``. ``residual`` must have x's shape and dtype; x may
    have strided rows. ``backend``: "auto" (Triton on a GPU), "torch" or "triton".
    """
    _check_norm(x, residual, weight)
    backend = _resolve(backend, "fused_add_rms_norm", x, extra_ok=x.shape[-1] <= MAX_NORM_SIZE)
    if backend == "torch":
        return fused_add_rms_norm_torch(x, residual, weight, eps)
    return fused_add_rms_norm_triton(x, residual, weight, eps)


# --------------------------------------------------------------------------------------------------
# RoPE on the q and k heads of qkv, in place
# --------------------------------------------------------------------------------------------------

def _check_rope(fn: str, qkv: torch.Tensor, num_rotated_heads: int | None) -> int:
    if qkv.dim() != 3 or qkv.shape[2] % 2:
        raise ValueError(f"{fn}: qkv must be [T, heads, D] with an even D, got shape {tuple(qkv.shape)}")
    heads = qkv.shape[1]
    n = heads if num_rotated_heads is None else int(num_rotated_heads)
    if not 0 <= n <= heads:
        raise ValueError(f"{fn}: num_rotated_heads must be in [0, {heads}], got {num_rotated_heads}")
    return n


def _check_table(fn: str, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: int | None) -> None:
    half = qkv.shape[2] // 2
    if cos.dim() != 2 or cos.shape[1] != half or sin.shape != cos.shape or (rows is not None and cos.shape[0] != rows):
        want = f"[{rows}, {half}]" if rows is not None else f"[max_positions, {half}]"
        raise ValueError(f"{fn}: cos and sin must be {want}, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.device != qkv.device or sin.device != qkv.device:
        raise ValueError(f"{fn}: cos/sin on {cos.device}, qkv on {qkv.device}")


def _rope_torch(qkv: torch.Tensor, n: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    part = qkv[:, :n]
    c = _compute_dtype(qkv)
    part.copy_(rope.apply_rope(part.to(c), cos.to(c), sin.to(c)))  # float32 math, one rounding
    return qkv


def rope_qk_inplace_torch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          num_rotated_heads: int | None = None) -> torch.Tensor:
    """Reference: :func:`miniinfer.rope.apply_rope` in float32 on the first heads, copied back."""
    return _rope_torch(qkv, _check_rope("rope_qk_inplace", qkv, num_rotated_heads), cos, sin)


def rope_qk_inplace_at_positions_torch(qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                                       sin_table: torch.Tensor, num_rotated_heads: int | None = None) -> torch.Tensor:
    """Reference: gather the table rows at ``positions``, then :func:`rope_qk_inplace_torch`."""
    n = _check_rope("rope_qk_inplace_at_positions", qkv, num_rotated_heads)
    return _rope_torch(qkv, n, cos_table[positions], sin_table[positions])


def _rope_triton(qkv, n, cos, sin, positions):
    from miniinfer.kernels.fused_triton import rope_qk_kernel

    T, _, D = qkv.shape
    if T == 0 or n == 0:
        return qkv
    cos = cos if cos.stride(1) == 1 else cos.contiguous()
    sin = sin if sin.stride(1) == 1 else sin.contiguous()
    gather = positions is not None
    rope_qk_kernel[(T,)](
        qkv, cos, sin, positions if gather else cos, qkv.stride(0), qkv.stride(1), qkv.stride(2),
        cos.stride(0), sin.stride(0), n, cos.shape[0],
        HALF=D // 2, HEADS_PAD=_next_pow2(n), HALF_PAD=_next_pow2(D // 2), GATHER=gather,
        num_warps=4 if n * D <= 4096 else 8)
    return qkv


def rope_qk_inplace_triton(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           num_rotated_heads: int | None = None) -> torch.Tensor:
    """One Triton kernel, one program per token (see :func:`rope_qk_inplace`)."""
    n = _check_rope("rope_qk_inplace", qkv, num_rotated_heads)
    return _rope_triton(qkv, n, cos, sin, None)


def rope_qk_inplace_at_positions_triton(qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                                        sin_table: torch.Tensor,
                                        num_rotated_heads: int | None = None) -> torch.Tensor:
    """One Triton kernel, the table gather included (see :func:`rope_qk_inplace_at_positions`)."""
    n = _check_rope("rope_qk_inplace_at_positions", qkv, num_rotated_heads)
    return _rope_triton(qkv, n, cos_table, sin_table, positions)


def rope_qk_inplace(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_rotated_heads: int | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """Half-split RoPE, in place, on the first ``num_rotated_heads`` heads of every token -> qkv.

    qkv: [T, H + 2·H_kv, D] (any strides, e.g. a view of the qkv projection's output); cos, sin:
    [T, D/2], one row per token. The model passes ``num_rotated_heads = H + H_kv``: the q and k heads
    are rotated, the v heads left untouched (default: every head). Numerics of
    :func:`miniinfer.rope.apply_rope` computed in float32, rounded once to qkv's dtype.
    """
    n = _check_rope("rope_qk_inplace", qkv, num_rotated_heads)
    _check_table("rope_qk_inplace", qkv, cos, sin, qkv.shape[0])
    if _resolve(backend, "rope_qk_inplace", qkv) == "torch":
        return _rope_torch(qkv, n, cos, sin)
    return _rope_triton(qkv, n, cos, sin, None)


def rope_qk_inplace_at_positions(qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                                 sin_table: torch.Tensor, num_rotated_heads: int | None = None,
                                 backend: str = "auto") -> torch.Tensor:
    """:func:`rope_qk_inplace` with the table lookup fused: token t uses row ``positions[t]``.

    qkv: [T, H + 2·H_kv, D]; positions: [T] (integer); cos_table, sin_table: [max_positions, D/2]
    (:class:`miniinfer.rope.RotaryEmbedding`'s ``cos``/``sin``). One kernel instead of two gathers
    plus the rotation. The Triton kernel clamps positions to the table (no out-of-bounds read, and no
    host-side check, which would synchronise); the torch reference raises on a bad position.
    """
    n = _check_rope("rope_qk_inplace_at_positions", qkv, num_rotated_heads)
    _check_table("rope_qk_inplace_at_positions", qkv, cos_table, sin_table, None)
    if positions.shape != (qkv.shape[0],) or positions.dtype.is_floating_point:
        raise ValueError(f"rope_qk_inplace_at_positions: positions must be an integer [T={qkv.shape[0]}] tensor, "
                         f"got {tuple(positions.shape)} {positions.dtype}")
    if positions.device != qkv.device:
        raise ValueError(f"rope_qk_inplace_at_positions: positions on {positions.device}, qkv on {qkv.device}")
    if _resolve(backend, "rope_qk_inplace_at_positions", qkv) == "torch":
        return _rope_torch(qkv, n, cos_table[positions], sin_table[positions])
    return _rope_triton(qkv, n, cos_table, sin_table, positions)


# --------------------------------------------------------------------------------------------------
# SiLU and mul
# --------------------------------------------------------------------------------------------------

def _check_gate_up(gate_up: torch.Tensor) -> int:
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: gate_up must be [..., 2·I], got shape {tuple(gate_up.shape)}")
    return gate_up.shape[-1] // 2


def silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    """Reference: :func:`miniinfer.layers.swiglu` of the two halves in float32, rounded once."""
    _check_gate_up(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    c = _compute_dtype(gate_up)
    return layers.swiglu(gate.to(c), up.to(c)).to(gate_up.dtype)


def silu_and_mul_triton(gate_up: torch.Tensor, *, block: int | None = None) -> torch.Tensor:
    """One Triton kernel over (token, block of I) (see :func:`silu_and_mul`)."""
    from miniinfer.kernels.fused_triton import silu_and_mul_kernel

    I = _check_gate_up(gate_up)  # noqa: E741 - the book's name for the MLP width
    out = torch.empty(*gate_up.shape[:-1], I, dtype=gate_up.dtype, device=gate_up.device)
    x2 = _rows(gate_up)
    T = x2.shape[0]
    if T == 0 or I == 0:
        return out
    out2 = out.view(-1, I)
    if block is None:  # small batches: more, smaller programs so that a decode step spreads over the SMs
        block = 256 if T < 64 else 1024
    block = min(block, max(16, _next_pow2(I)))
    silu_and_mul_kernel[(T, _cdiv(I, block))](x2, out2, x2.stride(0), out2.stride(0), I, BLOCK=block,
                                              num_warps=4)
    return out


def silu_and_mul(gate_up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """The SwiGLU activation on the fused gate_up projection.  gate_up: [T, 2·I] (or [..., 2·I]) -> [T, I].

    ``gate = gate_up[..., :I]``, ``up = gate_up[..., I:]`` (the row order of ``mlp.gate_up_proj``);
    returns ``silu(gate) * up`` computed in float32 and rounded once to gate_up's dtype (float32
    inputs: exactly :func:`miniinfer.layers.swiglu`). gate_up may have strided rows.
    """
    _check_gate_up(gate_up)
    if _resolve(backend, "silu_and_mul", gate_up) == "torch":
        return silu_and_mul_torch(gate_up)
    return silu_and_mul_triton(gate_up)
