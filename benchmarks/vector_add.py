"""Achieved memory bandwidth of vector addition vs vector size, for every backend (chapter 00).

    python benchmarks/vector_add.py            # on a CUDA machine: torch, Triton, CUDA (2 kernels), copy
    python benchmarks/vector_add.py --cpu      # torch on the CPU (small sizes; a figure of caches)

Bandwidth counts the bytes that must move: x and y read once, out written once (3 · n · itemsize).
The copy row (``out.copy_(x)``: 2 · n · itemsize) measured in the same run is the practical ceiling.
Small vectors are launch-bound (a few microseconds per call), mid-sized ones fit in the L2 cache
(50 MB on an H100) and can beat DRAM bandwidth, large ones show the DRAM bandwidth.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, time_cpu, time_cuda, write_results  # noqa: E402
from miniinfer.kernels.vector_add import vector_add  # noqa: E402


def gbs(num_bytes: float, seconds: float) -> float:
    return num_bytes / seconds / 1e9


def measure_backend(backend: str, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> float | None:
    """GB/s of one backend after checking its result; None (and a message) if it fails."""
    try:
        result = vector_add(x, y, backend=backend)
        torch.cuda.synchronize()
        if not torch.equal(result, x + y):
            raise AssertionError(f"{backend} result differs from x + y")
        if backend == "torch":
            fn = functools.partial(torch.add, x, y, out=out)
        else:
            fn = functools.partial(vector_add, x, y, backend=backend)
        return round(gbs(3 * x.numel() * x.element_size(), time_cuda(fn)), 1)
    except Exception as error:  # noqa: BLE001 - report and keep measuring the others
        print(f"{backend} failed at n={x.numel()}: {type(error).__name__}: {error}", file=sys.stderr)
        return None


def run_cuda(max_log2: int, dtype: torch.dtype) -> tuple[list[str], list[dict], dict]:
    device = torch.device("cuda")
    backends = ["torch", "triton", "cuda", "cuda-simple"]
    columns = ["n", "MB per array"] + [f"{b} GB/s" for b in backends] + ["copy GB/s"]
    rows = []
    for log2 in range(10, max_log2 + 1, 2):
        n = 2**log2
        x = torch.randn(n, device=device, dtype=dtype)
        y = torch.randn(n, device=device, dtype=dtype)
        out = torch.empty_like(x)
        itemsize = x.element_size()
        row = {"n": n, "MB per array": round(n * itemsize / 1e6, 3)}
        for backend in backends:
            row[f"{backend} GB/s"] = measure_backend(backend, x, y, out)
        row["copy GB/s"] = round(gbs(2 * n * itemsize, time_cuda(functools.partial(out.copy_, x))), 1)
        rows.append(row)
    summary = {f"peak {c}": max((r[c] for r in rows if r[c] is not None), default=None)
               for c in columns[2:]}
    best_kernel = max((summary[f"peak {b} GB/s"] or 0) for b in ("triton", "cuda"))
    summary["best kernel / copy at the largest size"] = round(
        max(rows[-1][f"{b} GB/s"] or 0 for b in ("triton", "cuda")) / rows[-1]["copy GB/s"], 3)
    summary["best kernel peak GB/s"] = best_kernel
    return columns, rows, summary


def run_cpu(max_log2: int, dtype: torch.dtype) -> tuple[list[str], list[dict], dict]:
    columns = ["n", "MB per array", "torch GB/s", "copy GB/s"]
    rows = []
    for log2 in range(10, max_log2 + 1, 2):
        n = 2**log2
        x, y = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
        out = torch.empty_like(x)
        itemsize = x.element_size()
        add_s = time_cpu(functools.partial(torch.add, x, y, out=out), repeat=30, min_seconds=0.05)
        copy_s = time_cpu(functools.partial(out.copy_, x), repeat=30, min_seconds=0.05)
        rows.append({"n": n, "MB per array": round(n * itemsize / 1e6, 3),
                     "torch GB/s": round(gbs(3 * n * itemsize, add_s), 2),
                     "copy GB/s": round(gbs(2 * n * itemsize, copy_s), 2)})
    summary = {"peak torch GB/s": max(r["torch GB/s"] for r in rows), "peak copy GB/s": max(r["copy GB/s"] for r in rows)}
    return columns, rows, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="measure torch on the CPU instead")
    parser.add_argument("--max-log2", type=int, default=None, help="largest size 2**k (default 28 GPU, 24 CPU)")
    parser.add_argument("--out", help="results JSON path (default benchmarks/results/vector_add_<device>.json)")
    args = parser.parse_args()
    dtype = torch.float32
    if args.cpu or not torch.cuda.is_available():
        columns, rows, summary = run_cpu(args.max_log2 or 24, dtype)
        device = "cpu"
    else:
        columns, rows, summary = run_cuda(args.max_log2 or 28, dtype)
        device = "cuda"
    print_table(columns, rows)
    print(summary)
    write_results("vector_add", "Vector add: achieved bandwidth vs size (float32)", device, columns, rows, summary,
                  notes="bandwidth = 3·n·4 bytes / median time per call (CUDA events, one call per timing; "
                        "small sizes are launch-bound); copy = 2·n·4 bytes.", out=args.out)


if __name__ == "__main__":
    main()
