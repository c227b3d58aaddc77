"""Quantization (chapter 11): number formats, round-to-nearest, GPTQ, QAT, quantized linear layers."""

from miniinfer.quant.formats import (
           FP8_E4M3,
           FP8_E5M2,
           FloatFormat,
           IntFormat,
           int_format,
           representable_values,
)
from miniinfer.quant.gptq import GPTQResult, gptq_quantize, gptq_reference
from miniinfer.quant.linear import FP8Linear, GroupQuantLinear, Int8Linear, QuantLinear, W8A8Linear
from miniinfer.quant.packing import pack_int4, pack_int32, unpack_int4, unpack_int32
from miniinfer.quant.quantize import (
           QuantizedTensor,
           dequantize,
           quantize,
           quantize_dequantize,
           quantize_per_token,
)

__all__ = ["FP8_E4M3", "FP8_E5M2", "FloatFormat", "IntFormat", "int_format", "representable_values",
           "GPTQResult", "gptq_quantize", "gptq_reference",
           "FP8Linear", "GroupQuantLinear", "Int8Linear", "QuantLinear", "W8A8Linear",
           "pack_int4", "pack_int32", "unpack_int4", "unpack_int32",
           "QuantizedTensor", "dequantize", "quantize", "quantize_dequantize", "quantize_per_token"]
