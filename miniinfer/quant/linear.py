"""Quantized linear layers: drop-in replacements for ``nn.Linear`` (``forward(x [..., K]) -> [..., N]``).

* :class:`Int8Linear`       int8 weights (per output channel, symmetric or asymmetric), activations in
                            the compute dtype: the weight is dequantized on the fly.
* :class:`W8A8Linear`       int8 weights *and* int8 activations (one scale per token, computed at run
                            time): an int8 × int8 → int32 matmul (``torch._int_mm``), then both scales.
* :class:`GroupQuantLinear` 2/3/4/8-bit weights with one scale and zero point per ``group_size`` inputs,
                            stored in GPTQ's layout (``qweight``/``qzeros``/``scales``/``g_idx``); RTN
                            int4 and GPTQ both produce it. 4-bit layers on a GPU run our Triton (M ≤ 16)
                            or CUDA (M = 1) dequant-GEMV kernels; elsewhere dequantize + matmul.
* :class:`FP8Linear`        FP8 weights and activations (E4M3, or E5M2 for comparison), per-channel
                            weight scales and per-token activation scales: ``torch._scaled_mm`` on a GPU
                            that has FP8 tensor cores (sm_89+), an exact emulation elsewhere.

Every layer also has ``dequantized_weight()`` -> [N, K]: the weight it effectively multiplies by.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from miniinfer.quant.formats import float_format
from miniinfer.quant.packing import pack_int32, unpack_int32
from miniinfer.quant.quantize import quantize, quantize_per_token

__all__ = ["QuantLinear", "Int8Linear", "W8A8Linear", "GroupQuantLinear", "FP8Linear", "int_mm"]


class QuantLinear(nn.Module):
    """Common parts: sizes, an optional float bias, the bytes the weights take."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def weight_bytes(self) -> int:
        """Bytes of the quantized weight and its scales/zeros (not the bias)."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name != "bias")

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantLinear):
    """Weight-only int8, one scale (and zero point, asymmetric) per output channel."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 bias: torch.Tensor | None = None):
        super().__init__(qweight.shape[1], qweight.shape[0], bias)
        self.register_buffer("qweight", qweight)   # [N, K] int8 (symmetric) or uint8 (asymmetric)
        self.register_buffer("scale", scale)       # [N] float32
        self.register_buffer("zero", zero)         # [N] int32, or None

    @classmethod
    def from_linear(cls, linear: nn.Linear, symmetric: bool = True) -> Int8Linear:
        qt = quantize(linear.weight.detach(), 8, symmetric=symmetric)
        zero = None if qt.zero is None else qt.zero[:, 0]
        return cls(qt.q, qt.scale[:, 0].float(), zero, linear.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.qweight.to(torch.float32)
        if self.zero is not None:
            w = w - self.zero[:, None].float()
        return (w * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [K, N] -> exact int32 [M, N].

    ``torch._int_mm`` (cuBLAS int8 tensor cores on a GPU; also on the CPU) where its shape rules allow
    (on CUDA: M > 16, K and N multiples of 8; we pad M), else an int32 matmul: the same exact result."""
    M = a.shape[0]
    if hasattr(torch, "_int_mm"):
        if a.is_cuda:
            if a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0:
                padded = max(32, (M + 7) // 8 * 8)
                if padded != M:
                    a = F.pad(a, (0, 0, 0, padded - M))
                return torch._int_mm(a, b)[:M]
        else:
            try:
                return torch._int_mm(a, b)
            except RuntimeError:
                pass
    return a.to(torch.int32) @ b.to(torch.int32)


class W8A8Linear(QuantLinear):
    """int8 weights (symmetric, per output channel) × int8 activations (symmetric, per token).

    y[t, n] = s_x[t] · s_w[n] · Σ_k q_x[t, k] q_w[n, k]: the sum is exact in int32, both scales are
    applied once to the result. Per-token scales adapt to each token's own range; a token with one
    huge outlier feature still loses precision on its other features (what SmoothQuant addresses by
    moving scale from activations into weights, ``smooth`` here: x / s and w · s).
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 smooth: torch.Tensor | None = None):
        super().__init__(qweight.shape[1], qweight.shape[0], bias)
        self.register_buffer("qweight_t", qweight.t().contiguous())  # [K, N] int8: _int_mm's layout
        self.register_buffer("scale", scale)    # [N] float32
        self.register_buffer("smooth", smooth)  # [K] float32 or None

    @classmethod
    def from_linear(cls, linear: nn.Linear, smooth: torch.Tensor | None = None) -> W8A8Linear:
        w = linear.weight.detach().float()
        if smooth is not None:
            w = w * smooth[None, :]
        qt = quantize(w, 8, symmetric=True)
        return cls(qt.q, qt.scale[:, 0].float(), linear.bias, smooth)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.qweight_t.t().float() * self.scale[:, None]
        if self.smooth is not None:
            w = w / self.smooth[None, :]
        return w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.smooth is not None:
            x2 = x2 / self.smooth.to(x2.dtype)
        qx, sx = quantize_per_token(x2)
        acc = int_mm(qx, self.qweight_t)  # [T, N] int32
        y = (acc.float() * sx * self.scale[None, :]).to(x.dtype)
        return self._add_bias(y).reshape(*shape[:-1], self.out_features)


class GroupQuantLinear(QuantLinear):
    """``bits``-bit weights with a scale and zero point per group of ``group_size`` inputs (GPTQ layout).

    Buffers (K inputs, N outputs, G = K / group_size groups):

    * ``qweight`` int32 [K·bits/32, N]: values packed along K, 32/bits per word (2, 4, 8 bits);
      for bits that do not divide 32 (3), unpacked uint8 [K, N];
    * ``qzeros`` int32 [G, N·bits/32] (packed along N; uint8 [G, N] when unpacked): the zero points
      themselves (GPTQ "v2"; v1 checkpoints store zero − 1, converted in :mod:`miniinfer.quant.checkpoint`);
    * ``scales`` [G, N] in the compute dtype;
    * ``perm`` int64 [K] or None: with ``act_order`` GPTQ's groups are sets of inputs in Hessian order
      (``g_idx`` is not sorted). We sort the inputs by group once, here, so that every kernel sees
      contiguous groups, and gather ``x[..., perm]`` at run time instead.

    w[n, k] = scales[g, n] · (q[k, n] − zeros[g, n]) with g = k // group_size (after the permutation).
    """

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                 bias: torch.Tensor | None = None, g_idx: torch.Tensor | None = None):
        """q: [K, N] integers in [0, 2**bits); scales, zeros: [G, N]; g_idx: [K] group of each input
        (default k // group_size)."""
        K, N = q.shape
        super().__init__(K, N, bias)
        self.bits, self.group_size = bits, group_size
        self.backend = "auto"  # auto | torch | triton | cuda
        perm = None
        if g_idx is not None and not torch.equal(g_idx.cpu().long(), torch.arange(K) // group_size):
            perm = torch.argsort(g_idx.cpu().long(), stable=True).to(q.device)
            if not torch.equal(g_idx.cpu().long()[perm.cpu()], torch.arange(K) // group_size):
                raise ValueError("g_idx must give every group exactly group_size inputs")
            q = q[perm]
        self.register_buffer("perm", perm)
        self.packed = 32 % bits == 0 and K % (32 // bits) == 0
        if self.packed:
            self.register_buffer("qweight", pack_int32(q, bits, dim=0))
            self.register_buffer("qzeros", pack_int32(zeros, bits, dim=1) if N % (32 // bits) == 0
                                 else zeros.to(torch.uint8))
        else:
            self.register_buffer("qweight", q.to(torch.uint8))
            self.register_buffer("qzeros", zeros.to(torch.uint8))
        self.register_buffer("scales", scales)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, symmetric: bool = False,
                    dtype: torch.dtype | None = None) -> GroupQuantLinear:
        """Round-to-nearest quantization of ``linear`` (``group_size`` capped at K)."""
        w = linear.weight.detach()
        K = w.shape[1]
        g = min(group_size, K) if group_size else K
        qt = quantize(w.float(), bits, symmetric=symmetric, group_size=g)
        if symmetric:  # stored unsigned with zero point 2**(bits-1), as GPTQ checkpoints do
            q = qt.q.to(torch.int32) + 2 ** (bits - 1)
            zeros = torch.full_like(qt.scale, 2 ** (bits - 1), dtype=torch.int32)
        else:
            q, zeros = qt.q.to(torch.int32), qt.zero
        return cls(q.t().contiguous(), qt.scale.t().contiguous().to(dtype or w.dtype), zeros.t().contiguous(),
                   bits, g, linear.bias)

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [K, N] int32, zeros [G, N] int32) in the permuted input order."""
        if not self.packed:
            return self.qweight.to(torch.int32), self.qzeros.to(torch.int32)
        q = unpack_int32(self.qweight, self.bits, dim=0)
        zeros = unpack_int32(self.qzeros, self.bits, dim=1) if self.qzeros.dtype == torch.int32 \
            else self.qzeros.to(torch.int32)
        return q, zeros

    def _weight_kn(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight in storage order: [K, N] (inputs permuted when ``perm`` is set)."""
        q, zeros = self.unpacked()
        g = self.group_size
        scales = self.scales.float().repeat_interleave(g, dim=0)
        return ((q - zeros.repeat_interleave(g, dim=0)).float() * scales).to(dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w_kn = self._weight_kn(dtype)
        if self.perm is not None:
            w_kn = torch.empty_like(w_kn).index_copy_(0, self.perm, w_kn)
        return w_kn.t()

    def _zeros_packed(self) -> bool:
        return self.qzeros.dtype == torch.int32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        y = None
        if self.bits == 4 and self.packed and self._zeros_packed() and self.backend != "torch" \
                and (x.is_cuda or self.backend in ("triton", "cuda")):
            from miniinfer.kernels.int4_matmul import int4_matmul

            y = int4_matmul(x2, self.qweight, self.qzeros, self.scales, self.group_size,
                            backend="auto" if self.backend == "auto" else self.backend)
        if y is None:
            y = x2 @ self._weight_kn(x.dtype)
        return self._add_bias(y).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}, "
                f"act_order={self.perm is not None}")


def _has_fp8_matmul(device: torch.device) -> bool:
    return (device.type == "cuda" and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (8, 9))


class FP8Linear(QuantLinear):
    """FP8 weights (one float32 scale per output channel) × FP8 activations (one scale per token).

    Scales put each row's largest magnitude at the format's maximum (448 for E4M3): FP8 has a fixed
    relative precision, so a scale only has to keep values out of overflow and away from the
    subnormals. On sm_89+ GPUs (E4M3): ``torch._scaled_mm`` with row-wise scales, accumulating in
    float32; elsewhere the same rounding emulated (cast to fp8 and back), then a float matmul.
    """

    def __init__(self, weight_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 fmt: str = "e4m3"):
        super().__init__(weight_fp8.shape[1], weight_fp8.shape[0], bias)
        self.fmt = float_format(fmt)
        self.register_buffer("weight_fp8", weight_fp8)  # [N, K]
        self.register_buffer("scale", scale)            # [N] float32

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "e4m3") -> FP8Linear:
        f = float_format(fmt)
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / f.max).clamp_min(1e-12)
        return cls((w / scale[:, None]).to(f.dtype), scale, linear.bias, fmt)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight_fp8.float() * self.scale[:, None]).to(dtype)

    def _activation(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sx = (x2.float().abs().amax(dim=1, keepdim=True) / self.fmt.max).clamp_min(1e-12)  # [T, 1]
        return (x2.float() / sx).to(self.fmt.dtype), sx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        qx, sx = self._activation(x2)
        K, N = self.in_features, self.out_features
        if (self.fmt.name == "e4m3" and _has_fp8_matmul(x.device) and K % 16 == 0 and N % 16 == 0
                and x.dtype == torch.bfloat16):
            # cuBLASLt wants both dims of the left operand divisible by 16: pad the tokens (zero rows).
            M = qx.shape[0]
            pad = -M % 16
            if pad:
                qx = torch.cat([qx, qx.new_zeros(pad, K)])
                sx = torch.cat([sx, sx.new_ones(pad, 1)])
            y = torch._scaled_mm(qx, self.weight_fp8.t(), scale_a=sx, scale_b=self.scale[None, :],
                                 out_dtype=x.dtype)[:M]
        else:
            y = ((qx.float() * sx) @ self.dequantized_weight(torch.float32).t()).to(x.dtype)
        return self._add_bias(y).reshape(*shape[:-1], N)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fmt={self.fmt.name}"
