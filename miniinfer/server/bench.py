"""``miniinfer bench serve``: a load generator for the OpenAI-compatible server, and its report.

    miniinfer bench serve                                  # starts `miniinfer serve` (bundled model, CPU)
    miniinfer bench serve --rates 1 4 16 inf --num-requests 64 --out serving.json
    miniinfer bench serve --url http://host:8000 --rates 2 8 inf      # a server that is already running

**The load.** For each offered load (requests per second; ``inf`` sends them all at once) the benchmark
sends ``num_requests`` streaming completions whose arrival gaps are exponential — a Poisson process,
the usual model of independent users — each generating exactly ``max_tokens`` tokens (``ignore_eos``)
after a one-line prompt (``--prompt-words N``: that line and N more words drawn at random for each request,
a long context without a shared prefix). Every request is its own streaming HTTP connection, as separate users would be,
read by a minimal asyncio HTTP/1.1 client (:func:`one_request`) rather than an HTTP library: on a small
machine the load generator competes with the server for the CPU, so its cost per streamed token is kept
low (about 40 µs instead of httpx's 230 µs on the 2-core CPU of ``benchmarks/results/serving_cpu.json``).

**What is measured, on the client side**: time to first token (TTFT: from sending the request to its
first streamed chunk), inter-token latency (ITL: the gaps between a request's chunks), end-to-end
latency, achieved throughput (requests/s and generated tokens/s over the run's wall time), and the
failures: ``503`` (the server's bounded queue was full) apart from other errors. The CPU seconds the
client process spent (parsing the streams costs something too) and, for a server this benchmark
started, the server process's CPU seconds are recorded with each run.

**The overhead of serving.** With a server it started itself, the benchmark also runs the same
requests (prompts, ``max_tokens``, sampling, seeds) offline through :meth:`miniinfer.LLM.generate`, all
at once, in this process, interleaved with repeated saturated (``inf``) server runs, and reports two
ratios:

* ``server_vs_offline_tok_s`` — wall-clock throughput, server over offline. On a machine with few
  cores this charges the server for the load generator, which competes with it for the CPU (and the
  offline run has no such neighbour);
* ``server_vs_offline_tok_per_cpu_s`` — tokens per CPU-second of the server *process* over tokens per
  CPU-second of the offline run: what serving costs in work, whoever else shares the machine (the
  client's CPU seconds are reported apart, never counted as the server's);
* ``bridge_vs_offline_tok_s`` and ``bridge_vs_offline_tok_per_cpu_s`` — the same requests through the
  server's :class:`~miniinfer.server.async_engine.AsyncEngine` in this process (engine thread, streamed
  outputs, hand-over to an event loop) with consumers that only count tokens: the server without HTTP.

``--compare-engine-process`` starts a second server with ``--engine-process`` (and ``--engine-cpus``) and
measures it in the same interleaved pairs, against the same offline runs
(``overhead_at_saturation_engine_process``). With ``--engine-cpus`` the load generator runs on the server
process's CPUs while it loads that server, so that it does not preempt the pinned engine either; the
offline runs keep this process's CPUs (one torch thread: where it runs does not change its speed here).

The engine work itself is the same in all of them; what the server adds is HTTP, JSON and SSE per
streamed chunk, the hand-over from the engine thread to the event loop, incremental detokenization
(streamed requests need text every step) and the two threads' competition for the interpreter lock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

__all__ = ["PROMPT_LINES", "percentile", "parse_rate", "run_rate", "offline_run", "measure_overhead",
           "run_benchmark", "add_bench_serve_arguments", "run", "COLUMNS"]

PROMPT_LINES = [
    "ROMEO.\n", "JULIET.\nO Romeo, Romeo,", "HAMLET.\nTo be, or not to be,", "KING LEAR.\nBlow, winds,",
    "MACBETH.\nIs this a dagger", "PORTIA.\nThe quality of mercy", "OTHELLO.\nIt is the cause,",
    "PROSPERO.\nOur revels now are ended.", "BRUTUS.\nRomans, countrymen,", "VIOLA.\nIf music be",
]
TEMPERATURE = 0.8
# Words of the prompt lines above, for --prompt-words: long prompts made of words every tokenizer the
# benchmark meets can encode (the bundled BPE, the GPU script's synthetic word-level one).
PROMPT_WORDS = sorted({word.strip(",.!?").lower() for line in PROMPT_LINES for word in line.split()} - {""})

# One row per offered load, in display order (chapter 13 plots offered_rps, output_tok_s, ttft_p50_s, ttft_p99_s).
COLUMNS = ["offered_rps", "requests", "ok", "rejected_503", "errors", "achieved_rps", "output_tok_s",
           "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "e2e_p50_s", "e2e_p99_s", "wall_s",
           "client_cpu_s", "server_cpu_s"]


# -- small helpers ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) with linear interpolation between order statistics; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def parse_rate(text: str) -> float:
    """A request rate: a positive number of requests per second, or ``inf`` (all at once)."""
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a rate is a number of requests per second or 'inf', got {text!r}") from None
    if not rate > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"a rate must be > 0 requests per second (or 'inf'), got {text!r}")
    return rate


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def process_cpu_seconds(pid: int | tuple[int, ...]) -> float | None:
    """User + system CPU seconds of another process so far (Linux ``/proc``; None elsewhere); of several,
    summed (``miniinfer serve --engine-process``: the server and its engine's child process)."""
    if isinstance(pid, tuple):
        seconds = [process_cpu_seconds(p) for p in pid]
        return None if None in seconds else sum(seconds)
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After "pid (comm)": field 3 is the state, so utime and stime (fields 14 and 15) sit at 11 and 12.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main_thread_cpu_seconds(pid: int | tuple[int, ...]) -> float | None:
    """User + system CPU seconds of a process's main thread (Linux; None elsewhere or for several
    processes). In ``miniinfer serve`` that is the event loop's thread: HTTP, JSON, SSE; the engine runs in
    another thread, so the process's seconds less these are the engine's."""
    if isinstance(pid, tuple):
        return None
    try:
        fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_counters(url: str, wait_idle: float = 0.0) -> dict | None:
    """The server's engine steps and busy seconds from ``/debug/engine`` (None if it has no such page).

    ``wait_idle``: first wait up to this many seconds for the server to finish its requests, so that the
    engine thread's snapshot (refreshed when it goes idle) includes the last step."""
    import httpx

    deadline = time.perf_counter() + wait_idle
    while True:
        try:
            stats = httpx.get(url + "/debug/engine", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return None
        idle = not stats.get("num_in_flight") and not stats.get("num_running")
        if idle or time.perf_counter() >= deadline:
            break
        time.sleep(0.02)
    if "num_steps" not in stats or "_busy_seconds" not in stats:
        return None
    return {"steps": stats["num_steps"], "busy_s": stats["_busy_seconds"]}


def engine_process_pid(url: str) -> int | None:
    """The pid of the engine's own process (``miniinfer serve --engine-process``), else None."""
    import httpx

    try:
        return httpx.get(url + "/debug/engine", timeout=5).json().get("engine_pid")
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


def prompt_text(index: int, prompt_words: int = 0) -> str:
    """The ``index``-th request's prompt: one of :data:`PROMPT_LINES`; with ``prompt_words``, that line
    followed by so many words drawn (seeded by ``index``) from :data:`PROMPT_WORDS` — a long context whose
    words differ from request to request, so that the prefix cache does not turn the prompts' prefill into
    hits (a long shared prefix is a different workload: benchmarks/prefix_cache.py)."""
    line = PROMPT_LINES[index % len(PROMPT_LINES)]
    if prompt_words <= 0:
        return line
    rng = random.Random(index)
    return line + " " + " ".join(rng.choice(PROMPT_WORDS) for _ in range(prompt_words))


def request_body(model: str, index: int, max_tokens: int, prompt_words: int = 0) -> dict:
    """The ``index``-th request of a run: the same for the server and the offline comparison."""
    return {"model": model, "prompt": prompt_text(index, prompt_words), "max_tokens": max_tokens,
            "temperature": TEMPERATURE, "seed": index, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


# -- the load generator -------------------------------------------------------------------------------


class _Target:
    """Where the load goes: a server's ``/v1/completions``, split once into what a connection needs."""

    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        self.host = parts.hostname
        self.ssl = parts.scheme == "https"
        self.port = parts.port or (443 if self.ssl else 80)
        self.path = (parts.path.rstrip("/") + "/v1/completions").encode()
        self.host_header = parts.netloc.encode()

    def request(self, body: dict) -> bytes:
        payload = json.dumps(body).encode()
        return (b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (self.path, self.host_header, len(payload))
                + payload)


async def _body_pieces(reader: asyncio.StreamReader, headers: dict[bytes, bytes]):
    """The response body as it arrives: de-chunked (``Transfer-Encoding: chunked``), else by length or to EOF."""
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                return
            data = await reader.readexactly(size + 2)  # the chunk and its CRLF
            yield data[:-2]
    elif b"content-length" in headers:
        yield await reader.readexactly(int(headers[b"content-length"]))
    else:
        while data := await reader.read(65536):
            yield data


async def one_request(target: _Target | str, body: dict) -> dict:
    """Stream one completion; return its client-side timings (or its failure: status 503, 500, -1).

    The client is a few lines of asyncio over one TCP connection per request (HTTP/1.1, chunked SSE),
    not an HTTP library: on a small machine the load generator shares the CPU with the server, and a
    general-purpose client's per-chunk machinery (httpx + h11: ~0.2 ms of CPU per streamed token on a
    2-core box) would be charged to the server's wall-clock throughput."""
    if isinstance(target, str):
        target = _Target(target)
    start = time.perf_counter()
    first = None
    last = start
    gaps: list[float] = []
    tokens = prompt_tokens = 0
    writer = None
    try:
        reader, writer = await asyncio.open_connection(target.host, target.port, ssl=target.ssl or None,
                                                       limit=2**22)
        writer.write(target.request(body))
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if status != 200:
            async for _ in _body_pieces(reader, headers):
                pass
            return {"status": status}
        buffer = b""
        async for piece in _body_pieces(reader, headers):
            buffer += piece
            if b"\n\n" not in buffer:
                continue
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                for line in event.split(b"\n"):
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return {"status": 500, "error": chunk["error"].get("message")}
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                        prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                    if not chunk.get("choices"):
                        continue
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
    except Exception as error:  # noqa: BLE001 - a failed request is a data point, not a crash
        return {"status": -1, "error": f"{type(error).__name__}: {error}"}
    finally:
        if writer is not None:
            writer.close()
    end = time.perf_counter()
    return {"status": 200, "ttft": (first or end) - start, "itl": gaps, "e2e": end - start, "tokens": tokens,
            "prompt_tokens": prompt_tokens}


def run_async(coroutine):
    """``asyncio.run``, on uvloop's event loop where it is installed (the load generator's and the in-process
    comparison's loops then cost what the server's does)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coroutine)
    return uvloop.run(coroutine)


async def _run_rate(url: str, model: str, rate: float, num_requests: int, max_tokens: int, seed: int,
                    prompt_words: int = 0) -> list[dict]:
    rng = random.Random(seed)
    target = _Target(url)
    # Every request is its own user, on its own connection, sent at its arrival time (no client-side pool
    # whose waiting would be counted as the server's TTFT).
    tasks = []
    for i in range(num_requests):
        request = asyncio.wait_for(one_request(target, request_body(model, i, max_tokens, prompt_words)),
                                   timeout=600.0)
        tasks.append(asyncio.ensure_future(request))
        if math.isfinite(rate) and i < num_requests - 1:
            await asyncio.sleep(rng.expovariate(rate))
    return await _gather_timeouts(tasks)


async def _gather_timeouts(tasks) -> list[dict]:
    results = []
    for task in tasks:
        try:
            results.append(await task)
        except asyncio.TimeoutError:
            results.append({"status": -1, "error": "TimeoutError: no answer in 600 s"})
    return results


def run_rate(url: str, model: str, rate: float, num_requests: int, max_tokens: int, seed: int = 0,
             server_pid: int | None = None, prompt_words: int = 0) -> dict:
    """One offered load: send the requests, wait for all of them, summarise (one row of the report)."""
    engine_before = engine_counters(url)
    server_cpu = None if server_pid is None else process_cpu_seconds(server_pid)
    loop_cpu = None if server_pid is None else main_thread_cpu_seconds(server_pid)
    cpu = time.process_time()
    start = time.perf_counter()
    results = run_async(_run_rate(url, model, rate, num_requests, max_tokens, seed, prompt_words))
    wall = time.perf_counter() - start
    client_cpu = time.process_time() - cpu
    if server_cpu is not None:
        server_cpu = process_cpu_seconds(server_pid) - server_cpu
    if loop_cpu is not None:
        loop_cpu = main_thread_cpu_seconds(server_pid) - loop_cpu
    engine_after = engine_counters(url, wait_idle=2.0) if engine_before is not None else None
    ok = [r for r in results if r["status"] == 200]
    ttft = [r["ttft"] for r in ok]
    itl = [gap for r in ok for gap in r["itl"]]
    e2e = [r["e2e"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    errors = [r.get("error") for r in results if r["status"] not in (200, 503)]
    row = {
        "offered_rps": rate if math.isfinite(rate) else "inf",
        "requests": num_requests, "ok": len(ok), "rejected_503": sum(r["status"] == 503 for r in results),
        "errors": len(errors),
        "achieved_rps": round(len(ok) / wall, 3), "output_tok_s": round(tokens / wall, 1),
        "ttft_p50_s": _round(percentile(ttft, 0.5)), "ttft_p99_s": _round(percentile(ttft, 0.99)),
        "itl_p50_s": _round(percentile(itl, 0.5)), "itl_p99_s": _round(percentile(itl, 0.99)),
        "e2e_p50_s": _round(percentile(e2e, 0.5)), "e2e_p99_s": _round(percentile(e2e, 0.99)),
        "wall_s": round(wall, 3), "client_cpu_s": round(client_cpu, 3), "server_cpu_s": _round(server_cpu, 3),
    }
    # Kept for the overhead analysis, dropped from the report's rows: the exact token count, and the engine
    # thread's steps and seconds inside them (from /debug/engine: another server may run other requests).
    row["_tokens"] = tokens
    row["_prompt_tokens"] = sum(r.get("prompt_tokens", 0) for r in ok)
    if loop_cpu is not None:
        row["_loop_cpu_s"] = loop_cpu  # the server's event-loop thread (HTTP); the rest of server_cpu_s: engine
    if engine_before is not None and engine_after is not None:
        row["_engine_steps"] = engine_after["steps"] - engine_before["steps"]
        row["_engine_busy_s"] = engine_after["busy_s"] - engine_before["busy_s"]
    if errors:
        row["_first_error"] = next((e for e in errors if e), None)
    return row


def served_model_name(url: str) -> str:
    """The first model the server lists at ``/v1/models``."""
    import httpx

    models = httpx.get(url + "/v1/models", timeout=10).json().get("data") or []
    if not models:
        raise ValueError(f"the server at {url} lists no model at /v1/models")
    return models[0]["id"]


# -- the offline comparison -----------------------------------------------------------------------------


def load_offline_llm(model: str | None, device: str | None, max_num_seqs: int | None):
    """The same model as the local server, with the same batch limit and CPU threads, in this process."""
    import torch

    from miniinfer import LLM
    from miniinfer.cli import _model_path
    from miniinfer.server.serve import keep_freed_memory

    # The server sets glibc's allocator to keep freed memory (serve.keep_freed_memory): so does the offline
    # side of the comparison, which would otherwise pay page faults the server does not.
    keep_freed_memory()
    # ServerProcess runs the server with OMP_NUM_THREADS (default 1): give the offline run as many.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    options = {} if max_num_seqs is None else {"max_num_seqs": max_num_seqs}
    llm = LLM(_model_path(model), device=device or "cpu", **options)
    offline_run(llm, 2, 4)  # warm-up
    return llm


def served_params(llm, index: int, max_tokens: int):
    """The ``SamplingParams`` the server gives :func:`request_body`'s ``index``-th request: the model's
    ``generation_config.json`` defaults (e.g. the bundled models' top-k 50 and top-p 0.95), overridden by
    the fields the request sets — the server's rule (vLLM's), so that offline runs sample the same way.
    (It matters: with the bundled model on CPU, a step with top-k/top-p filtering takes about 1.5x as long
    as one without.)"""
    from miniinfer import SamplingParams

    values = dict(llm.generation_defaults)
    values.update(temperature=TEMPERATURE, seed=index, max_tokens=max_tokens, ignore_eos=True)
    return SamplingParams(**values)


def offline_run(llm, num_requests: int, max_tokens: int, prompt_words: int = 0) -> dict:
    """The saturated run's requests through ``LLM.generate``, all at once: tokens, wall and CPU seconds."""
    prompts = [prompt_text(i, prompt_words) for i in range(num_requests)]
    params = [served_params(llm, i, max_tokens) for i in range(num_requests)]
    steps = llm.engine.counters["num_steps"]
    cpu = time.process_time()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"tokens": tokens, "wall_s": wall, "cpu_s": cpu, "steps": llm.engine.counters["num_steps"] - steps}


def bridge_run(bridge, llm, num_requests: int, max_tokens: int, prompt_words: int = 0) -> dict:
    """The same requests through an :class:`~miniinfer.server.async_engine.AsyncEngine` in this process,
    whose consumers only count tokens: the server without HTTP (engine thread, streaming outputs, the
    hand-over to an event loop). Tokens, wall and CPU seconds (engine thread and event loop together)."""

    async def one(index: int) -> int:
        params = served_params(llm, index, max_tokens)
        stream = await bridge.submit(prompt_text(index, prompt_words), params)
        tokens = 0
        async for output in stream:
            tokens += sum(len(c.new_token_ids) for c in output.outputs)
        return tokens

    async def run_all() -> int:
        return sum(await asyncio.gather(*(one(i) for i in range(num_requests))))

    cpu = time.process_time()
    start = time.perf_counter()
    tokens = run_async(run_all())
    return {"tokens": tokens, "wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}


@contextlib.contextmanager
def _pinned(cpus: set[int] | None):
    """Run this (the load generator's) process on ``cpus`` for a while; None: leave it where it is."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def measure_overhead(url: str, model: str, server_pid: int | None, llm, num_requests: int, max_tokens: int,
                     seed: int, repeats: int, bridge=None, client_cpus: set[int] | None = None,
                     others: dict | None = None, prompt_words: int = 0) -> dict:
    """Alternate saturated server runs and offline runs (and, given an ``AsyncEngine`` ``bridge`` around
    another copy of the model, :func:`bridge_run`) ``repeats`` times; the medians and their ratios.

    Interleaving matters on a shared machine: a neighbour's job that slows one half of the comparison
    slows the other half of the same pair too. The ratios are medians of the per-pair ratios.

    ``client_cpus``: run the load generator on these CPUs while it loads the server (a server whose engine
    process is pinned to the others: ``--engine-cpus``); the offline runs keep this process's own CPUs.
    ``others``: more servers measured in the same pairs, ``{name: {"url", "model", "pid", "client_cpus"}}``
    (e.g. the same server with ``--engine-process``); each gets its own summary under its name, against
    the same offline runs. The servers' order alternates from repeat to repeat."""
    targets = {"": {"url": url, "model": model, "pid": server_pid, "client_cpus": client_cpus}, **(others or {})}
    served: dict[str, list] = {name: [] for name in targets}
    offline_runs = []
    bridged = []
    for repeat in range(repeats):
        names = list(targets) if repeat % 2 == 0 else list(targets)[::-1]
        for name in names:
            target = targets[name]
            with _pinned(target.get("client_cpus")):
                served[name].append(run_rate(target["url"], target["model"], math.inf, num_requests, max_tokens,
                                             seed, server_pid=target.get("pid"), prompt_words=prompt_words))
        offline_runs.append(offline_run(llm, num_requests, max_tokens, prompt_words))
        if bridge is not None:
            bridged.append(bridge_run(bridge, llm, num_requests, max_tokens, prompt_words))
    summary = _overhead_summary(list(zip(served[""], offline_runs)), repeats, num_requests, max_tokens)
    if bridged:
        summary["bridge_tok_s"] = round(statistics.median(b["tokens"] / b["wall_s"] for b in bridged), 1)
        summary["bridge_vs_offline_tok_s"] = round(statistics.median(
            (b["tokens"] / b["wall_s"]) / (o["tokens"] / o["wall_s"]) for b, o in zip(bridged, offline_runs)), 3)
        summary["bridge_tok_per_cpu_s"] = round(statistics.median(b["tokens"] / b["cpu_s"] for b in bridged), 1)
        summary["bridge_vs_offline_tok_per_cpu_s"] = round(statistics.median(
            (b["tokens"] / b["cpu_s"]) / (o["tokens"] / o["cpu_s"]) for b, o in zip(bridged, offline_runs)), 3)
    # "runs" last, after the bridge's keys (the order of the report's keys).
    summary["runs"] = summary.pop("runs")
    for name in targets:
        if name:
            summary[name] = _overhead_summary(list(zip(served[name], offline_runs)), repeats, num_requests,
                                              max_tokens)
    return summary


def _overhead_summary(pairs: list[tuple[dict, dict]], repeats: int, num_requests: int, max_tokens: int) -> dict:
    """Medians and ratios of ``(server run, offline run)`` pairs (see :func:`measure_overhead`)."""
    server_tok_s = [s["_tokens"] / s["wall_s"] for s, _ in pairs]
    offline_tok_s = [o["tokens"] / o["wall_s"] for _, o in pairs]
    ratios = [s / o for s, o in zip(server_tok_s, offline_tok_s)]
    summary = {
        "repeats": repeats, "num_requests": num_requests, "max_tokens": max_tokens,
        "server_tok_s": round(statistics.median(server_tok_s), 1),
        "offline_tok_s": round(statistics.median(offline_tok_s), 1),
        "server_vs_offline_tok_s": round(statistics.median(ratios), 3),
        "server_vs_offline_tok_s_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "client_cpu_s_per_1k_tokens": round(statistics.median(1e3 * s["client_cpu_s"] / s["_tokens"]
                                                              for s, _ in pairs), 3),
        "offline_cpu_s_per_1k_tokens": round(statistics.median(1e3 * o["cpu_s"] / o["tokens"] for _, o in pairs), 3),
    }
    if all(s["server_cpu_s"] for s, _ in pairs):
        server_eff = [s["_tokens"] / s["server_cpu_s"] for s, _ in pairs]
        offline_eff = [o["tokens"] / o["cpu_s"] for _, o in pairs]
        summary.update({
            "server_cpu_s_per_1k_tokens": round(statistics.median(1e3 * s["server_cpu_s"] / s["_tokens"]
                                                                  for s, _ in pairs), 3),
            "server_tok_per_cpu_s": round(statistics.median(server_eff), 1),
            "offline_tok_per_cpu_s": round(statistics.median(offline_eff), 1),
            "server_vs_offline_tok_per_cpu_s": round(statistics.median(s / o for s, o in zip(server_eff, offline_eff)),
                                                     3),
        })
        # Where the server's CPU goes, per generated token: its event loop's thread (HTTP, JSON, SSE, the
        # hand-over) and the rest of the process (the engine thread), against the offline run's.
        summary["offline_cpu_us_per_token"] = round(statistics.median(1e6 * o["cpu_s"] / o["tokens"] for _, o in pairs), 1)
        if all("_loop_cpu_s" in s for s, _ in pairs):
            summary["server_loop_cpu_us_per_token"] = round(statistics.median(
                1e6 * s["_loop_cpu_s"] / s["_tokens"] for s, _ in pairs), 1)
            summary["server_engine_cpu_us_per_token"] = round(statistics.median(
                1e6 * (s["server_cpu_s"] - s["_loop_cpu_s"]) / s["_tokens"] for s, _ in pairs), 1)
    # Where the difference goes: more steps (smaller batches: requests trickle in over HTTP), slower steps
    # (streaming detokenization, the interpreter lock shared with the event loop), or an engine thread that
    # waits (busy fraction < 1: nothing to step, or no lock to step with).
    summary["offline_steps"] = statistics.median(o["steps"] for _, o in pairs)
    summary["offline_step_ms"] = round(statistics.median(1e3 * o["wall_s"] / o["steps"] for _, o in pairs), 2)
    if all("_engine_steps" in s and s["_engine_steps"] for s, _ in pairs):
        summary["server_steps"] = statistics.median(s["_engine_steps"] for s, _ in pairs)
        summary["server_step_ms"] = round(statistics.median(1e3 * s["_engine_busy_s"] / s["_engine_steps"]
                                                            for s, _ in pairs), 2)
        summary["server_engine_busy_fraction"] = round(statistics.median(s["_engine_busy_s"] / s["wall_s"]
                                                                         for s, _ in pairs), 3)
    summary["runs"] = [{"server_tok_s": round(st, 1), "offline_tok_s": round(ot, 1),
                        "server_cpu_s": s["server_cpu_s"], "client_cpu_s": s["client_cpu_s"],
                        "offline_cpu_s": round(o["cpu_s"], 3), "server_steps": s.get("_engine_steps"),
                        "offline_steps": o["steps"]}
                       for (s, o), st, ot in zip(pairs, server_tok_s, offline_tok_s)]
    return summary


# -- the whole benchmark ----------------------------------------------------------------------------------


def server_pids(server) -> int | tuple[int, int]:
    """The pid whose CPU seconds are the server's: its process, and its engine's (``--engine-process``)."""
    engine_pid = engine_process_pid(server.url)
    return server.process.pid if engine_pid is None else (server.process.pid, engine_pid)


def load_generator_cpus(server) -> set[int] | None:
    """Where the load generator should run while it loads ``server``: on the server process's CPUs when
    its engine process is pinned to others (``--engine-cpus``), so that the client does not preempt the
    engine either; else None (anywhere)."""
    try:
        engine_cpus = server.engine_stats().get("engine_cpus")
    except Exception:  # noqa: BLE001 - no such page: no placement
        return None
    if not engine_cpus:
        return None
    from miniinfer.server.engine_process import available_cpus, parse_cpu_list

    rest = (available_cpus() or set()) - parse_cpu_list(engine_cpus)
    return rest or None


def describe_engine(process: bool, engine_cpus: str | None, resolved: str | None = None) -> str:
    """``resolved``: the CPUs the server reports for its engine's process (what ``--engine-cpus auto`` chose)."""
    if not process:
        return "thread (miniinfer serve)"
    if engine_cpus:
        where = resolved or engine_cpus
        return (f"process on CPU {where} (miniinfer serve --engine-process --engine-cpus {engine_cpus}); "
                "the server process and the load generator on the other CPUs")
    return "process (miniinfer serve --engine-process)"


def run_benchmark(args, echo=print) -> dict:
    """Run the sweep (and, with a local server, the overhead measurement); return the report:
    ``{"columns", "rows", "summary", "notes", "model"}``. ``echo`` prints each row as it is measured."""
    rates = [parse_rate(str(r)) for r in args.rates]
    server = process_server = None
    url = args.url.rstrip("/") if args.url else None
    if url is None:
        from miniinfer.server.testing import ServerProcess

        server_args = ["--max-waiting", str(args.max_waiting), "--log-level", "warning"]
        if getattr(args, "stream_interval", 1) != 1:
            server_args += ["--stream-interval", str(args.stream_interval)]
        if args.model:
            server_args += ["--model", args.model]
        if args.max_num_seqs is not None:
            server_args += ["--max-num-seqs", str(args.max_num_seqs)]
        if args.device and args.device != "cpu":
            server_args += ["--device", args.device]
        engine_cpus = getattr(args, "engine_cpus", None)
        process_args = ["--engine-process"] + (["--engine-cpus", engine_cpus] if engine_cpus else [])
        # Say which placement: the server's default depends on the device (a process on a GPU).
        server_args += process_args if getattr(args, "engine_process", False) else ["--no-engine-process"]
        startup_timeout = getattr(args, "server_startup_timeout", 90.0)
        server = ServerProcess(*server_args, startup_timeout=startup_timeout)
        url = server.url
        if getattr(args, "compare_engine_process", False) and not getattr(args, "engine_process", False):
            # The same server with its engine in a process of its own, measured in the same pairs.
            thread_args = [a for a in server_args if a != "--no-engine-process"]
            process_server = ServerProcess(*thread_args, *process_args, startup_timeout=startup_timeout)
    resolved_cpus = None
    for started in (process_server, server if getattr(args, "engine_process", False) else None):
        if started is not None and resolved_cpus is None:
            try:
                resolved_cpus = started.engine_stats().get("engine_cpus")
            except Exception:  # noqa: BLE001 - no such page: the option as given
                pass
    pid = None if server is None else server_pids(server)
    client_cpus = None if server is None else load_generator_cpus(server)
    rows: list[dict] = []
    overhead = None
    prompt_words = getattr(args, "prompt_words", 0)
    try:
        model = served_model_name(url) if server is not None or not args.model else args.model
        with _pinned(client_cpus):
            run_rate(url, model, math.inf, 4, 4, args.seed)  # warm-up: first requests pay one-time costs
            for rate in rates:
                rows.append(run_rate(url, model, rate, args.num_requests, args.max_tokens, args.seed,
                                     server_pid=pid, prompt_words=prompt_words))
                if rows[-1].get("_first_error"):
                    echo(f"  (first error at rate {rate:g}: {rows[-1]['_first_error']})")
                echo(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("_")}))
        others = {}
        if process_server is not None:
            others["engine_process"] = {"url": process_server.url, "model": model,
                                        "pid": server_pids(process_server),
                                        "client_cpus": load_generator_cpus(process_server)}
            with _pinned(others["engine_process"]["client_cpus"]):
                run_rate(process_server.url, model, math.inf, 4, 4, args.seed)  # its warm-up
        if server is not None and args.overhead_repeats > 0:
            echo(f"overhead at saturation: {args.overhead_repeats} x (server at rate inf, then offline "
                 f"LLM.generate), {args.overhead_requests} requests each ...")
            from miniinfer.server.async_engine import AsyncEngine

            llm = load_offline_llm(args.model, args.device, args.max_num_seqs)
            # A second copy of the model behind the server's engine thread, without HTTP (see bridge_run).
            bridge = AsyncEngine(load_offline_llm(args.model, args.device, args.max_num_seqs).engine,
                                 max_waiting=10**9)
            bridge.start()
            try:
                overhead = measure_overhead(url, model, pid, llm, args.overhead_requests, args.max_tokens,
                                            args.seed, args.overhead_repeats, bridge=bridge,
                                            client_cpus=client_cpus, others=others, prompt_words=prompt_words)
            finally:
                asyncio.run(bridge.shutdown())
            del llm, bridge
    finally:
        for started in (server, process_server):
            if started is not None:
                started.stop()
    prompt_tokens = sum(r.get("_prompt_tokens", 0) for r in rows)
    answered = sum(r["ok"] for r in rows)
    for row in rows:
        for key in [k for k in row if k.startswith("_")]:
            del row[key]
    summary = {"num_requests": args.num_requests, "max_tokens": args.max_tokens, "max_num_seqs": args.max_num_seqs,
               "prompt_words": prompt_words, "stream_interval": getattr(args, "stream_interval", 1),
               # as the server counted them (each stream's usage chunk), over the answered requests of the sweep
               "prompt_tokens_mean": round(prompt_tokens / answered, 1) if answered else None,
               "server": "started by the benchmark" if server is not None else url}
    if server is not None:
        summary["engine"] = describe_engine(getattr(args, "engine_process", False), getattr(args, "engine_cpus", None),
                                            resolved_cpus)
    finite = [r for r in rows if r["offered_rps"] != "inf" and r["ttft_p50_s"] is not None]
    if finite:
        summary["unloaded_ttft_p50_s"] = finite[0]["ttft_p50_s"]
        itl = [r["itl_p50_s"] for r in finite if r["itl_p50_s"]]
        summary["itl_p50_median_s"] = statistics.median(itl) if itl else None
    if rows:
        summary["max_achieved_rps"] = max(r["achieved_rps"] for r in rows)
    if overhead is not None:
        if "engine_process" in overhead:
            summary["overhead_at_saturation_engine_process"] = {
                "engine": describe_engine(True, getattr(args, "engine_cpus", None), resolved_cpus),
                **overhead.pop("engine_process")}
        summary["overhead_at_saturation"] = overhead
        # The keys an earlier version of this report had, for readers of old and new files alike.
        summary["offline_output_tok_s"] = overhead["offline_tok_s"]
        summary["server_vs_offline_at_saturation"] = overhead["server_vs_offline_tok_s"]
    prompt = ("a one-line prompt" if not prompt_words else
              f"a prompt of one line and {prompt_words} words drawn at random per request (prompt_tokens_mean "
              "tokens on average)")
    notes = ("Client-side timings over HTTP on the same machine as the server; each request generates "
             f"{args.max_tokens} tokens (ignore_eos) after {prompt}, temperature {TEMPERATURE} (other "
             "sampling fields: the model's generation_config.json defaults, as the server applies them). "
             "client_cpu_s: CPU seconds of the load generator's process during the run; server_cpu_s: of the "
             "server process (only for a server the benchmark started). On a shared CPU the absolute numbers "
             "depend on the machine's load.")
    if getattr(args, "stream_interval", 1) != 1:
        notes += (f" The servers ran with --stream-interval {args.stream_interval}: each stream's tokens arrive "
                  f"every {args.stream_interval} engine steps, merged into one event (fewer, burstier events; "
                  "the same tokens).")
    if overhead is not None:
        notes += (" overhead_at_saturation: server_vs_offline_tok_s is wall-clock throughput of the server at "
                  "rate inf over LLM.generate of the same requests in one process (the server also shares the "
                  "machine with the client); server_vs_offline_tok_per_cpu_s is tokens per CPU-second of the "
                  "server process over tokens per CPU-second of the offline run (medians of interleaved pairs); "
                  "bridge_*: AsyncEngine without HTTP, in the benchmark's process. *_cpu_us_per_token: CPU "
                  "microseconds per generated token of the offline run, and of the server split into its event "
                  "loop's thread (HTTP, JSON, SSE, hand-over) and the rest (the engine thread). The load generator "
                  "is a minimal asyncio HTTP/1.1 client; its CPU (client_cpu_s) is never counted as the server's.")
    if "overhead_at_saturation_engine_process" in summary:
        notes += (" overhead_at_saturation_engine_process: the same measurement, in the same pairs and against the "
                  "same offline runs, for a second server started with --engine-process (and --engine-cpus: its "
                  "engine process on those CPUs, the server process and, while it loads that server, the load "
                  "generator on the others); its cpu_s counts both processes.")
    return {"columns": list(COLUMNS), "rows": rows, "summary": summary, "notes": notes}


