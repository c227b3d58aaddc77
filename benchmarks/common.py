"""Shared helpers for benchmark scripts: timing, a printed table, and the results JSON.

Every benchmark writes ``benchmarks/results/<name>_<device>.json`` (or ``--out``) with the schema::

    {"benchmark": str, "title": str, "device": "cpu" | "cuda", "card": "NVIDIA H100 80GB HBM3" | cpu name,
     "date": ISO-8601 UTC, "command": the command line, "environment": {versions, git commit},
     "columns": [column names in display order], "rows": [{column: value}], "summary": {...}, "notes": str}

The book's performance ledger and the chapters read these files; absolute times hold only for the
named card, ratios against a baseline measured in the same run are what carry over.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: str | torch.device = "cuda") -> str:
    from miniinfer.env import card_name

    return card_name(device)


def device_slug(device: str | torch.device) -> str:
    """A short file-name tag: h100, h200, a100, ..., or cpu."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4", "a10", "4090", "3090", "t4", "v100"):
        if tag in name:
            return tag
    return "gpu"


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for module in ("triton", "transformers"):
        try:
            env[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - optional packages
            env[module] = None
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001
        env["git_commit"] = None
    return env


def time_cuda(fn: Callable[[], object], warmup: int = 10, repeat: int = 50) -> float:
    """Median seconds of ``fn`` on the GPU, timed with CUDA events after a warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def time_cpu(fn: Callable[[], object], warmup: int = 3, repeat: int = 20, min_seconds: float = 0.0) -> float:
    """Median wall-clock seconds of ``fn`` on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    started = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_table(columns: list[str], rows: list[dict], floatfmt: str = ".3g") -> str:
    def fmt(value):
        if isinstance(value, float):
            return format(value, floatfmt)
        return "-" if value is None else str(value)

    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_results(name: str, title: str, device: str | torch.device, columns: list[str], rows: list[dict],
                  summary: dict | None = None, notes: str = "", out: str | Path | None = None) -> Path:
    """Write the results JSON (see the module docstring) and return its path."""
    device = torch.device(device)
    record = {
        "benchmark": name,
        "title": title,
        "device": device.type,
        "card": device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "environment": environment(),
        "columns": columns,
        "rows": rows,
        "summary": summary or {},
        "notes": notes,
    }
    path = Path(out) if out else RESULTS_DIR / f"{name}_{device_slug(device)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    # On the lent GPU machine, also drop a copy where the results are fetched from.
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def time_per_call(call, num_sets: int, inner: int = 20, repeat: int = 15) -> tuple[float, str]:
    """Median seconds of call(set_index), rotating input sets: CUDA-graph replays of ``inner`` calls (no
    launch overhead in the number), else eager launches if the capture fails (and say so)."""
    for i in range(2 * num_sets):  # compile, build, allocate (the counters, Triton's cache) outside the graph
        call(i % num_sets)
    torch.cuda.synchronize()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(num_sets):
                call(i)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for j in range(inner):
                call(j % num_sets)
        seconds = time_cuda(graph.replay, warmup=3, repeat=repeat) / inner
        del graph
        return seconds, "cuda graph"
    except Exception as error:  # noqa: BLE001 - fall back to eager launches, and say so
        print(f"    (graph capture failed: {type(error).__name__}: {error}; timing eager launches)", flush=True)
        torch.cuda.synchronize()
        seconds = time_cuda(lambda: [call(j % num_sets) for j in range(inner)], warmup=2, repeat=10) / inner
        return seconds, "eager"
