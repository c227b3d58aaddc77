"""``miniinfer serve``: load a model, start the engine thread, serve HTTP (and gRPC) until SIGTERM/SIGINT.

    miniinfer serve --port 8000 --max-waiting 64 --request-timeout 120
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "shakespeare", "prompt": "ROMEO.\\n", "max_tokens": 32}'

This module's argument list imports nothing heavy (``miniinfer --help`` stays fast); ``run`` imports
FastAPI, uvicorn and torch.
"""

from __future__ import annotations

import argparse
import logging

__all__ = ["add_serve_arguments", "run", "build_state", "keep_freed_memory"]

log = logging.getLogger("miniinfer.server")


def keep_freed_memory(trim_threshold: int = 256 << 20, mmap_threshold: int = 32 << 20) -> bool:
    """Tell glibc's allocator to keep freed memory instead of handing it back to the OS after every step.

    Each engine step allocates and frees the same tensors (activations, logits, sampling buffers). In a
    thread other than the main one, glibc serves them from a per-thread heap that it shrinks as soon as
    the top of it is free, so every step page-faults the same memory back in: on the 2-core CPU of
    ``benchmarks/results/serving_cpu.json`` that was ~64 000 page faults and 0.12 s of system time per
    2048 generated tokens, ~15 % of the engine thread's CPU. A fixed trim threshold (free memory kept up to
    ``trim_threshold`` bytes) and mmap threshold (allocations below ``mmap_threshold`` come from the heap,
    not from a fresh mmap each time) keep those pages mapped. Linux with glibc only (``mallopt``); returns
    whether both settings took. Call it before the engine allocates (``miniinfer serve`` does, and
    ``miniinfer bench serve`` for its in-process offline runs, so that the comparison stays fair)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: glibc's, where it is the C library
    except (OSError, AttributeError):  # e.g. musl, which has no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    trimmed = mallopt(m_trim_threshold, trim_threshold) == 1
    return mallopt(m_mmap_threshold, mmap_threshold) == 1 and trimmed


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint folder, hub id, or a bundled model's name (default: the "
                                        "bundled shakespeare model)")
    parser.add_argument("--served-model-name", help="the name clients use in 'model' (default: the folder's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 "
                                                            "for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000; 0 picks a free one)")
    parser.add_argument("--grpc-port", type=int, default=None,
                        help="also serve gRPC (miniinfer.v1.Generator + grpc.health.v1) on this port (default: off)")
    parser.add_argument("--max-waiting", type=int, default=256,
                        help="requests that may wait for a seat; more get 503 with Retry-After (default 256)")
    parser.add_argument("--request-timeout", type=float, default=None,
                        help="seconds a request may take end to end before it is aborted (default: no limit)")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0,
                        help="on SIGTERM/SIGINT, seconds in-flight requests get to finish before they are "
                             "aborted (default 10)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"],
                        help="JSON-lines logs on stderr at this level (default info)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="sequences in one step (default 256)")
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size (default: from memory)")
    parser.add_argument("--seed", type=int, default=None, help="seeds requests that carry no seed of their own")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="send a stream's new tokens every N engine steps, merged into one event: fewer "
                             "wake-ups and events for the server under load, burstier tokens for the client "
                             "(default 1: every token as it comes)")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                        help="run the engine in its own process instead of a thread of the server, so that it does "
                             "not share the interpreter lock with the HTTP event loop; with --engine-cpus, on CPUs "
                             "of its own (default: a process when the engine runs on a GPU, a thread on a CPU; "
                             "--no-engine-process: always a thread)")
    parser.add_argument("--engine-cpus", default=None, metavar="CPUS",
                        help="with --engine-process: run the engine's process on these CPUs (e.g. 0, 0-3, 0,2) and "
                             "the server process (HTTP, event loop) on the others, so that neither preempts the "
                             "other; 'auto': the last physical core (all its hyperthreads; two cores without "
                             "hyperthreads), when at least 4 CPUs are left (default: no pinning)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks (also MINIINFER_DEBUG=1)")


def use_engine_process(args) -> bool:
    """``--engine-process`` / ``--no-engine-process`` as given; by default a process exactly when the engine
    runs on a GPU. There a decode step is interpreter time (launching a captured graph, sampling, scheduling),
    and beside the event loop in one interpreter it took twice as long: on an H200 the server delivered 0.48x
    of offline throughput with the engine in a thread, 0.80x with it in a process
    (benchmarks/results/serving_h200.json). On a CPU the engine's matmuls want the cores the process split
    would take from it, and a small CPU measured the split as no faster unpinned (chapter 13): a thread."""
    if getattr(args, "engine_process", None) is not None:
        return bool(args.engine_process)
    device = getattr(args, "device", None)
    if device is None:
        import torch

        return torch.cuda.is_available()
    return str(device).startswith("cuda")


def place_processes(engine_cpus: str | None) -> tuple[set[int] | None, set[int] | None]:
    """``--engine-cpus``: the engine process's CPUs and the server process's (the other available ones),
    and pin this (the server) process to the latter. (None, None) without the option; the server keeps
    every CPU when the engine's take all of them."""
    if engine_cpus is None:
        return None, None
    from miniinfer.server.engine_process import auto_engine_cpus, available_cpus, parse_cpu_list, pin_process

    if engine_cpus.strip().lower() == "auto":
        engine = auto_engine_cpus()
        if engine is None:
            log.warning("--engine-cpus auto: too few CPUs to give the engine cores of its own; not pinning")
            return None, None
    else:
        engine = parse_cpu_list(engine_cpus)
    rest = (available_cpus() or set()) - engine
    if rest:
        pin_process(rest)
    else:
        log.warning("--engine-cpus names every CPU: the server process shares them with the engine")
    return engine, rest or None


