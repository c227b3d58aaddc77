"""Number formats for quantized weights and activations: what each can hold, and how finely.

An integer format with ``b`` bits holds ``2**b`` evenly spaced levels; a scale maps them onto the
real range of the tensor (``x ≈ scale · (q − zero)``), so the spacing is the same everywhere: one
scale step. A float format (FP8) spends bits on an exponent instead, so its levels are dense near
zero and sparse far from it: the relative spacing is what stays constant.

* int8  signed: −128 … 127;  unsigned (asymmetric with a zero point): 0 … 255
* int4  signed: −8 … 7;      unsigned: 0 … 15
* FP8 E4M3 (``float8_e4m3fn``): 4 exponent bits, 3 mantissa bits, max ±448, no infinities;
  the format for weights and activations of the forward pass (more precision).
* FP8 E5M2 (``float8_e5m2``): 5 exponent bits, 2 mantissa bits, max ±57344 (IEEE-like, with inf);
  more range, less precision: the format for gradients in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["IntFormat", "FloatFormat", "int_format", "FP8_E4M3", "FP8_E5M2", "FLOAT_FORMATS", "float_format",
           "representable_values"]


@dataclass(frozen=True)
class IntFormat:
    """``bits``-bit integers, signed (symmetric quantization) or unsigned (asymmetric, with a zero point)."""

    bits: int
    signed: bool

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    @property
    def levels(self) -> int:
        return 2 ** self.bits

    @property
    def name(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.bits}"


def int_format(bits: int, symmetric: bool = True) -> IntFormat:
    """The integer range a quantizer uses: signed for symmetric, unsigned (0 … 2**bits − 1) for asymmetric."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    return IntFormat(bits, signed=symmetric)


@dataclass(frozen=True)
class FloatFormat:
    """An 8-bit float format: its torch dtype, exponent/mantissa bits and limits."""

    name: str
    dtype: torch.dtype
    exponent_bits: int
    mantissa_bits: int

    @property
    def max(self) -> float:
        return float(torch.finfo(self.dtype).max)

    @property
    def smallest_normal(self) -> float:
        return float(torch.finfo(self.dtype).smallest_normal)

    @property
    def smallest_subnormal(self) -> float:
        return self.smallest_normal * 2.0 ** -self.mantissa_bits

    @property
    def relative_spacing(self) -> float:
        """Gap between 1 and the next value: the worst relative rounding error is half of it."""
        return 2.0 ** -self.mantissa_bits


FP8_E4M3 = FloatFormat("e4m3", torch.float8_e4m3fn, 4, 3)
FP8_E5M2 = FloatFormat("e5m2", torch.float8_e5m2, 5, 2)
FLOAT_FORMATS = {"e4m3": FP8_E4M3, "e5m2": FP8_E5M2}


def float_format(name: str) -> FloatFormat:
    if name not in FLOAT_FORMATS:
        raise ValueError(f"fp8 format must be one of {sorted(FLOAT_FORMATS)}, got {name!r}")
    return FLOAT_FORMATS[name]


def representable_values(fmt: IntFormat | FloatFormat) -> torch.Tensor:
    """Every finite value of the format, sorted (float64): for an int format the integers qmin … qmax;
    for FP8, all 256 bit patterns reinterpreted, NaN and inf dropped."""
    if isinstance(fmt, IntFormat):
        return torch.arange(fmt.qmin, fmt.qmax + 1, dtype=torch.float64)
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fmt.dtype).to(torch.float64)
    return values[torch.isfinite(values)].unique()
