"""Checks for chapter 01: linear, RMSNorm, SwiGLU (and the MLP it forms), embedding and the tied LM head.

Every check draws fresh random inputs of awkward sizes (1, odd, non powers of two), compares the
student's function with the package's reference (``miniinfer.layers``) and with an independent
oracle (float64 formulas, ``torch.nn.functional.rms_norm``, HF transformers' ``Qwen2RMSNorm`` and
``Qwen2MLP``), and, when the answer is wrong, recognises the usual mistakes by recomputing them.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F

from miniinfer import layers
from miniinfer.course.checking import assert_close, assert_equal, call_student, exercise, fail

__all__ = ["linear", "rms_norm", "swiglu", "embedding_and_lm_head"]

# Tolerances, by dtype of the inputs: float32 sums of a few hundred products are good to ~1e-6
# relative; bfloat16 keeps 8 bits of mantissa (~4e-3 relative), float16 11 bits (~5e-4).
TOLERANCE = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def _close(got, expected: torch.Tensor, atol: float, rtol: float) -> bool:
    """True when ``got`` is a tensor of ``expected``'s shape whose values are within the tolerances."""
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
        return False
    return bool(torch.allclose(got.detach().double().cpu(), expected.detach().double().cpu(), atol=atol, rtol=rtol,
                               equal_nan=True))


def diagnose(got, mistakes: list[tuple[str, Callable[[], torch.Tensor]]], atol: float, rtol: float) -> str | None:
    """The hint of the first known mistake whose result ``got`` reproduces (each ``make()`` recomputes one)."""
    for hint, make in mistakes:
        try:
            candidate = make()
        except Exception:  # a mistake that cannot even be computed for these shapes
            continue
        if _close(got, candidate, atol, rtol):
            return hint
    return None


def compare(got, expected: torch.Tensor, *, case: str, what: str = "result", tolerance: dict,
            mistakes: list[tuple[str, Callable[[], torch.Tensor]]] = (), hint: str | None = None,
            check_dtype: bool = True) -> None:
    """``assert_close`` whose hint names the mistake the student made, when it is a known one."""
    if not _close(got, expected, **tolerance) and isinstance(got, torch.Tensor):
        if expected.dtype == torch.float64 and _close(got, expected, atol=1e-4, rtol=1e-4):
            hint = ("your answer is only float32-accurate: for float64 inputs, compute in float64 "
                    "(don't convert to float32 along the way)")
        hint = diagnose(got, list(mistakes), **tolerance) or hint
    assert_close(got, expected, what=what, case=case, hint=hint, check_dtype=check_dtype, **tolerance)


def call(fn: Callable, *args, case: str, hint: str | None = None, **kwargs):
    """``call_student``, turning an exception of the student's code into a failure with the case and a hint."""
    try:
        return call_student(fn, *args, case=case, **kwargs)
    except NotImplementedError:  # the stub (a RuntimeError subclass): the decorator reports it
        raise
    except RuntimeError as error:  # shape mismatches and friends
        original = error.__cause__ or error
        fail(f"your code raised {type(original).__name__}: {original}", case=case, hint=hint)