def build_state(llm, *, model_name: str, bundled: bool, max_waiting: int = 256,
                request_timeout: float | None = None, shutdown_timeout: float = 0.0, stream_interval: int = 1):
    """The shared server state around an :class:`~miniinfer.LLM`: engine thread bridge, metrics, tracer."""
    from miniinfer.server.api import ServerState
    from miniinfer.server.async_engine import AsyncEngine
    from miniinfer.server.metrics import ServerMetrics
    from miniinfer.server.tracing import Tracer

    holder = {}

    def stats():
        engine = holder.get("engine")
        if engine is None:
            return {}
        return {**engine.stats_snapshot, "num_pending": engine._num_pending_adds}

    metrics = ServerMetrics(model_name, stats_source=stats)
    engine = AsyncEngine(llm.engine, max_waiting=max_waiting, request_timeout=request_timeout,
                         stream_interval=stream_interval,
                         on_finish=lambda request_id, output, timing, reason: metrics.observe_finished(timing, reason))
    holder["engine"] = engine
    defaults = dict(llm.generation_defaults)
    chat_stop = None
    if bundled:
        from miniinfer.models.bundled import CHAT_STOP

        chat_stop = list(CHAT_STOP)  # the bundled models have no end-of-turn token: a reply ends at a blank line
    return ServerState(engine=engine, tokenizer=llm.tokenizer, model_name=model_name,
                       max_model_len=llm.engine.max_model_len, defaults=defaults, chat_stop=chat_stop,
                       metrics=metrics, tracer=Tracer(), shutdown_drain_timeout=shutdown_timeout)


def _server_class(engine=None):
    """uvicorn's server, exiting 0 on SIGTERM/SIGINT; with ``engine`` (the app's AsyncEngine), a shutdown
    that ends every stream properly (see ``shutdown``)."""
    import asyncio
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                # SIGTERM/SIGINT asked for a graceful shutdown and got one: exit 0 instead of re-raising the
                # signal (uvicorn's default, which would end the process with 143 or 130).
                self._captured_signals.clear()

        async def shutdown(self, sockets=None):
            """uvicorn waits ``--shutdown-timeout`` seconds for the open requests, then cancels their tasks:
            a stream cut that way ends without its last chunk or ``[DONE]`` (the client sees a broken
            chunked body). So the engine's own shutdown starts with uvicorn's: requests finish for up to the
            timeout less a margin, then the rest are aborted and their streams end properly (finish reason
            ``abort``, then ``[DONE]``), within the margin. The app's lifespan shutdown then finds the
            engine stopped already."""
            timeout = self.config.timeout_graceful_shutdown
            stopping = None
            if engine is not None and timeout is not None and timeout > 0:
                margin = min(1.0, timeout / 2)
                stopping = asyncio.ensure_future(engine.shutdown(drain_timeout=timeout - margin))
            try:
                await super().shutdown(sockets=sockets)
            finally:
                if stopping is not None:
                    await stopping

    return Server