# -- the results file and the command line ------------------------------------------------------------------


def describe_card(device: str | None) -> str:
    """The accelerator's name, or the CPU's model, core count and torch threads."""
    from miniinfer.env import card_name

    return card_name(device)


def results_record(report: dict, device: str | None, command: list[str]) -> dict:
    """The report in the schema of ``benchmarks/results/*.json`` (see ``benchmarks/common.py``)."""
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "benchmark": "serving",
        "title": "Serving: latency against offered load (Poisson arrivals, streaming clients)",
        "device": "cuda" if device and device.startswith("cuda") else "cpu",
        "card": describe_card(device),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(shlex.quote(a) for a in command),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "cuda": torch.version.cuda, "git_commit": commit},
        "columns": report["columns"], "rows": report["rows"], "summary": report["summary"], "notes": report["notes"],
    }


def format_table(columns: list[str], rows: list[dict]) -> str:
    def cell(value):
        if isinstance(value, float):
            return format(value, ".3g")
        return "-" if value is None else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def overhead_lines(overhead: dict) -> list[str]:
    lines = [f"offline LLM.generate: {overhead['offline_tok_s']} tok/s; server at rate inf: {overhead['server_tok_s']} "
             f"tok/s -> server/offline {overhead['server_vs_offline_tok_s']:.2f}x (wall clock, median of "
             f"{overhead['repeats']} interleaved pairs"
             + (", range {:.2f}-{:.2f})".format(*overhead["server_vs_offline_tok_s_range"])
                if "server_vs_offline_tok_s_range" in overhead else ")"),
             f"client (load generator) CPU: {overhead['client_cpu_s_per_1k_tokens']} s per 1000 tokens"]
    if "server_vs_offline_tok_per_cpu_s" in overhead:
        lines.append(f"per CPU-second: server process {overhead['server_tok_per_cpu_s']} tok, offline "
                     f"{overhead['offline_tok_per_cpu_s']} tok -> {overhead['server_vs_offline_tok_per_cpu_s']:.2f}x")
    if "server_loop_cpu_us_per_token" in overhead:
        lines.append(f"CPU per generated token: offline {overhead['offline_cpu_us_per_token']} us; server engine "
                     f"thread {overhead['server_engine_cpu_us_per_token']} us + event loop (HTTP, JSON, SSE) "
                     f"{overhead['server_loop_cpu_us_per_token']} us")
    if "bridge_vs_offline_tok_per_cpu_s" in overhead:
        lines.append(f"without HTTP (AsyncEngine in-process): {overhead['bridge_tok_s']} tok/s "
                     f"({overhead['bridge_vs_offline_tok_s']:.2f}x offline), per CPU-second "
                     f"{overhead['bridge_vs_offline_tok_per_cpu_s']:.2f}x offline")
    if "server_step_ms" in overhead:
        lines.append(f"engine steps: server {overhead['server_steps']} x {overhead['server_step_ms']} ms (busy "
                     f"{overhead['server_engine_busy_fraction']:.0%} of the wall time), offline "
                     f"{overhead['offline_steps']} x {overhead['offline_step_ms']} ms")
    return lines


