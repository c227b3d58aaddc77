"""Chapter 11's checks: the solution's answers pass, the chapter's stubs say "not implemented yet", and
wrong answers fail with a message that names the problem (a symmetric range that forgets the sign
bit, an asymmetric range not widened to 0, a swapped nibble order, a GPTQ update that skips column j,
a fake quantizer whose gradient is zero)."""

from __future__ import annotations

import pytest
import torch

from miniinfer.course import CheckFailed, NotImplementedYet
from miniinfer.course.check import ch11_quantization as checks
from miniinfer.course.notebooks import chapters_dir, solutions_dir
from miniinfer.quant.quantize import quantize_dequantize
from tests.chapter_answers import exercise_answers

CHAPTER = "11_quantization"
EXERCISES = {"quantize_groups": ("quantize_groups",), "dequantize_groups": ("dequantize_groups",),
             "pack_int4": ("pack_int4", "unpack_int4"), "gptq_column_update": ("gptq_column_update",),
             "fake_quantize_ste": ("fake_quantize_ste", "qat_step")}


def _answers(path) -> dict:
    return exercise_answers(path, "import torch\nfrom miniinfer.quant import quantize_dequantize\n")


@pytest.mark.parametrize("check_name", list(EXERCISES))
def test_solution_passes_and_stub_is_not_implemented(check_name):
    solution, stub = _answers(solutions_dir() / f"{CHAPTER}.py"), _answers(chapters_dir() / f"{CHAPTER}.py")
    getattr(checks, check_name)(*(solution[f] for f in EXERCISES[check_name]))
    with pytest.raises(NotImplementedYet, match="not implemented yet"):
        getattr(checks, check_name)(*(stub[f] for f in EXERCISES[check_name]))


def _sym_without_sign_bit(w, bits, g, symmetric):
    ns = _answers(solutions_dir() / f"{CHAPTER}.py")
    q, scale, zero = ns["quantize_groups"](w, bits, g, symmetric)
    if symmetric:
        scale = scale * (2 ** (bits - 1) - 1) / (2**bits - 1)  # max|w| / (2**b − 1): half the levels unused
        q = torch.round(w.view(*scale.shape, g) / scale[..., None]).view_as(q).clamp(-(2 ** (bits - 1)),
                                                                                       2 ** (bits - 1) - 1)
    return q.to(torch.int32), scale, zero


def _asym_not_widened(w, bits, g, symmetric):
    N, K = w.shape
    groups = w.view(N, K // g, g)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    zero = torch.round(-lo / scale).to(torch.int32)
    q = (torch.round(groups / scale[..., None]) + zero[..., None]).clamp(0, 2**bits - 1)
    if symmetric:
        return _sym_without_sign_bit(w, bits, g, symmetric)
    return q.view(N, K).to(torch.int32), scale, zero


def _swapped_nibbles(q):
    q = q.to(torch.uint8)
    return (q[..., 0::2] << 4) | q[..., 1::2]


def _skips_column_j(W, U, j, q_j):
    err = (W[:, j] - q_j) / U[j, j]
    W[:, j + 1:] -= err[:, None] * U[j, j + 1:][None, :]
    return err


def _fake_quant(w, bits, g):
    return quantize_dequantize(w, bits, symmetric=False, group_size=g)


def _step_without_ste(w, x, target, bits, g, lr):
    """Rounding inside autograd's view: its gradient is zero, so nothing moves."""
    w = w.clone().requires_grad_(True)
    scale = (w.detach().abs().amax() / 7)
    wq = torch.round(w / scale) * scale
    ((x @ wq.T - target) ** 2).mean().backward()
    return (w - lr * w.grad).detach()


def _step_on_float_weights(w, x, target, bits, g, lr):
    """Gradient of the float layer, not of the fake-quantized one."""
    w = w.clone().requires_grad_(True)
    ((x @ w.T - target) ** 2).mean().backward()
    return (w - lr * w.grad).detach()


WRONG = [
    ("quantize_groups", (_sym_without_sign_bit,), "scale"),
    ("quantize_groups", (_asym_not_widened,), "scale|zero|half a step"),
    ("pack_int4", (_swapped_nibbles, lambda p: torch.stack([p & 15, p >> 4], -1).flatten(-2)), "byte"),
    ("gptq_column_update", (_skips_column_j,), "W after the update"),
    ("fake_quantize_ste", (_fake_quant, _step_without_ste), "unchanged"),
    ("fake_quantize_ste", (_fake_quant, _step_on_float_weights), "after one QAT step"),
    ("dequantize_groups", (lambda q, s, z, g: q.float() * s.repeat_interleave(g, 1),), "dequantized"),
]


@pytest.mark.parametrize("name, wrong, message", WRONG, ids=[f"{w[0]}-{i}" for i, w in enumerate(WRONG)])
def test_wrong_answers_fail_with_a_message(name, wrong, message):
    with pytest.raises(CheckFailed, match=message) as info:
        getattr(checks, name)(*wrong)
    assert not isinstance(info.value, NotImplementedYet)
    assert "Exercise 11." in str(info.value)
