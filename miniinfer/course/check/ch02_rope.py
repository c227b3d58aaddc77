"""Checks for chapter 02: the RoPE tables, half-split (Qwen2) and interleaved RoPE, positions.

Oracles besides the package's reference (``miniinfer.rope``): the tables straight from the formula in
float64, rotations done with complex numbers (``torch.polar``), and HF transformers'
``apply_rotary_pos_emb`` (the code every Qwen2 checkpoint was trained with). Known mistakes — the
wrong pairing, a flipped sine, frequencies off by a factor 2 in the exponent, positions off by one —
are recomputed and named in the hint when the student's answer matches one of them.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from miniinfer import rope
from miniinfer.course.check.ch01_building_blocks import TOLERANCE, call, compare, fresh_randomness
from miniinfer.course.checking import assert_equal, call_student, exercise, fail

__all__ = ["rope_cos_sin", "apply_rope", "apply_rope_interleaved", "make_positions"]


def _table64(positions: torch.Tensor, head_dim: int, theta: float, exponent: float = 2.0, sign: float = -1.0):
    """cos and sin of ``positions[:, None] · theta ** (sign · exponent · i / D)``, i = 0 … D/2 − 1, in float64."""
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    angles = positions.double()[:, None] * theta ** (sign * exponent * i / head_dim)
    return angles.cos(), angles.sin()


# ------------------------------------------------------------------------------------------------
# 2.1 the tables
# ------------------------------------------------------------------------------------------------

def _table_mistakes(positions: torch.Tensor, D: int, theta: float) -> list[tuple[str, Callable]]:
    return [
        ("frequencies off by a factor 2 in the exponent: θ_i = theta ** (-2i / D) for pair i = 0 … D/2 − 1 "
         "(torch.arange(0, D, 2) / D already holds 2i/D)",
         lambda: _table64(positions, D, theta, exponent=1.0)),
        ("frequencies off by a factor 2 in the exponent: you doubled 2i once more — torch.arange(0, D, 2) "
         "already steps by 2, so divide it by D only",
         lambda: _table64(positions, D, theta, exponent=4.0)),
        ("the exponent is negative: θ_i = theta ** (-2i / D) = 1 / theta ** (2i / D), from 1 down to ~1/theta",
         lambda: _table64(positions, D, theta, sign=1.0)),
        ("positions start at 0: row p of the table is position p = 0 … max_positions − 1",
         lambda: _table64(positions + 1, D, theta)),
        ("cos and sin are swapped: return (cos, sin)",
         lambda: _table64(positions, D, theta)[::-1]),
    ]


@exercise("2.1", "RoPE cos/sin tables")
@fresh_randomness
def rope_cos_sin(fn) -> int:
    """``fn(max_positions, head_dim, theta) -> (cos, sin)``, each [S, D//2] float32, against the float64
    formula and ``rope.rope_cos_sin``; recognises the usual frequency and position slips."""
    rng = random.Random()
    cases = [
        (1, 2, 10000.0),
        (rng.randint(2, 9), 6, 10000.0),
        (rng.randint(50, 400), 2 * rng.randint(5, 40) + 2 * rng.randint(0, 1), 10000.0),
        (rng.randint(20, 90), 64, 1_000_000.0),  # Qwen2.5's theta
        (rng.randint(100, 700), 2 * rng.randint(3, 12), 500.0),
    ]
    for S, D, theta in cases:
        case = f"max_positions={S}, head_dim={D}, theta={theta:g}"
        result = call(fn, S, D, theta, case=case)
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            fail(f"expected a pair (cos, sin), got {type(result).__name__}", case=case,
                 hint="return cos, sin (two tensors)")
        cos, sin = result
        for name, table in (("cos", cos), ("sin", sin)):
            if not isinstance(table, torch.Tensor):
                fail(f"{name}: expected a tensor, got {type(table).__name__}", case=case)
            if tuple(table.shape) == (S, D):
                fail(f"{name}: expected shape {(S, D // 2)}, got {tuple(table.shape)}", case=case,
                     hint="one column per *pair* of coordinates: D//2 columns (HF repeats them to D columns "
                          "inside its model; here apply_rope reuses each column for both halves)")
            if table.dtype != torch.float32:
                fail(f"{name}: expected dtype torch.float32, got {table.dtype}", case=case,
                     hint="the tables are float32 (the model casts them to its own dtype)")
        positions = torch.arange(S)
        cos64, sin64 = _table64(positions, D, theta)
        # float32 angles p·θ_i carry a relative rounding error of ~1e-7, i.e. ~1e-7·p radians.
        tolerance = dict(atol=2e-6 + 2.5e-7 * S, rtol=0.0)
        mistakes = _table_mistakes(positions, D, theta)
        for index, (name, table) in enumerate((("cos", cos), ("sin", sin))):
            named = [(hint, (lambda make=make, k=index: make()[k])) for hint, make in mistakes]
            expected64 = (cos64, sin64)[index]
            compare(table, expected64.float(), what=f"{name} (compared with the float64 formula)", case=case,
                    tolerance=tolerance, mistakes=named,
                    hint=f"{name}[p, i] = {name}(p · theta ** (-2i / D))")
            compare(table, rope.rope_cos_sin(S, D, theta)[index], what=f"{name} compared with "
                    "miniinfer.rope.rope_cos_sin", case=case, tolerance=tolerance)
    return len(cases)


# ------------------------------------------------------------------------------------------------
# 2.2 / 2.3 applying the rotation
# ------------------------------------------------------------------------------------------------

def _rope_cases(rng: random.Random):
    """(description, x, cos, sin, angles64 | None): awkward shapes, the layouts the model uses, three dtypes."""
    cases = []
    # (leading dims of x, H, D, leading dims of cos, dtype)
    T, B, L = rng.randint(3, 13), rng.randint(2, 3), rng.randint(2, 9)
    layouts = [
        ((T,), 3 + 2, 2 * rng.randint(2, 20), (T,), torch.float64, "packed tokens [T, H + H_kv, D]"),
        ((1,), 1, 2, (1,), torch.float64, "one token, one head, D = 2"),
        ((B, L), rng.randint(1, 6), 2 * rng.randint(3, 18) + 2, (B, L), torch.float32,
         "[B, L, H, D] with per-row positions"),
        ((B, L), rng.randint(2, 7), 2 * rng.randint(2, 12), (L,), torch.float32,
         "[B, L, H, D] with cos/sin [L, D//2] shared by the batch (the model's plain forward)"),
        ((T,), rng.randint(2, 5), 2 * rng.randint(4, 16), (T,), torch.bfloat16, "bfloat16"),
    ]
    for lead, H, D, cos_lead, dtype, why in layouts:
        # Positions anywhere in a long context (not just 0, 1, 2, …): offset rows, as after a KV cache.
        positions = torch.randint(0, 3000, cos_lead, dtype=torch.int64)
        i = torch.arange(D // 2, dtype=torch.float64)
        angles = positions.double()[..., None] * 10000.0 ** (-2 * i / D)  # [*cos_lead, D//2], float64
        x = torch.randn(*lead, H, D, dtype=torch.float64)
        if dtype == torch.float64:
            cos, sin = angles.cos(), angles.sin()
        else:  # as the model does: float32 tables at these positions, cast to the model's dtype
            table_cos, table_sin = rope.rope_cos_sin(3000, D, 10000.0)
            cos, sin = table_cos[positions].to(dtype), table_sin[positions].to(dtype)
            angles = None  # the float32 table's angles are not exactly the float64 ones
        case = f"{why}: x {list((*lead, H, D))} {dtype}, cos/sin {list((*cos_lead, D // 2))}"
        cases.append((case, x.to(dtype), cos, sin, angles))
    return cases


def _rotate_complex(x: torch.Tensor, angles: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Independent oracle: view each pair as a complex number and multiply by e^{i·angle}.  float64."""
    x = x.double()
    D = x.shape[-1]
    if interleaved:
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], D // 2, 2).contiguous())
    else:
        z = torch.complex(x[..., : D // 2], x[..., D // 2 :])
    z = z * torch.polar(torch.ones_like(angles), angles).unsqueeze(-2)  # broadcast over heads
    if interleaved:
        return torch.view_as_real(z).flatten(-2)
    return torch.cat((z.real, z.imag), dim=-1)


def _hf_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """transformers' apply_rotary_pos_emb (HF tables are [*, D]: the D//2 columns repeated), or None."""
    try:
        from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb
    except Exception:
        return None
    cos_full, sin_full = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    q, _ = apply_rotary_pos_emb(x, x, cos_full, sin_full, unsqueeze_dim=-2)
    return q


def _rotation_mistakes(x, cos, sin, interleaved: bool, pairing: str, formula: str) -> list[tuple[str, Callable]]:
    reference = rope.apply_rope_interleaved if interleaved else rope.apply_rope
    other = rope.apply_rope if interleaved else rope.apply_rope_interleaved
    mistakes = [
        (f"wrong pairing: this is the {'half-split (Qwen2)' if interleaved else 'interleaved (traditional)'} "
         f"rotation. Here the pairs are {pairing}", lambda: other(x, cos, sin)),
        ("the rotation goes the wrong way (sine sign flipped): " + formula, lambda: reference(x, cos, -sin)),
        ("cos and sin are swapped: " + formula, lambda: reference(x, sin, cos)),
    ]
    if interleaved:
        mistakes.append(("each rotated pair must go back where it came from, positions 2i and 2i+1: "
                         "stack the two results on a new last axis and flatten (not torch.cat, which puts "
                         "all the first coordinates before all the second ones)",
                         lambda: rope.interleaved_to_half_split(reference(x, cos, sin))))
    else:
        mistakes.append(("the two halves of the output are swapped: the first half is x1·cos − x2·sin",
                         lambda: rope.apply_rope(x, cos, sin).roll(x.shape[-1] // 2, dims=-1)))
    return mistakes


def _check_rotation(fn, interleaved: bool) -> int:
    rng = random.Random()
    name = "apply_rope_interleaved" if interleaved else "apply_rope"
    reference = rope.apply_rope_interleaved if interleaved else rope.apply_rope
    pairing = "(x[2i], x[2i+1])" if interleaved else "(x[i], x[i + D/2])"
    formula = ("out[2i] = x[2i]·cos − x[2i+1]·sin, out[2i+1] = x[2i]·sin + x[2i+1]·cos" if interleaved else
               "out[:D/2] = x1·cos − x2·sin, out[D/2:] = x2·cos + x1·sin with x1, x2 = the two halves of x")
    broadcast = ("cos and sin are [*, D//2], one row per token: insert a head axis (cos.unsqueeze(-2)) so that "
                 "they broadcast over the H heads")
    cases = _rope_cases(rng)
    for case, x, cos, sin, angles in cases:
        x_before = x.clone()
        got = call(fn, x, cos, sin, case=case, hint=broadcast)
        if not torch.equal(x, x_before):
            fail("your function changed its input x in place", case=case,
                 hint="the model passes a view of its fused qkv tensor: build a new tensor (torch.cat / stack)")
        if isinstance(got, torch.Tensor) and tuple(got.shape) != tuple(x.shape):
            fail(f"expected shape {tuple(x.shape)} (the shape of x), got {tuple(got.shape)}", case=case,
                 hint=broadcast)
        tolerance = TOLERANCE[x.dtype]
        mistakes = _rotation_mistakes(x, cos, sin, interleaved, pairing, formula)
        compare(got, reference(x, cos, sin), what=f"{name} compared with miniinfer.rope.{name}", case=case,
                tolerance=tolerance, mistakes=mistakes, hint=formula)
        if angles is not None:
            compare(got, _rotate_complex(x, angles, interleaved), what=f"{name} compared with complex rotation "
                    "(pairs as complex numbers times e^{i·p·θ})", case=case, tolerance=tolerance,
                    mistakes=mistakes, hint=formula)
        if not interleaved and x.dtype != torch.bfloat16:
            hf = _hf_apply(x, cos, sin)
            if hf is not None:
                compare(got, hf, what="apply_rope compared with transformers' apply_rotary_pos_emb", case=case,
                        tolerance=tolerance, mistakes=mistakes, hint=formula)
        if interleaved:
            # The two styles are one rotation in permuted coordinates: P·R_interleaved(x) = R_half(P·x).
            permuted = rope.interleaved_to_half_split(got)
            expected = rope.apply_rope(rope.interleaved_to_half_split(x), cos, sin)
            compare(permuted, expected, what="interleaved_to_half_split(your output) compared with "
                    "apply_rope(interleaved_to_half_split(x))", case=case, tolerance=tolerance, hint=formula)
    return len(cases)


@exercise("2.2", "half-split RoPE (Qwen2)")
@fresh_randomness
def apply_rope(fn) -> int:
    """``fn(x [*, H, D], cos [*, D//2], sin [*, D//2])``: rotate pairs (i, i + D/2) — against the reference,
    complex-number rotation and HF's ``apply_rotary_pos_emb``."""
    return _check_rotation(fn, interleaved=False)


@exercise("2.3", "interleaved RoPE")
@fresh_randomness
def apply_rope_interleaved(fn) -> int:
    """``fn(x [*, H, D], cos, sin)``: rotate pairs (2i, 2i+1) — against the reference, complex-number rotation
    and the permutation identity with the half-split form."""
    return _check_rotation(fn, interleaved=True)


# ------------------------------------------------------------------------------------------------
# 2.4 positions
# ------------------------------------------------------------------------------------------------

@exercise("2.4", "positions from an offset, a slice or a tensor")
@fresh_randomness
def make_positions(fn) -> int:
    """``fn(spec, length=None, device=None)`` -> int64 positions; bad specs raise ValueError."""
    rng = random.Random()
    offset, length = rng.randint(1, 500), rng.randint(2, 40)
    start, stop = rng.randint(0, 20), rng.randint(25, 90)
    packed = torch.cat([torch.arange(rng.randint(1, 9)), torch.arange(5, 5 + rng.randint(1, 4)),
                        torch.arange(offset, offset + 1)])
    cases = [
        ((0,), dict(length=length), torch.arange(length), "offset 0 (a fresh prompt)"),
        ((offset,), dict(length=length), torch.arange(offset, offset + length), "offset with length"),
        ((offset,), dict(length=1), torch.tensor([offset]), "one decode token after `offset` cached ones"),
        ((slice(start, stop),), {}, torch.arange(start, stop), "slice start:stop"),
        ((slice(None, stop),), {}, torch.arange(stop), "slice :stop"),
        ((slice(start, stop, 3),), {}, torch.arange(start, stop, 3), "slice with a step"),
        ((packed.to(torch.int32),), {}, packed, "a tensor of packed positions (int32)"),
        ((packed,), dict(device="cpu"), packed, "a tensor of positions, device='cpu'"),
    ]
    for args, kwargs, expected, why in cases:
        case = f"{why}: make_positions({', '.join(map(_short, args))}" + "".join(
            f", {k}={v!r}" for k, v in kwargs.items()) + ")"
        got = call(fn, *args, case=case, **kwargs)
        if isinstance(got, torch.Tensor) and got.dtype != torch.int64:
            fail(f"expected dtype torch.int64, got {got.dtype}", case=case,
                 hint="positions index the cos/sin tables: return a LongTensor (torch.arange gives one; "
                      "convert a given tensor with .long())")
        if isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(expected.shape) and not torch.equal(got, expected):
            if got.numel() and torch.equal(got, expected + 1):
                fail(f"positions are off by one: expected {expected.tolist()[:8]}…, got {got.tolist()[:8]}…",
                     case=case, hint="an offset of k means k tokens come before: the first new token sits at "
                                     "position k (positions are 0-based)")
        assert_equal(got, expected, what="positions", case=case,
                     hint="int offset -> offset, offset+1, …, offset+length-1; slice -> its range; tensor -> as int64")
    errors = [
        ((7,), {}, "an int offset without length"),
        ((-3,), dict(length=4), "a negative offset"),
        ((slice(2, None),), {}, "a slice without a stop"),
    ]
    for args, kwargs, why in errors:
        case = f"{why}: make_positions({', '.join(map(_short, args))}" + "".join(
            f", {k}={v!r}" for k, v in kwargs.items()) + ")"
        try:
            result = call_student(fn, *args, **kwargs)
        except ValueError:
            continue
        except NotImplementedError:
            raise
        except Exception as error:
            fail(f"expected ValueError, got {type(error).__name__}: {error}", case=case,
                 hint="raise ValueError with a message that says what is missing or wrong")
        fail(f"expected ValueError, but your function returned {result!r:.80}", case=case,
             hint="reject specs that do not say where the tokens sit: raise ValueError")
    return len(cases) + len(errors)


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor({value.tolist()[:6]}{'…' if value.numel() > 6 else ''}, dtype={value.dtype})"
    return repr(value)