def add_bench_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000 (default: start `miniinfer "
                                      "serve` on a free port for the duration of the benchmark)")
    parser.add_argument("--model", default=None,
                        help="the model to serve (folder, hub id or bundled name; default: the bundled shakespeare "
                             "model); with --url, the served model name (default: the first of /v1/models)")
    parser.add_argument("--rates", nargs="+", type=parse_rate, default=[1.0, 2.0, 4.0, 8.0, 16.0, math.inf],
                        metavar="RATE", help="offered loads in requests/s, 'inf' = all at once (default: 1 2 4 8 16 "
                                             "inf)")
    parser.add_argument("--num-requests", type=_positive_int, default=48, help="requests per rate (default 48)")
    parser.add_argument("--max-tokens", type=_positive_int, default=32,
                        help="tokens each request generates (default 32)")
    parser.add_argument("--prompt-words", type=int, default=0,
                        help="long prompts: each request's line followed by this many words drawn at random for it "
                             "(no shared prefix beyond the line; default 0: the line alone)")
    parser.add_argument("--max-num-seqs", type=_positive_int, default=32,
                        help="the local server's batch limit, and the offline run's (default 32)")
    parser.add_argument("--max-waiting", type=int, default=100000,
                        help="the local server's bound on waiting requests (default 100000: no 503s)")
    parser.add_argument("--device", default=None, help="the local server's device (default cpu)")
    parser.add_argument("--stream-interval", type=_positive_int, default=1, metavar="N",
                        help="the local servers' --stream-interval: a stream's tokens every N engine steps, merged "
                             "into one event (default 1: every step)")
    parser.add_argument("--engine-process", action="store_true",
                        help="start the local server with --engine-process (the engine in its own process); "
                             "its CPU seconds then include the engine's process")
    parser.add_argument("--engine-cpus", default=None, metavar="CPUS",
                        help="with --engine-process or --compare-engine-process: pin the engine's process to these "
                             "CPUs (e.g. 0) and the server process and this load generator to the others")
    parser.add_argument("--compare-engine-process", action="store_true",
                        help="also start the server with --engine-process (and --engine-cpus) and measure its "
                             "overhead at saturation in the same interleaved pairs")
    parser.add_argument("--overhead-repeats", type=int, default=3,
                        help="saturated server runs interleaved with offline LLM.generate runs, for the overhead "
                             "ratios (local server only; 0 = skip; default 3)")
    parser.add_argument("--overhead-requests", type=_positive_int, default=None,
                        help="requests in each overhead run (default: --num-requests)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times (default 0)")
    parser.add_argument("--server-startup-timeout", type=float, default=90.0,
                        help="seconds the server it starts may take to answer /health (default 90; a first start "
                             "on a GPU compiles kernels and captures CUDA graphs)")
    parser.add_argument("--out", help="also write the report as JSON to this file (benchmarks/results schema)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks (also MINIINFER_DEBUG=1)")


