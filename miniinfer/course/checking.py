"""The machinery behind every check cell: fresh random cases, clear verdicts, helpful failures.

A chapter's check cell calls one function, e.g. ``check.apply_rope(apply_rope)``. That function is
declared with :func:`exercise` and compares the student's function with the package's reference on
freshly drawn inputs of awkward sizes. Three outcomes:

* the student's function still raises the stub's ``NotImplementedError``: :class:`NotImplementedYet`,
  a one-line "Exercise N.k is not implemented yet" message, no traceback wall;
* it returns something wrong (shape, dtype, values) or raises: :class:`CheckFailed` naming the case,
  expected vs got, the largest error and a hint;
* it is right on every case: a single line ``✅ Exercise N.k (title): passed k cases``.

Both failure classes derive from ``AssertionError``, so pytest, nbval and the grader see a failure.
"""

from __future__ import annotations

import functools
import math
import traceback
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "CheckFailed",
    "NotImplementedYet",
    "exercise",
    "assert_close",
    "assert_equal",
    "fail",
    "call_student",
    "describe",
]

STUB_MARKER = "Exercise "  # every generated stub raises NotImplementedError("Exercise N.k: ...")


class CheckFailed(AssertionError):
    """A check found a wrong answer. The message says which case, what was expected, and a hint."""


class NotImplementedYet(CheckFailed):
    """The exercise still holds its stub."""


# Checks registered by exercise id ("2.1" -> check function); the grader and the tests use it.
REGISTRY: dict[str, Callable] = {}


def _is_stub_error(exc: BaseException) -> bool:
    """True when ``exc`` (or its cause chain) is the stub's NotImplementedError.

    Triton wraps errors raised inside a kernel, and a JIT compiler may turn the stub's ``raise`` into a
    compilation error; we therefore look through the cause chain and the message text.
    """
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, NotImplementedError):
            return True
        if "NotImplementedError" in str(exc) and STUB_MARKER in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def exercise(exercise_id: str, title: str):
    """Declare a check function for exercise ``exercise_id`` (e.g. ``"2.1"``).

    The decorated function receives the student's object(s) and raises :class:`CheckFailed` on a
    wrong answer; it returns the number of cases it tried (for the success line) or None.
    """

    def decorate(check_fn: Callable) -> Callable:
        @functools.wraps(check_fn)
        def run_check(*student_objects, **kwargs):
            try:
                # Fresh random inputs on every call, whatever the notebook seeded, and the notebook's own
                # random stream left exactly as it was (so later cells stay reproducible).
                with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
                    torch.seed()
                    if torch.cuda.is_available():
                        torch.cuda.seed_all()
                    num_cases = check_fn(*student_objects, **kwargs)
            except NotImplementedYet:
                raise
            except CheckFailed as failure:
                raise CheckFailed(f"Exercise {exercise_id} ({title}) failed.\n{failure}") from None
            except Exception as error:  # the student's code raised: name it and stop there
                if _is_stub_error(error):
                    raise NotImplementedYet(
                        f"Exercise {exercise_id} ({title}) is not implemented yet: replace the "
                        "`raise NotImplementedError(...)` line in the exercise cell with your code, "
                        "run that cell, then run this check again."
                    ) from None
                where = _student_frame(error)
                raise CheckFailed(
                    f"Exercise {exercise_id} ({title}) failed: your code raised "
                    f"{type(error).__name__}: {error}{where}"
                ) from error
            cases = f": passed {num_cases} cases" if num_cases else ": passed"
            print(f"✅ Exercise {exercise_id} ({title}){cases}")

        run_check.exercise_id = exercise_id
        run_check.title = title
        REGISTRY[exercise_id] = run_check
        return run_check

    return decorate