def fresh_randomness(check_fn: Callable) -> Callable:
    """Run a check on its own, freshly seeded torch generator: its inputs are new on every call (not fixed
    by the notebook's ``torch.manual_seed``), and the notebook's random stream is left as it was."""

    @functools.wraps(check_fn)
    def run(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            torch.seed()
            return check_fn(*args, **kwargs)

    return run


def _shape(*dims: int) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


# ------------------------------------------------------------------------------------------------
# 1.1 linear
# ------------------------------------------------------------------------------------------------

def _linear_mistakes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> list[tuple[str, Callable]]:
    x64, w64 = x.double(), weight.double()
    b64 = bias.double() if bias is not None else 0
    return [
        ("the weight is stored [out, in] (PyTorch/HF layout): multiply by its transpose, x @ weight.T",
         lambda: x64 @ w64 + b64),
        ("add the bias when one is given (bias=None means no bias)", lambda: x64 @ w64.T),
        ("add the bias once", lambda: x64 @ w64.T + 2 * b64),
    ]


@exercise("1.1", "linear")
@fresh_randomness
def linear(fn) -> int:
    """``fn(x, weight, bias=None)`` against ``x @ weight.T + bias`` in float64 and ``layers.linear``."""
    rng = random.Random()
    cases = [
        # (leading dims of x, in, out, with bias, dtype)
        ((), rng.randint(2, 9), rng.randint(2, 9), True, torch.float32),       # x is one vector [in]
        ((rng.randint(3, 9),), 1, rng.randint(2, 7), False, torch.float32),    # in = 1
        ((rng.randint(2, 6),), rng.randint(10, 40), 1, True, torch.float64),   # out = 1
        ((1, rng.randint(2, 9)), 13, 13, False, torch.float32),                # square weight: a missing .T hides
        ((rng.randint(2, 4), rng.randint(5, 17)), rng.randint(20, 70), rng.randint(20, 70), True, torch.float32),
        ((rng.randint(2, 4), rng.randint(5, 17)), 24, 24, True, torch.float64),
        ((rng.randint(5, 30),), rng.randint(30, 90), rng.randint(10, 50), False, torch.bfloat16),
    ]
    for lead, n_in, n_out, with_bias, dtype in cases:
        x = torch.randn(*lead, n_in).to(dtype)
        weight = (torch.randn(n_out, n_in) / n_in**0.5).to(dtype)
        bias = torch.randn(n_out).to(dtype) if with_bias else None
        case = (f"x {_shape(*lead, n_in)}, weight {_shape(n_out, n_in)}, "
                f"bias {_shape(n_out) if with_bias else 'None'}, {dtype}")
        x_before = x.clone()
        hint = "weight is [out, in]: x @ weight.T has shape [..., out]"
        got = call(fn, x, weight, bias, case=case, hint=hint) if with_bias else call(fn, x, weight, case=case, hint=hint)
        if not torch.equal(x, x_before):
            fail("your function changed its input x in place", case=case, hint="compute a new tensor; leave x alone")
        tolerance = TOLERANCE[dtype]
        oracle = x.double() @ weight.double().T + (bias.double() if with_bias else 0)
        mistakes = _linear_mistakes(x, weight, bias)
        if isinstance(got, torch.Tensor) and got.dtype != dtype:
            fail(f"expected dtype {dtype}, got {got.dtype}", case=case,
                 hint="keep the input's dtype (don't convert to float32 or float64)")
        compare(got, oracle.to(dtype), what="linear(x, weight, bias)", case=case, tolerance=tolerance,
                mistakes=mistakes, hint="out[..., j] = sum_k x[..., k] * weight[j, k] + bias[j]")
        compare(got, layers.linear(x, weight, bias), what="linear compared with miniinfer.layers.linear",
                case=case, tolerance=tolerance)
    return len(cases)


# ------------------------------------------------------------------------------------------------
# 1.2 rms_norm
# ------------------------------------------------------------------------------------------------

def _hf_modeling():
    """transformers' Qwen2 modeling module (the oracle), or None when transformers is not installed."""
    try:
        from transformers.models.qwen2 import modeling_qwen2
    except Exception:  # ImportError, or a transformers that fails to import on this machine
        return None
    return modeling_qwen2


def _rms_mistakes(x: torch.Tensor, weight: torch.Tensor, eps: float) -> list[tuple[str, Callable]]:
    x64, w64 = x.double(), weight.double()
    ms = x64.pow(2).mean(-1, keepdim=True)
    return [
        ("RMSNorm divides by the root of the *mean square*, mean(x**2); you used the variance "
         "mean((x - mean(x))**2), which subtracts the mean first (that is LayerNorm)",
         lambda: (x64 - x64.mean(-1, keepdim=True)) * torch.rsqrt(x64.var(-1, unbiased=False, keepdim=True) + eps) * w64),
        ("add eps inside the square root: x * rsqrt(mean(x**2) + eps); without it, tiny inputs blow up",
         lambda: x64 * torch.rsqrt(ms) * w64),
        ("eps goes inside the square root, x / sqrt(mean(x**2) + eps), not after it",
         lambda: x64 / (ms.sqrt() + eps) * w64),
        ("multiply by the learned gain `weight` at the end",
         lambda: x64 * torch.rsqrt(ms + eps)),
        ("divide by the RMS (multiply by rsqrt = 1/sqrt), don't multiply by sqrt",
         lambda: x64 * torch.sqrt(ms + eps) * w64),
        ("divide by the root mean square, not the mean square itself: take the square root",
         lambda: x64 / (ms + eps) * w64),
        ("use the mean of x**2 over the last dimension (divide the sum by E), not the sum",
         lambda: x64 * torch.rsqrt(x64.pow(2).sum(-1, keepdim=True) + eps) * w64),
        ("compute the mean square in float32: in float16, x**2 overflows above 65504 (x > 256) and the "
         "result turns to 0 or NaN — upcast with x.float(), then cast the result back to x.dtype",
         lambda: (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).double() * w64),
    ]


@exercise("1.2", "RMSNorm")
@fresh_randomness
def rms_norm(fn) -> int:
    """``fn(x, weight, eps)`` against ``layers.rms_norm``, ``F.rms_norm`` in float64 and HF's ``Qwen2RMSNorm``."""
    rng = random.Random()
    E = rng.randint(20, 300)
    cases = [
        # (leading dims, E, dtype, scale, offset, eps, why)
        ((rng.randint(3, 9),), E, torch.float32, 1.0, 0.0, 1e-6, "plain"),
        ((rng.randint(2, 4), rng.randint(2, 9)), rng.randint(5, 64), torch.float32, 2.0, 3.0, 1e-6,
         "inputs with a non-zero mean"),
        ((rng.randint(1, 5),), 1, torch.float32, 1.0, 0.5, 1e-6, "E = 1"),
        ((rng.randint(2, 9),), rng.randint(8, 100), torch.float64, 1e-3, 0.0, 1e-5, "tiny inputs, where eps matters"),
        ((rng.randint(2, 6), rng.randint(2, 6)), 2 * rng.randint(10, 100) + 1, torch.bfloat16, 1.0, 0.2, 1e-6,
         "bfloat16"),
        ((rng.randint(2, 6),), rng.randint(64, 256), torch.float16, 400.0, 0.0, 1e-6,
         "float16 inputs whose squares overflow float16"),
    ]
    hf = _hf_modeling()
    for lead, E, dtype, scale, offset, eps, why in cases:
        x = (torch.randn(*lead, E) * scale + offset * scale).to(dtype)
        weight = (1.0 + 0.3 * torch.randn(E)).to(dtype)
        case = f"{why}: x {_shape(*lead, E)} {dtype}, weight [{E}], eps={eps:g}"
        x_before = x.clone()
        got = call_student(fn, x, weight, eps, case=case)
        if not torch.equal(x, x_before):
            fail("your function changed its input x in place", case=case, hint="compute a new tensor; leave x alone")
        tolerance = TOLERANCE[dtype]
        if dtype == torch.float64:  # the reference computes the statistics in float32
            tolerance = TOLERANCE[torch.float32]
        mistakes = _rms_mistakes(x, weight, eps)
        hint = "x * rsqrt(mean(x**2, last dim, keepdim) + eps) * weight, with the statistics in float32"
        compare(got, layers.rms_norm(x, weight, eps), what="rms_norm", case=case, tolerance=tolerance,
                mistakes=mistakes, hint=hint)
        # Independent oracle: torch's own RMSNorm in float64 (tolerance of the input's dtype).
        oracle = F.rms_norm(x.double(), (E,), weight.double(), eps)
        compare(got, oracle.to(dtype), what="rms_norm compared with torch.nn.functional.rms_norm (float64)",
                case=case, tolerance=TOLERANCE[dtype] if dtype != torch.float64 else TOLERANCE[torch.float32],
                mistakes=mistakes, hint=hint)
        if hf is not None and dtype in (torch.float32, torch.float64):
            module = hf.Qwen2RMSNorm(E, eps=eps).to(dtype)
            with torch.no_grad():
                module.weight.copy_(weight)
                expected = module(x)
            compare(got, expected, what="rms_norm compared with transformers' Qwen2RMSNorm", case=case,
                    tolerance=TOLERANCE[torch.float32], mistakes=mistakes, hint=hint)
    return len(cases)


# ------------------------------------------------------------------------------------------------
# 1.3 swiglu
# ------------------------------------------------------------------------------------------------

def _swiglu_mistakes(g64: torch.Tensor, u64: torch.Tensor) -> list[tuple[str, Callable]]:
    return [
        ("gate and up are swapped: the SiLU goes on `gate`, and `up` is multiplied in linearly",
         lambda: F.silu(u64) * g64),
        ("SiLU is x * sigmoid(x), not ReLU", lambda: F.relu(g64) * u64),
        ("SiLU is x * sigmoid(x): you used sigmoid(x) alone (that gate is the original GLU)",
         lambda: torch.sigmoid(g64) * u64),
        ("SiLU is x * sigmoid(x), not GELU", lambda: F.gelu(g64) * u64),
        ("the gate multiplies: silu(gate) * up, not silu(gate) + up", lambda: F.silu(g64) + u64),
        ("apply SiLU to the gate only: silu(gate) * up, not silu(gate * up)", lambda: F.silu(g64 * u64)),
    ]


@exercise("1.3", "SwiGLU")
@fresh_randomness
def swiglu(fn) -> int:
    """``fn(gate, up)`` against ``silu(gate) * up`` in float64 and ``layers.swiglu``; then the MLP it forms
    (``layers.SwiGLUMLP`` with the student's function) against transformers' ``Qwen2MLP``."""
    rng = random.Random()
    cases = [
        ((), rng.randint(2, 30), torch.float32),
        ((1,), 1, torch.float32),
        ((rng.randint(2, 9),), 2 * rng.randint(5, 60) + 1, torch.float64),
        ((rng.randint(2, 4), rng.randint(3, 11)), rng.randint(10, 200), torch.float32),
        ((rng.randint(2, 4), rng.randint(3, 11)), rng.randint(10, 200), torch.bfloat16),
    ]
    for lead, I, dtype in cases:
        gate = (3 * torch.randn(*lead, I)).to(dtype)  # wide enough to reach both tails of SiLU
        up = torch.randn(*lead, I).to(dtype)
        case = f"gate, up {_shape(*lead, I)} {dtype}"
        g64, u64 = gate.double(), up.double()
        mistakes = _swiglu_mistakes(g64, u64)
        got = call_student(fn, gate, up, case=case)
        compare(got, (F.silu(g64) * u64).to(dtype), what="swiglu(gate, up)", case=case, tolerance=TOLERANCE[dtype],
                mistakes=mistakes, hint="silu(gate) * up, where silu(x) = x * sigmoid(x)")
        compare(got, layers.swiglu(gate, up), what="swiglu compared with miniinfer.layers.swiglu", case=case,
                tolerance=TOLERANCE[dtype])

    # The MLP it forms: down(swiglu(gate(x), up(x))), our fused module with the student's function,
    # against transformers' Qwen2MLP (separate gate/up/down projections) holding the same weights.
    E, I, T = rng.randint(8, 48), rng.randint(16, 96), rng.randint(1, 9)
    gate_w, up_w, down_w = torch.randn(I, E) / E**0.5, torch.randn(I, E) / E**0.5, torch.randn(E, I) / I**0.5
    mlp = layers.SwiGLUMLP(E, I, fn=fn)
    with torch.no_grad():
        mlp.gate_up_proj.weight.copy_(torch.cat([gate_w, up_w]))
        mlp.down_proj.weight.copy_(down_w)
    x = torch.randn(T, E)
    case = f"SwiGLUMLP(E={E}, I={I}) with your swiglu, x [{T}, {E}]"
    with torch.no_grad():
        got = call_student(mlp, x, case=case)
    hf = _hf_modeling()
    if hf is not None:
        import transformers

        config = transformers.Qwen2Config(hidden_size=E, intermediate_size=I, hidden_act="silu")
        hf_mlp = hf.Qwen2MLP(config)
        with torch.no_grad():
            hf_mlp.gate_proj.weight.copy_(gate_w)
            hf_mlp.up_proj.weight.copy_(up_w)
            hf_mlp.down_proj.weight.copy_(down_w)
            expected = hf_mlp(x)
        what = "the MLP output compared with transformers' Qwen2MLP"
    else:
        expected = (F.silu(x @ gate_w.T) * (x @ up_w.T)) @ down_w.T
        what = "the MLP output"
    compare(got, expected, what=what, case=case, tolerance=dict(atol=1e-5, rtol=1e-4),
            hint="swiglu must work elementwise on any leading shape")
    return len(cases) + 1


# ------------------------------------------------------------------------------------------------
# 1.4 embedding and the (tied) LM head
# ------------------------------------------------------------------------------------------------

@exercise("1.4", "embedding and tied LM head")
@fresh_randomness
def embedding_and_lm_head(embedding_fn, lm_head_fn) -> int:
    """``embedding(ids, table)`` must return exact rows of the table; ``lm_head(hidden, weight)`` must equal
    ``hidden @ weight.T``; and with the *same* table (tying) the head scores a token's own embedding
    by its squared norm."""
    rng = random.Random()
    cases = 0
    for lead, V, E, dtype in [
        ((rng.randint(2, 17),), rng.randint(5, 300), rng.randint(3, 40), torch.float32),
        ((rng.randint(1, 3), rng.randint(1, 9)), rng.randint(5, 300), rng.randint(3, 40), torch.float32),
        ((1,), 1, rng.randint(2, 9), torch.float64),
        ((rng.randint(2, 5), rng.randint(2, 5)), rng.randint(100, 500), 2 * rng.randint(4, 20) + 1, torch.bfloat16),
    ]:
        table = torch.randn(V, E).to(dtype)
        ids = torch.randint(0, V, lead)
        ids.view(-1)[0] = V - 1  # the last row must be reachable
        ids.view(-1)[-1] = 0
        case = f"ids {_shape(*lead)} (int64), table [V={V}, E={E}] {dtype}"
        got = call_student(embedding_fn, ids, table, case=case)
        hint = "row i of the table is the vector of token i: table[ids] has shape [*ids.shape, E]"
        assert_equal(got, layers.embedding(ids, table), what="embedding(ids, table)", case=case, hint=hint)
        if got.dtype != dtype:
            fail(f"expected dtype {dtype}, got {got.dtype}", case=case, hint="return the table's own rows")
        cases += 1

        hidden = torch.randn(*lead, E).to(dtype)
        case = f"hidden {_shape(*lead, E)}, weight [V={V}, E={E}] {dtype}"
        got = call(lm_head_fn, hidden, table, case=case,
                   hint="the head's weight is [V, E], like the embedding table: logits = hidden @ weight.T")
        tolerance = TOLERANCE[dtype] if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-5)
        mistakes = [("the head's weight is [V, E], like the embedding table: logits = hidden @ weight.T",
                     functools.partial(torch.matmul, hidden.double(), table.double()))]
        compare(got, (hidden.double() @ table.double().T).to(dtype), what="lm_head(hidden, weight)", case=case,
                tolerance=tolerance, mistakes=mistakes, hint="logits[..., v] = hidden[..., :] · weight[v, :]")
        compare(got, layers.lm_head(hidden, table), what="lm_head compared with miniinfer.layers.lm_head",
                case=case, tolerance=tolerance)
        cases += 1

    # Tying: the head scores the embedding of token v, fed straight back, by |table[v]|²: the diagonal.
    V, E = rng.randint(50, 200), rng.randint(8, 32)
    table = torch.randn(V, E, dtype=torch.float64)
    ids = torch.randperm(V)[: rng.randint(2, 9)]
    case = f"tied: lm_head(embedding(ids, W), W) with W [{V}, {E}] float64"
    logits = call_student(lm_head_fn, call_student(embedding_fn, ids, table, case=case), table, case=case)
    diagonal = logits[torch.arange(len(ids)), ids]
    assert_close(diagonal, table[ids].pow(2).sum(-1), what="logit of each token's own id", case=case,
                 atol=1e-9, rtol=1e-9, hint="with a tied head, logits = embedding(ids) @ W.T")
    return cases + 1
