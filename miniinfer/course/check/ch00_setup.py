"""Checks for chapter 00: the Triton vector-add kernel and the bandwidth arithmetic."""

from __future__ import annotations

import math
import random

import torch

from miniinfer.course.checking import assert_close, exercise, fail

__all__ = ["vector_add_kernel", "achieved_bandwidth_gbs"]


@exercise("0.1", "Triton vector-add kernel")
def vector_add_kernel(kernel) -> int:
    """Launch the student's kernel on awkward sizes and block sizes; outputs must match x + y exactly
    and nothing past the end of the output may be written."""
    import miniinfer.kernels  # noqa: F401  (sets TRITON_INTERPRET on machines without a GPU)
    from miniinfer.kernels.vector_add import num_programs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = random.Random()
    sizes = [1, 7, 127, 128, 1000, 4097, rng.randint(2000, 20000)]
    cases = 0
    for n in sizes:
        for block in (16, 128, 1024):
            for dtype in (torch.float32, torch.float16):
                case = f"n={n}, BLOCK={block}, dtype={dtype}"
                x = torch.randn(n, device=device).to(dtype)
                y = torch.randn(n, device=device).to(dtype)
                # The output lives at the front of a larger buffer filled with a sentinel: a kernel that
                # stores without the mask scribbles over it, and we can see that.
                guard = 4 * block
                buffer = torch.full((n + guard,), -12345.0, device=device, dtype=dtype)
                out = buffer[:n]
                kernel[(num_programs(n, block),)](x, y, out, n, BLOCK=block)
                assert_close(out, x + y, what="out", case=case, atol=0, rtol=0,
                             hint="each program handles elements [pid*BLOCK, pid*BLOCK + BLOCK); "
                                  "load x and y there, add, store to the same offsets")
                if not torch.all(buffer[n:] == -12345.0):
                    first = int((buffer[n:] != -12345.0).nonzero()[0]) + n
                    fail(f"your kernel wrote past the end of the output (first stray write at index {first}, "
                         f"n={n})", case=case,
                         hint="the last program covers offsets beyond n: pass mask=offsets < n to tl.store "
                              "(and to tl.load)")
                cases += 1
    return cases


@exercise("0.2", "achieved bandwidth")
def achieved_bandwidth_gbs(fn) -> int:
    """Compare with 3 · n · itemsize / seconds / 1e9 and recognise the usual slips."""
    rng = random.Random()
    cases = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for _ in range(5):
            n = rng.randint(1, 10**9)
            seconds = rng.uniform(1e-6, 1.0)
            itemsize = torch.empty((), dtype=dtype).element_size()
            expected = 3 * n * itemsize / seconds / 1e9
            case = f"num_elements={n}, dtype={dtype}, seconds={seconds:.3g}"
            got = fn(n, dtype, seconds)
            if not isinstance(got, (int, float)) or isinstance(got, bool):
                fail(f"expected a Python float (GB/s), got {type(got).__name__}", case=case,
                     hint="return a number, e.g. `return bytes_moved / seconds / 1e9`")
            if not math.isfinite(got) or abs(got - expected) > 1e-9 * expected:
                ratio = got / expected if expected else float("nan")
                hint = "count every byte that crosses memory: x is read, y is read, out is written"
                for factor, why in ((2 / 3, "you counted two of the three arrays: the output is written too"),
                                    (1 / 3, "you counted one array: x and y are read, out is written"),
                                    (1e3, "units: 1 GB/s is 1e9 bytes per second"),
                                    (1e-3, "units: 1 GB/s is 1e9 bytes per second"),
                                    (1.073741824, "GB here is 1e9 bytes (decimal), not 2**30"),
                                    (1 / 1.073741824, "GB here is 1e9 bytes (decimal), not 2**30"),
                                    (1 / itemsize, "multiply by the element size in bytes (dtype.itemsize)")):
                    if math.isfinite(ratio) and abs(ratio - factor) < 1e-6 * factor:
                        hint = why
                fail(f"expected {expected:.6g} GB/s, got {got!r}", case=case, hint=hint)
            cases += 1
    return cases