def run(args) -> int:
    from miniinfer.cli import _model_path
    from miniinfer.llm import LLM
    from miniinfer.server.logs import configure_logging

    configure_logging(args.log_level)
    keep_freed_memory()  # before the model and the engine thread allocate anything
    if args.max_waiting < 0:
        raise ValueError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    if args.stream_interval < 1:
        raise ValueError(f"--stream-interval must be >= 1 engine step, got {args.stream_interval}")
    if args.request_timeout is not None and not args.request_timeout > 0:
        raise ValueError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    args.engine_process = use_engine_process(args)
    engine_cpus = getattr(args, "engine_cpus", None)
    if engine_cpus is not None and not getattr(args, "engine_process", False):
        raise ValueError("--engine-cpus needs --engine-process (it places the engine's own process)")
    path = _model_path(args.model)
    options = {k: v for k, v in dict(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                                     num_kv_blocks=args.num_kv_blocks).items() if v is not None}
    remote = None
    if getattr(args, "engine_process", False):
        from types import SimpleNamespace

        from miniinfer.server.engine_process import RemoteEngine

        # The child process loads the model and owns the KV cache; the parent keeps what the API needs
        # (tokenizer, defaults, limits), which the child sends once it has loaded.
        engine_cpus, server_cpus = place_processes(engine_cpus)
        remote = RemoteEngine(path, dict(device=args.device, dtype=args.dtype, seed=args.seed, **options),
                              cpus=engine_cpus, deferred_outputs=True)
        llm = SimpleNamespace(engine=remote, tokenizer=remote.tokenizer, generation_defaults=remote.generation_defaults)
    else:
        llm = LLM(path, device=args.device, dtype=args.dtype, seed=args.seed, **options)
    try:
        return _serve(args, path, llm, remote)
    finally:
        if remote is not None:  # whatever happened: the child ignores SIGTERM, so stop it here
            remote.close()


def _serve(args, path, llm, remote) -> int:
    """Build the app around ``llm`` (an :class:`~miniinfer.LLM`, or the parent's view of the engine's process)
    and serve until SIGTERM/SIGINT."""
    from pathlib import Path

    import uvicorn

    from miniinfer.cli import _is_bundled
    from miniinfer.server.api import create_app

    name = args.served_model_name or Path(str(path)).name
    state = build_state(llm, model_name=name, bundled=_is_bundled(path), max_waiting=args.max_waiting,
                        request_timeout=args.request_timeout, shutdown_timeout=0.0,
                        stream_interval=args.stream_interval)
    if remote is not None:
        # A dead child: AsyncEngine stops accepting requests (503) and /health says so.
        remote.on_death = lambda error: setattr(state.engine, "dead", error)
    if args.grpc_port is not None:
        state.grpc_address = (args.host, args.grpc_port)  # started in the app's lifespan, on uvicorn's loop
    app = create_app(state)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=args.shutdown_timeout, lifespan="on")
    server = _server_class(state.engine)(config)
    log.info("serving", extra={"fields": {"model": name, "host": args.host, "port": args.port,
                                          "grpc_port": args.grpc_port, "device": str(llm.engine.device),
                                          "max_model_len": llm.engine.max_model_len,
                                          "kv_blocks": llm.engine.num_kv_blocks,
                                          "engine_process": remote.pid if remote is not None else None,
                                          "engine_cpus": getattr(args, "engine_cpus", None)}})
    server.run()
    return 0
