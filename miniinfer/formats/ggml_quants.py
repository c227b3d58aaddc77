"""GGML block quantization, the parts the ``gguf`` package does not give us.

A GGML quantized tensor is a sequence of blocks along each row (``K`` inputs per row, the row length a
multiple of the block size). The ones we read into our own kernels:

* **Q8_0**: 32 weights per block, ``d`` (float16) + 32 int8 ``q``: ``w = d · q``. 34 bytes.
* **Q4_0**: 32 weights per block, ``d`` (float16) + 16 bytes of nibbles: ``w = d · (q − 8)``, weights 0–15 in
  the low nibbles, 16–31 in the high ones. 18 bytes.

Both are exactly a symmetric group quantization with group size 32 (zero point 128 and 8 when stored
unsigned), so they map to :class:`miniinfer.quant.linear.GroupQuantLinear` without any rounding.

* **Q4_K**: 256 weights per super-block in 8 sub-blocks of 32; ``d``, ``dmin`` (float16) and 6-bit
  per-sub-block scales and mins: ``w = d·sc_j · q − dmin·m_j``. 144 bytes. The ``gguf`` package reads it
  (dequantizes) but has no quantizer, so :func:`quantize_q4_k` is ours: plain round-to-nearest per sub-block
  (llama.cpp's own quantizer searches the scale and min for a lower error; ours is simpler and a little worse).
"""

from __future__ import annotations

import numpy as np

__all__ = ["unpack_q8_0", "unpack_q4_0", "quantize_q4_k"]

QK = 32
QK_K = 256


def unpack_q8_0(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 bytes [rows, cols/32·34] -> (q int8 [rows, cols], d float32 [rows, cols/32])."""
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // QK, 2 + QK)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
    return q, d


def unpack_q4_0(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 bytes [rows, cols/32·18] -> (q uint8 in 0..15 [rows, cols], d float32 [rows, cols/32])."""
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // QK, 2 + QK // 2)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., 2:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # weights 0..15, then 16..31
    return q.reshape(rows, cols), d


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """float [rows, cols] (cols a multiple of 256) -> Q4_K bytes [rows, cols/256·144] (round-to-nearest)."""
    rows, cols = w.shape
    x = w.astype(np.float32).reshape(-1, 8, QK)  # [n_blocks, sub-block, 32]
    n = x.shape[0]
    lo = np.minimum(x.min(axis=-1), 0.0)  # [n, 8]: the min is stored as a non-negative offset
    hi = x.max(axis=-1)
    scale = np.maximum(hi - lo, 0.0) / 15.0
    offset = -lo
    d = scale.max(axis=-1, keepdims=True) / 63.0  # super-block scales: the 6-bit codes reach 63
    dmin = offset.max(axis=-1, keepdims=True) / 63.0
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)  # quantize with the stored (rounded) values
    d32, dmin32 = d16.astype(np.float32), dmin16.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.rint(scale / d32), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dmin32 > 0, np.rint(offset / dmin32), 0).clip(0, 63).astype(np.uint8)
        step = (d32 * sc)[..., None]  # [n, 8, 1]
        q = np.where(step > 0, np.rint((x + (dmin32 * m)[..., None]) / step), 0).clip(0, 15).astype(np.uint8)
    scales = np.empty((n, 12), np.uint8)
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    q = q.reshape(n, 4, 2, QK)  # 64-weight chunks: sub-block 2c in the low nibbles, 2c+1 in the high ones
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    out = np.concatenate([d16.view(np.uint8), dmin16.view(np.uint8), scales, qs], axis=-1)
    return out.reshape(rows, cols // QK_K * 144)