def _student_frame(error: BaseException) -> str:
    """Point at the innermost frame that is not part of miniinfer, torch or triton."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        name = frame.filename
        if not any(part in name for part in ("miniinfer", "torch", "triton", "site-packages")):
            return f"\n  at line {frame.lineno}: {frame.line}"
    return ""


def fail(message: str, *, case: str | None = None, hint: str | None = None) -> None:
    """Raise :class:`CheckFailed` with the case and hint laid out the same way everywhere."""
    parts = []
    if case:
        parts.append(f"Case: {case}")
    parts.append(message)
    if hint:
        parts.append(f"Hint: {hint}")
    raise CheckFailed("\n".join(parts))


def describe(value: Any) -> str:
    """A short description of a value for failure messages: shape and dtype for tensors."""
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}, dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"[:200]


def call_student(fn: Callable, *args, case: str | None = None, **kwargs):
    """Call the student's function; an exception other than the stub's is reported with the case."""
    try:
        return fn(*args, **kwargs)
    except Exception as error:
        if _is_stub_error(error):
            raise
        if case is not None:
            raise RuntimeError(f"{type(error).__name__}: {error}  [case: {case}]") from error
        raise


def assert_equal(got: Any, expected: Any, *, what: str = "result", case: str | None = None,
                 hint: str | None = None) -> None:
    """Exact comparison for integers, token ids, index tensors, lists."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            fail(f"{what}: expected a tensor, got {describe(got)}", case=case, hint=hint)
        if tuple(got.shape) != tuple(expected.shape):
            fail(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}", case=case, hint=hint)
        mismatch = (got.to(expected.dtype) != expected).nonzero()
        if len(mismatch):
            first = tuple(mismatch[0].tolist())
            fail(
                f"{what}: {len(mismatch)} of {expected.numel()} elements differ; first at index {first}: "
                f"expected {expected[first].item()}, got {got[first].item()}",
                case=case, hint=hint,
            )
        return
    if got != expected:
        fail(f"{what}: expected {expected!r}, got {got!r}", case=case, hint=hint)


def assert_close(got: Any, expected: torch.Tensor, *, what: str = "result", case: str | None = None,
                 atol: float = 1e-5, rtol: float = 1e-5, hint: str | None = None,
                 check_dtype: bool = True) -> None:
    """Compare a tensor with a reference: shape, dtype, finiteness, then values within tolerances.

    The failure message names the worst element: its index, the expected and the received value.
    """
    if not isinstance(got, torch.Tensor):
        fail(f"{what}: expected a torch.Tensor, got {describe(got)}", case=case, hint=hint)
    if tuple(got.shape) != tuple(expected.shape):
        fail(f"{what}: expected shape {tuple(expected.shape)}, got shape {tuple(got.shape)}",
             case=case, hint=hint)
    if check_dtype and got.dtype != expected.dtype:
        fail(f"{what}: expected dtype {expected.dtype}, got {got.dtype}", case=case,
             hint=hint or "keep the input's dtype; convert only where the reference does")
    got64 = got.detach().to("cpu", torch.float64)
    exp64 = expected.detach().to("cpu", torch.float64)
    bad_values = ~torch.isfinite(got64) & torch.isfinite(exp64)
    if bad_values.any():
        index = tuple(bad_values.nonzero()[0].tolist())
        fail(f"{what}: got a non-finite value {got64[index].item()} at index {index} "
             f"(expected {exp64[index].item():.6g})", case=case, hint=hint)
    error = (got64 - exp64).abs()
    allowed = atol + rtol * exp64.abs()
    if got64.numel() and (error > allowed).any():
        excess = error - allowed
        flat = int(excess.flatten().argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(exp64.shape)))
        num_bad = int((error > allowed).sum())
        fail(
            f"{what}: {num_bad} of {got64.numel()} elements are off (atol={atol:g}, rtol={rtol:g}).\n"
            f"  worst at index {index}: expected {exp64[index].item():.6g}, got {got64[index].item():.6g}\n"
            f"  max abs error {error.max().item():.3g}",
            case=case, hint=hint,
        )


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """‖got − expected‖ / ‖expected‖ in float64."""
    got64, exp64 = got.double(), expected.double()
    denom = exp64.norm().item()
    return (got64 - exp64).norm().item() / (denom if denom > 0 else 1.0) if not math.isnan(denom) else float("nan")
