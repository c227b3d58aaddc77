"""Checks for chapter 11: group quantize/dequantize, int4 packing, the GPTQ column update, STE fake-quant.

Oracles: the package's :mod:`miniinfer.quant` (RTN, packing, GPTQ) and, independently, float64
formulas written out here; the error bound of round-to-nearest (half a scale step per element) is
checked on the student's own output, so a different but valid tie-breaking still passes.
"""

from __future__ import annotations

import random

import torch

from miniinfer.course.checking import assert_close, call_student, exercise, fail
from miniinfer.quant.gptq import gptq_reference
from miniinfer.quant.packing import pack_int4 as reference_pack
from miniinfer.quant.quantize import quantize as reference_quantize
from miniinfer.quant.quantize import quantize_dequantize

__all__ = ["quantize_groups", "dequantize_groups", "pack_int4", "gptq_column_update", "fake_quantize_ste"]


def _weights(rng: random.Random, N: int, K: int) -> torch.Tensor:
    w = torch.randn(N, K) * torch.exp(torch.randn(K) * 0.5) * 0.05
    if rng.random() < 0.5:
        w[rng.randrange(N), rng.randrange(K)] = 0.5  # an outlier
    if rng.random() < 0.3:
        w[rng.randrange(N)] = torch.rand(K) * 0.1   # an all-positive row: asymmetric ranges must include 0
    return w