def check_arguments(args) -> None:
    """What argparse's types cannot see: raise ValueError (a one-line error from the command line)."""
    if args.overhead_repeats < 0:
        raise ValueError(f"--overhead-repeats must be >= 0, got {args.overhead_repeats}")
    if args.max_waiting < 0:
        raise ValueError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    if args.prompt_words < 0:
        raise ValueError(f"--prompt-words must be >= 0, got {args.prompt_words}")
    if args.url is not None and not args.url.startswith(("http://", "https://")):
        raise ValueError(f"--url must start with http:// or https://, got {args.url!r}")
    if args.overhead_requests is None:
        args.overhead_requests = args.num_requests
    if args.engine_cpus is not None:
        if not (args.engine_process or args.compare_engine_process):
            raise ValueError("--engine-cpus needs --engine-process or --compare-engine-process")
        if args.url is not None:
            raise ValueError("--engine-cpus places a server the benchmark starts: not with --url")
        from miniinfer.server.engine_process import parse_cpu_list

        if args.engine_cpus.strip().lower() != "auto":
            parse_cpu_list(args.engine_cpus)  # a bad list is an error here, not a server that will not start


def run(args) -> int:
    """``miniinfer bench serve``: run, print the table (and the overhead), write ``--out``."""
    check_arguments(args)
    try:
        import httpx  # noqa: F401 - the load generator's client
    except ImportError as error:
        raise ImportError(f"miniinfer bench serve needs httpx: pip install httpx ({error})") from None
    report = run_benchmark(args)
    print(format_table(report["columns"], report["rows"]), flush=True)
    overhead = report["summary"].get("overhead_at_saturation")
    if overhead is not None:
        print("\n".join(overhead_lines(overhead)), flush=True)
    process_overhead = report["summary"].get("overhead_at_saturation_engine_process")
    if process_overhead is not None:
        print(f"engine {process_overhead['engine']}:\n  " + "\n  ".join(overhead_lines(process_overhead)),
              flush=True)
    if args.out:
        record = results_record(report, args.device, [Path(sys.argv[0]).name, *sys.argv[1:]])
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")
    return 0
