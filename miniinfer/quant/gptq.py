"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", 2023): quantize a weight matrix one input column at a time, and after each column
spread its rounding error over the columns not yet quantized, so that the layer's *output* on real
inputs changes as little as possible.

The layer computes ``y = W x`` (W: [N, K]). Over calibration inputs X ([n, K]) the output error of a
changed weight is ``‖(W − Ŵ) Xᵀ‖² = Σ_rows δ H δᵀ`` with the Hessian ``H = 2 XᵀX / n`` ([K, K], the
same for every row). Quantizing column j moves it by ``e_j = w_j − q_j``; the best correction of
the remaining columns F (Optimal Brain Surgeon) is

    W[:, F] −= (e_j / [H_F⁻¹]_jj) · [H_F⁻¹]_{j, F}

after which column j is removed from the inverse Hessian:  ``H_F⁻¹ ← H_F⁻¹ − H⁻¹_{:,j} H⁻¹_{j,:} / H⁻¹_jj``.

Three tricks make that fast and stable (all in :func:`gptq_quantize`):

* Cholesky: the rows ``[H_F⁻¹]_{j, F} / sqrt([H_F⁻¹]_jj)`` for every step j are exactly the rows of
  the upper Cholesky factor U of H⁻¹ (``H⁻¹ = Uᵀ U``), so one factorisation replaces all the
  rank-one downdates: ``W[:, j:] −= ((w_j − q_j) / U_jj) · U[j, j:]``;
* lazy batches: columns are processed in blocks of B (128); inside a block the updates touch only
  the block, and the rest of the matrix gets the block's accumulated error in one matmul;
* ``act_order``: columns with large Hessian diagonals (inputs with large activations) go first, while
  many columns are still free to absorb their error. Groups are then formed in that order, and
  ``g_idx[k]`` records the group of input k.

Dampening (``percdamp`` × mean diagonal added to H) keeps H invertible when some inputs are always 0.
:func:`gptq_reference` is the same algorithm written the straightforward way in float64 (explicit
inverse, downdate after every column), used by the tests as an oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miniinfer.quant.quantize import compute_qparams

__all__ = ["GPTQResult", "gptq_quantize", "gptq_reference", "prepare_hessian", "quantize_column",
           "group_params", "gptq_column_update"]


@dataclass
class GPTQResult:
    """q: [N, K] int32 in [0, 2**bits) (original input order); scales, zeros: [N, G]; g_idx: [K] int32;
    weight: [N, K] float, the dequantized result ``scales[n, g_idx[k]] · (q − zeros)``."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    weight: torch.Tensor


def group_params(w_group: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of one group of columns, w_group: [N, g] -> ([N], [N]); symmetric groups get the
    unsigned zero point 2**(bits−1) (GPTQ's storage convention), asymmetric ones their own."""
    scale, zero = compute_qparams(w_group.unsqueeze(1), bits, symmetric)
    scale = scale[:, 0].to(w_group.dtype)
    if symmetric:
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    return scale, zero[:, 0].to(w_group.dtype)


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round one column to the grid: w, scale, zero: [N] -> the *dequantized* value ``scale · (q − zero)``."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return scale * (q - zero)


def gptq_column_update(W: torch.Tensor, U: torch.Tensor, j: int, q_j: torch.Tensor) -> torch.Tensor:
    """The GPTQ update after quantizing column j (the chapter's exercise): W[:, j:] −= err ⊗ U[j, j:] with
    err = (W[:, j] − q_j) / U[j, j]. W: [N, K] updated in place (column j becomes q_j); U: [K, K] upper
    Cholesky factor of H⁻¹. Returns err [N]."""
    err = (W[:, j] - q_j) / U[j, j]
    W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return err


def prepare_hessian(H: torch.Tensor, W: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of H and W with dead inputs (H_kk = 0: the input was always 0) neutralised and H damped."""
    H, W = H.clone(), W.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return H, W


def _block_size(group_size: int, blocksize: int) -> int:
    # A group must never straddle a block boundary partway (its scale is taken from the current,
    # fully updated columns): blocks a multiple of the group size, or groups a multiple of blocks.
    if blocksize % group_size == 0 or group_size % blocksize == 0:
        return blocksize
    return group_size


def _result(Q: torch.Tensor, scales: list, zeros: list, g_of_pos: torch.Tensor, perm: torch.Tensor | None,
            bits: int) -> GPTQResult:
    S, Z = torch.stack(scales, dim=1), torch.stack(zeros, dim=1)  # [N, G]
    g_idx = g_of_pos if perm is None else torch.empty_like(g_of_pos).index_copy_(0, perm, g_of_pos)
    if perm is not None:
        Q = torch.empty_like(Q).index_copy_(1, perm, Q)
    q = torch.clamp(torch.round(Q / S[:, g_idx]) + Z[:, g_idx], 0, 2**bits - 1).to(torch.int32)
    return GPTQResult(q, S, Z.to(torch.int32), g_idx.to(torch.int32), Q)


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                  symmetric: bool = False, act_order: bool = False, blocksize: int = 128,
                  percdamp: float = 0.01) -> GPTQResult:
    """GPTQ of W: [N, K] against the Hessian H: [K, K] (float32 or float64; computed in W's dtype, at
    least float32). ``group_size`` None: one group per row."""
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    N, K = W.shape
    g = K if not group_size else min(group_size, K)
    if K % g:
        raise ValueError(f"K ({K}) must be a multiple of group_size ({g})")
    H, W = prepare_hessian(H.to(dtype), W.to(dtype), percdamp)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    # U: upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U): its row j holds every update of step j.
    L = torch.linalg.cholesky(H)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    Q = torch.zeros_like(W)
    scales, zeros = [], []
    B = _block_size(g, blocksize)
    scale = zero = None
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1, Err1, U1 = W[:, i1:i2].clone(), torch.zeros(N, i2 - i1, dtype=dtype, device=W.device), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # a new group: its scale from the current (already corrected) columns
                current = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                scale, zero = group_params(current, bits, symmetric)
                scales.append(scale)
                zeros.append(zero)
            q = quantize_column(W1[:, i], scale, zero, bits)
            Q[:, col] = q
            Err1[:, i] = gptq_column_update(W1, U1, i, q)
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # the block's errors reach the rest of the matrix at once
    g_of_pos = torch.arange(K, device=W.device) // g
    return _result(Q, scales, zeros, g_of_pos, perm, bits)


@torch.no_grad()
def gptq_reference(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                   symmetric: bool = False, act_order: bool = False, percdamp: float = 0.01) -> GPTQResult:
    """The same algorithm the straightforward way, float64: an explicit inverse Hessian, the Optimal Brain
    Surgeon update of every remaining column, then the downdate of H⁻¹, column after column."""
    N, K = W.shape
    g = K if not group_size else min(group_size, K)
    H, W = prepare_hessian(H.double(), W.double(), percdamp)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    scales, zeros = [], []
    for j in range(K):
        if j % g == 0:
            scale, zero = group_params(W[:, j:j + g], bits, symmetric)
            scales.append(scale)
            zeros.append(zero)
        q = quantize_column(W[:, j], scale, zero, bits)
        Q[:, j] = q
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j + 1:] -= err[:, None] * Hinv[j, j + 1:][None, :]
        W[:, j] = q
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]  # remove input j from the problem
    return _result(Q, scales, zeros, torch.arange(K) // g, perm, bits)