def _as_tensor(value, what: str, case: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        fail(f"{what}: expected a torch.Tensor, got {type(value).__name__}", case=case)
    return value


def _cases(rng: random.Random):
    for bits, symmetric in ((8, True), (8, False), (4, True), (4, False), (3, False), (2, True)):
        N, g = rng.randint(1, 9), rng.choice([8, 16, 24, 32])
        K = g * rng.randint(1, 4)
        yield bits, symmetric, N, K, g


# ------------------------------------------------------------------------------------------------
# 11.1 quantize with group-wise scales
# ------------------------------------------------------------------------------------------------

@exercise("11.1", "group-wise quantization, symmetric and asymmetric")
def quantize_groups(fn) -> int:
    """Random weights (outliers, all-positive rows), bits 2 … 8, groups of 8 … 32, per-row (g = K) too.
    Scales and zero points must match RTN's; the integers may differ from ours only at exact ties, and
    every element must be within half a step of the weight."""
    rng = random.Random()
    cases = 0
    for bits, symmetric, N, K, g in list(_cases(rng)) + [(4, False, 5, 40, 40)]:
        w = _weights(rng, N, K)
        case = f"w of shape ({N}, {K}), bits={bits}, group_size={g}, symmetric={symmetric}"
        got = call_student(fn, w.clone(), bits, g, symmetric, case=case)
        if not isinstance(got, tuple) or len(got) != 3:
            fail(f"expected a tuple (q, scale, zero), got {type(got).__name__}", case=case)
        q, scale, zero = (_as_tensor(t, name, case) for t, name in zip(got, ("q", "scale", "zero")))
        ref = reference_quantize(w, bits, symmetric=symmetric, group_size=g)
        G = K // g
        if tuple(q.shape) != (N, K) or tuple(scale.shape) != (N, G) or tuple(zero.shape) != (N, G):
            fail(f"expected q [{N}, {K}], scale and zero [{N}, {G}]; got q {tuple(q.shape)}, scale "
                 f"{tuple(scale.shape)}, zero {tuple(zero.shape)}", case=case,
                 hint="view w as [N, K // group_size, group_size] and reduce over the last dim")
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
        if int(q.min()) < lo or int(q.max()) > hi:
            fail(f"q must lie in [{lo}, {hi}] for {'signed' if symmetric else 'unsigned'} {bits}-bit integers; got "
                 f"[{int(q.min())}, {int(q.max())}]", case=case, hint="clamp after rounding")
        assert_close(scale.float(), ref.scale.float(), what="scale", case=case, atol=1e-9, rtol=1e-5,
                     check_dtype=False,
                     hint="symmetric: max|w| / (2**(bits-1) - 1); asymmetric: (max - min) / (2**bits - 1), with the "
                          "range widened to include 0 (min ≤ 0 ≤ max)")
        expected_zero = torch.zeros_like(ref.scale, dtype=torch.int32) if symmetric else ref.zero
        if (zero.to(torch.int64) - expected_zero.to(torch.int64)).abs().max() > (0 if symmetric else 1):
            fail(f"zero points differ: expected {expected_zero.tolist()}, got {zero.tolist()}", case=case,
                 hint="symmetric: all zeros; asymmetric: round(-min / scale)")
        deq = (q.double() - zero.double().repeat_interleave(g, 1)) * scale.double().repeat_interleave(g, 1)
        err = (deq - w.double()).abs()
        bound = scale.double().repeat_interleave(g, 1) / 2 * (1 + 1e-4) + 1e-9
        if (err > bound).any():
            n, k = (int(i) for i in (err - bound).argmax().item().__divmod__(K))
            fail(f"element ({n}, {k}): w = {w[n, k].item():.6g} comes back as {deq[n, k].item():.6g}, further than "
                 f"half a step ({bound[n, k].item() / 2:.3g}) away", case=case,
                 hint="q = clamp(round(w / scale) + zero, qmin, qmax): round to the nearest level")
        if (q.to(torch.int64) != ref.q.to(torch.int64)).float().mean() > 0.01:
            fail("more than 1 % of the integers differ from round-to-nearest", case=case)
        cases += 1
    return cases


# ------------------------------------------------------------------------------------------------
# 11.2 dequantize
# ------------------------------------------------------------------------------------------------

@exercise("11.2", "group-wise dequantization")
def dequantize_groups(fn) -> int:
    """Random integers, scales and zero points (signed with zero 0, unsigned with zero points); compared
    with scale · (q − zero) in float64."""
    rng = random.Random()
    cases = 0
    for bits, symmetric, N, K, g in _cases(rng):
        G = K // g
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
        q = torch.randint(lo, hi + 1, (N, K), dtype=torch.int32)
        scale = torch.rand(N, G) * 0.01 + 1e-4
        zero = torch.zeros(N, G, dtype=torch.int32) if symmetric else torch.randint(0, hi + 1, (N, G),
                                                                                     dtype=torch.int32)
        case = f"q of shape ({N}, {K}) in [{lo}, {hi}], group_size={g}, symmetric={symmetric}"
        got = call_student(fn, q.clone(), scale.clone(), zero.clone(), g, case=case)
        expected = (q.double() - zero.double().repeat_interleave(g, 1)) * scale.double().repeat_interleave(g, 1)
        assert_close(got, expected.float(), what="dequantized weight", case=case, atol=1e-7, rtol=1e-6,
                     hint="w[n, k] = scale[n, k // g] · (q[n, k] − zero[n, k // g]), as float32; "
                          "repeat_interleave(g, dim=1) spreads a group's scale over its columns")
        cases += 1
    return cases


# ------------------------------------------------------------------------------------------------
# 11.3 int4 packing
# ------------------------------------------------------------------------------------------------

@exercise("11.3", "pack and unpack int4")
def pack_int4(pack_fn, unpack_fn) -> int:
    """Random 4-bit values of shapes [..., K] with K even; the byte layout must be ours (even index in the
    low nibble) and unpack must invert pack exactly."""
    rng = random.Random()
    cases = 0
    for shape in ((1, 2), (3, 10), (2, 3, 38), (rng.randint(1, 5), 2 * rng.randint(1, 40))):
        q = torch.randint(0, 16, shape, dtype=torch.uint8)
        case = f"q of shape {shape}: {q.flatten()[:8].tolist()} …"
        packed = call_student(pack_fn, q.clone(), case=case)
        expected = reference_pack(q)
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
            fail(f"pack_int4 must return a uint8 tensor, got {getattr(packed, 'dtype', type(packed).__name__)}",
                 case=case)
        if tuple(packed.shape) != tuple(expected.shape):
            fail(f"packed shape: expected {tuple(expected.shape)}, got {tuple(packed.shape)}", case=case,
                 hint="two values per byte along the last dim")
        if not torch.equal(packed, expected):
            i = int((packed != expected).flatten().nonzero()[0])
            fail(f"byte {i}: expected {int(expected.flatten()[i]):#04x}, got {int(packed.flatten()[i]):#04x}",
                 case=case, hint="byte i = q[..., 2i] | (q[..., 2i + 1] << 4): the even index in the low nibble")
        unpacked = call_student(unpack_fn, expected.clone(), case=case)
        if not isinstance(unpacked, torch.Tensor) or tuple(unpacked.shape) != tuple(q.shape) \
                or not torch.equal(unpacked.to(torch.int64), q.to(torch.int64)):
            fail("unpack_int4(pack_int4(q)) does not give q back", case=case,
                 hint="low = packed & 0xF, high = packed >> 4; interleave them: stack([low, high], -1).flatten(-2)")
        cases += 1
    return cases


# ------------------------------------------------------------------------------------------------
# 11.4 the GPTQ column update
# ------------------------------------------------------------------------------------------------

def _student_gptq(update_fn, W: torch.Tensor, H: torch.Tensor, bits: int, g: int, case: str) -> torch.Tensor:
    """GPTQ (no act_order, no blocks) in float64 with the student's update; -> the quantized weight."""
    from miniinfer.quant.gptq import group_params, prepare_hessian, quantize_column

    H, W = prepare_hessian(H, W, 0.01)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    K = W.shape[1]
    for j in range(K):
        if j % g == 0:
            scale, zero = group_params(W[:, j:j + g], bits, False)
        q = quantize_column(W[:, j], scale, zero, bits)
        Q[:, j] = q
        before = W[:, :j].clone()
        err = call_student(update_fn, W, U, j, q.clone(), case=case)
        if not torch.equal(W[:, :j], before):
            fail(f"step j = {j} changed columns left of j (already quantized)", case=case,
                 hint="update W[:, j:] only")
        if not isinstance(err, torch.Tensor) or tuple(err.shape) != (W.shape[0],):
            fail(f"step j = {j}: return the scaled error err = (W[:, j] − q_j) / U[j, j], shape [{W.shape[0]}]; got "
                 f"{getattr(err, 'shape', type(err).__name__)}", case=case)
    return Q


@exercise("11.4", "the GPTQ column update")
def gptq_column_update(fn) -> int:
    """One step on a random W and upper Cholesky factor U (the exact answer, in place), then whole GPTQ
    runs in float64 with your update, compared with a straightforward implementation of the algorithm
    (explicit inverse Hessian, Optimal Brain Surgeon update, downdate)."""
    rng = random.Random()
    N, K = rng.randint(2, 7), rng.randint(5, 12)
    W = torch.randn(N, K, dtype=torch.float64)
    A = torch.randn(K, K, dtype=torch.float64)
    U = torch.linalg.cholesky(A @ A.T + K * torch.eye(K, dtype=torch.float64), upper=True)
    j = rng.randrange(K - 1)
    q_j = torch.round(W[:, j] * 4) / 4
    expected_W = W.clone()
    err = (expected_W[:, j] - q_j) / U[j, j]
    expected_W[:, j:] -= err[:, None] * U[j, j:][None, :]
    case = f"one step: W [{N}, {K}], j = {j}"
    W_student = W.clone()
    got_err = call_student(fn, W_student, U.clone(), j, q_j.clone(), case=case)
    assert_close(got_err, err, what="returned err", case=case, atol=1e-12, rtol=1e-10,
                 hint="err = (W[:, j] − q_j) / U[j, j]")
    assert_close(W_student, expected_W, what="W after the update (in place)", case=case, atol=1e-12, rtol=1e-10,
                 hint="W[:, j:] −= err[:, None] · U[j, j:][None, :]  (column j itself becomes q_j)")
    cases = 1
    for bits, (N, K, g) in ((4, (5, 24, 8)), (3, (7, 32, 16))):
        X = torch.randn(4 * K, K, dtype=torch.float64) * torch.rand(K, dtype=torch.float64) * 2
        X = X + 0.5 * X[:, :1]
        H = 2 * X.T @ X / X.shape[0]
        W = torch.randn(N, K, dtype=torch.float64)
        case = f"GPTQ of W [{N}, {K}], {bits} bits, group_size {g}"
        got = _student_gptq(fn, W.clone(), H, bits, g, case)
        expected = gptq_reference(W, H, bits, g, symmetric=False, act_order=False, percdamp=0.01).weight
        assert_close(got, expected, what="GPTQ's quantized weight with your update", case=case, atol=1e-9,
                     rtol=1e-9, hint="the update must change every column from j on, using row j of U")
        cases += 1
    return cases


# ------------------------------------------------------------------------------------------------
# 11.5 straight-through fake quantization
# ------------------------------------------------------------------------------------------------

@exercise("11.5", "fake quantization with a straight-through estimator")
def fake_quantize_ste(fake_fn, step_fn) -> int:
    """``fake_fn``'s value must be RTN's (asymmetric, groups) and leave w alone; ``step_fn`` (one QAT step:
    fake-quantized forward, MSE loss, backward, SGD update, all in your own process) must move the float
    weights exactly as the straight-through gradient does: a gradient stopped by the rounding moves
    nothing, a gradient of the rounding's slope moves them wrongly."""
    rng = random.Random()
    cases = 0
    for bits, g, (N, K) in ((4, 16, (3, 32)), (3, 8, (5, 24)), (8, 32, (2, 64))):
        w = _weights(rng, N, K)
        case = f"w of shape ({N}, {K}), bits={bits}, group_size={g}"
        out = call_student(fake_fn, w.clone(), bits, g, case=case)
        expected = quantize_dequantize(w, bits, symmetric=False, group_size=g)
        if not isinstance(out, torch.Tensor):
            fail(f"expected a tensor, got {type(out).__name__}", case=case)
        assert_close(out.detach(), expected, what="forward value", case=case, atol=1e-7, rtol=1e-5,
                     hint="the value must be dequantize(quantize(w)): what the int model computes with")
        # One QAT step, computed in the student's process (autograd does not cross to the checker).
        x, target, lr = torch.randn(7, K), torch.randn(7, N) * 0.1, 0.05
        step_case = f"{case}; qat_step(w, x [7, {K}], target [7, {N}], lr={lr})"
        new_w = call_student(step_fn, w.clone(), x, target, bits, g, lr, case=step_case)
        w_ref = w.clone().requires_grad_(True)
        wq = w_ref + (quantize_dequantize(w_ref.detach(), bits, symmetric=False, group_size=g) - w_ref).detach()
        ((x @ wq.T - target) ** 2).mean().backward()
        expected_w = (w - lr * w_ref.grad).detach()
        if isinstance(new_w, torch.Tensor) and tuple(new_w.shape) == tuple(w.shape) and torch.equal(new_w, w):
            fail("qat_step returned w unchanged: no gradient reached the float weights", case=step_case,
                 hint="the rounding has zero gradient: fake_quantize_ste must return w + (w_q − w).detach(), "
                      "and qat_step must call backward on a loss computed from it")
        assert_close(new_w, expected_w, what="w after one QAT step", case=step_case, atol=1e-6, rtol=1e-5,
                     hint="straight-through: d loss / d w = d loss / d w_q (the rounding counts as the identity); "
                          "update w − lr · w.grad")
        cases += 1
    return cases
