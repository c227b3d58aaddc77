"""The engine in a child process (``miniinfer serve --engine-process``): :class:`RemoteEngine`.

    remote = RemoteEngine(model_path, dict(device="cpu"))   # spawns the child, waits until it has loaded
    engine = AsyncEngine(remote, ...)                        # the same bridge as with an in-process engine
    ...
    remote.close()                                           # stops the child

Why a process: with the engine in a thread of the server, the engine thread and the event loop share
one interpreter lock. Every microsecond the loop spends parsing a request or writing an SSE event is
one the engine cannot spend in Python between its torch calls, so each step is slower under load
(chapter 13 measures it). In its own process the engine has an interpreter to itself; the server's
engine thread (still :class:`~miniinfer.server.async_engine.AsyncEngine`'s) mostly waits on a pipe,
which releases the lock. This is the split vLLM v1 makes between its API server and its engine core.

:class:`RemoteEngine` offers AsyncEngine the small part of :class:`~miniinfer.engine.LLMEngine` it uses
(``validate_prompt``, ``add_request``, ``abort_request``, ``has_unfinished_requests``, ``step``,
``stats``, ``requests``, ``scheduler.waiting``, ``max_model_len``) and is used, like the engine, from the
engine thread only. Validation runs in the parent with the engine's own code and the configuration the
child reports at start-up, so a bad request still gets its 400 with the engine's message, at once.

The protocol, over one :func:`multiprocessing.Pipe`:

* parent → child: a list of commands per message: ``("add", id, token_ids, params, stream, text)``,
  ``("abort", id)``, ``("shutdown",)``; commands gathered between two steps travel together.
* child → parent: ``("ready", info)`` once; then per step ``("outputs", outputs, num_waiting, stats)``
  (``stats`` at most every :data:`STATS_INTERVAL_S`, else None); ``("stats", stats)`` when it goes idle
  (so that /debug/engine sees the KV blocks freed); ``("step_failed", message)``.

The child steps as long as it has work, without waiting for the parent to read, and blocks on the pipe
when idle. If it dies, the parent notices (end of pipe, or the process no longer alive) and raises
:class:`EngineProcessDied` from ``step``: AsyncEngine fails the requests in flight, and ``on_death``
lets the server stop accepting requests (/health answers 503) instead of hanging.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from types import SimpleNamespace

from miniinfer.outputs import CompletionOutput, RequestOutput

__all__ = ["RemoteEngine", "EngineProcessDied", "STATS_INTERVAL_S"]

log = logging.getLogger("miniinfer.server.engine_process")

# engine.stats() walks the prefix cache's tree: while busy, the child sends it at most this often.
STATS_INTERVAL_S = 0.5


class EngineProcessDied(RuntimeError):
    """The engine's child process exited (crashed, was killed): no request can be served any more."""


# -- the child ------------------------------------------------------------------------------------------


def _error_output(request_id: str, text: str | None, token_ids: list[int], n: int, message: str) -> RequestOutput:
    """The final output of a request the child could not add: it fails alone, as in the thread."""
    completions = [CompletionOutput(index=i, text="", token_ids=[], finish_reason="error", error=message)
                   for i in range(n)]
    return RequestOutput(request_id, text, list(token_ids), completions, finished=True)


def _stats(engine) -> dict:
    stats = engine.stats()
    stats["engine_pid"] = os.getpid()
    return stats


def _apply(engine, commands: list[tuple], failed: list[RequestOutput]) -> bool:
    """Apply one message's commands to the engine; False when told to shut down."""
    for command in commands:
        kind = command[0]
        if kind == "add":
            _, request_id, token_ids, params, stream, text = command
            try:
                engine.add_request(token_ids, params, request_id=request_id, stream=stream)
            except Exception as error:  # noqa: BLE001 - this request fails, the engine goes on
                failed.append(_error_output(request_id, text, token_ids, params.n, f"{type(error).__name__}: {error}"))
                continue
            request = engine.requests.get(request_id)
            if request is not None and text is not None:
                request.prompt = text  # the outputs carry the prompt's text, as with the thread
        elif kind == "abort":
            engine.abort_request(command[1])
        elif kind == "shutdown":
            return False
    return True


def _engine_main(conn, model_path, llm_options: dict) -> None:
    """The child's whole life: load the model, report, then step while there is work."""
    # Ctrl-C in a terminal, or a service manager's SIGTERM to the whole group, reaches this process too:
    # ignored, so that the parent can drain its requests first; the parent stops the child (a "shutdown"
    # command, else SIGKILL), and a parent that vanishes ends it through the closed pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from miniinfer.llm import LLM
    from miniinfer.server.serve import keep_freed_memory

    keep_freed_memory()  # as the server process does (see there): no page faults on every step's tensors

    try:
        llm = LLM(model_path, **llm_options)
    except BaseException as error:  # noqa: BLE001 - tell the parent why, rather than just exiting
        conn.send(("failed", f"{type(error).__name__}: {error}"))
        return
    engine = llm.engine
    conn.send(("ready", dict(
        tokenizer=llm.tokenizer, config=engine.config, model_config=engine.model.config,
        max_model_len=engine.max_model_len, max_num_batched_tokens=engine.max_num_batched_tokens,
        num_kv_blocks=engine.num_kv_blocks, device=str(engine.device),
        generation_defaults=dict(llm.generation_defaults), stats=_stats(engine), pid=os.getpid())))
    stats_sent_at = 0.0
    idle_reported = True
    try:
        while True:
            failed: list[RequestOutput] = []
            if not engine.has_unfinished_requests():
                if not idle_reported:  # the last step freed its blocks: let the parent see it
                    conn.send(("stats", _stats(engine)))
                    idle_reported = True
                if not _apply(engine, conn.recv(), failed):  # idle: block until there is something to do
                    return
            while conn.poll():  # everything else that has arrived joins this step
                if not _apply(engine, conn.recv(), failed):
                    return
            if not engine.has_unfinished_requests():
                if failed:
                    conn.send(("outputs", failed, len(engine.scheduler.waiting), None))
                continue
            idle_reported = False
            try:
                outputs = engine.step()
            except Exception as error:  # noqa: BLE001 - the parent fails the requests in flight
                log.exception("engine step failed")
                conn.send(("step_failed", f"{type(error).__name__}: {error}"))
                continue
            now = time.perf_counter()
            stats = None
            if now - stats_sent_at >= STATS_INTERVAL_S:
                stats, stats_sent_at = _stats(engine), now
            conn.send(("outputs", failed + outputs, len(engine.scheduler.waiting), stats))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the parent is gone: nothing left to serve


# -- the parent -----------------------------------------------------------------------------------------


class _RemoteRequest:
    """What AsyncEngine may read or set on ``engine.requests[id]``: the prompt's text (sent with the add).
    No sequences: AsyncEngine then dates a request's scheduling by its first token."""

    __slots__ = ("prompt", "seqs")

    def __init__(self):
        self.prompt = None
        self.seqs = ()


class _RemoteScheduler:
    """``scheduler.waiting`` for AsyncEngine's admission count: the child's last report + unsent adds."""

    def __init__(self, remote: RemoteEngine):
        self._remote = remote

    @property
    def waiting(self) -> range:
        remote = self._remote
        return range(remote._num_waiting + sum(1 for c in remote._outbox if c[0] == "add"))


class RemoteEngine:
    """An :class:`~miniinfer.engine.LLMEngine` in a child process, behind the engine's own surface.

    ``model_path`` and ``llm_options`` are what ``LLM(model_path, **llm_options)`` takes; the child
    builds it (a CUDA context is created there, never in the parent: "spawn", not "fork").
    ``on_death(error)`` is called (in the engine thread) once, when the child is found dead."""

    def __init__(self, model_path, llm_options: dict | None = None, *, startup_timeout: float = 600.0,
                 on_death: Callable[[BaseException], None] | None = None):
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self.process = context.Process(target=_engine_main, args=(child_conn, model_path, dict(llm_options or {})),
                                       name="miniinfer-engine-core", daemon=True)
        self.process.start()
        child_conn.close()  # the parent keeps one end only: the child's exit then reads as end-of-pipe
        self.on_death = on_death
        self.dead: EngineProcessDied | None = None
        self._outbox: list[tuple] = []                    # commands not yet sent (one message per step)
        self._pending: collections.deque = collections.deque()  # received, not yet returned by step()
        self._live: set[str] = set()                      # added, final output not yet returned
        self._num_waiting = 0
        self.requests: dict[str, _RemoteRequest] = {}
        self.scheduler = _RemoteScheduler(self)
        try:
            info = self._wait_ready(startup_timeout)
        except BaseException:  # e.g. Ctrl-C while the model loads: the child ignores SIGINT/SIGTERM, so kill it
            self.close(timeout=1)
            raise
        self.tokenizer = info["tokenizer"]
        self.config = info["config"]
        self.model = SimpleNamespace(config=info["model_config"])  # validate_prompt reads model.config
        self.max_model_len = info["max_model_len"]
        self.max_num_batched_tokens = info["max_num_batched_tokens"]
        self.num_kv_blocks = info["num_kv_blocks"]
        self.device = info["device"]
        self.generation_defaults = info["generation_defaults"]
        self.pid = info["pid"]
        self._stats = info["stats"]

    def _wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while not self._conn.poll(0.2):
            if not self.process.is_alive():
                raise EngineProcessDied(f"the engine process exited with code {self.process.exitcode} "
                                        "while loading the model")
            if time.monotonic() > deadline:
                raise EngineProcessDied(f"the engine process did not load the model in {timeout} s")
        kind, payload = self._conn.recv()
        if kind == "failed":
            self.process.join(10)
            raise RuntimeError(f"the engine process could not load the model: {payload}")
        return payload

    # -- the engine's surface (engine thread only) -------------------------------------------------------

    def validate_prompt(self, prompt, params=None):
        """The engine's own validation (same checks, same messages), on the configuration the child sent."""
        from miniinfer.engine.engine import LLMEngine

        return LLMEngine.validate_prompt(self, prompt, params)

    def add_request(self, prompt, params, request_id: str, *, stream: bool = True) -> str:
        """Queue an add for the child (sent with the next step). ``prompt``: token ids, validated by
        AsyncEngine already; the text AsyncEngine sets on ``requests[id].prompt`` travels with it."""
        if self.dead is not None:
            raise self.dead
        if request_id in self._live:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._live.add(request_id)
        request = self.requests[request_id] = _RemoteRequest()
        self._outbox.append(("add", request_id, list(prompt), params, stream, request))
        return request_id

    def abort_request(self, request_id: str) -> bool:
        if self.dead is not None or request_id not in self._live:
            return False
        self._outbox.append(("abort", request_id))
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._live) or bool(self._pending)

    def step(self) -> list[RequestOutput]:
        """Send the gathered commands; return the outputs of the child's next step (waiting for it)."""
        self._flush()
        while not self._pending:
            self._receive(block=True)
        item = self._pending.popleft()
        if isinstance(item, BaseException):
            raise item
        for output in item:
            if output.finished:
                self._live.discard(output.request_id)
                self.requests.pop(output.request_id, None)
        return item

    def stats(self) -> dict:
        """The child's latest stats (it sends them with its steps and when it goes idle)."""
        if self.dead is None:
            try:
                self._receive(block=False)
            except EngineProcessDied:
                pass
        stats = dict(self._stats)
        stats["engine_process_alive"] = self.dead is None
        return stats

    # -- plumbing ----------------------------------------------------------------------------------------

    def _flush(self) -> None:
        if not self._outbox or self.dead is not None:
            return
        commands = []
        for command in self._outbox:
            if command[0] == "add":  # the prompt's text, as AsyncEngine set it after add_request
                command = (*command[:5], command[5].prompt)
            commands.append(command)
        self._outbox = []
        try:
            self._conn.send(commands)
        except (OSError, EOFError):
            self._died()

    def _receive(self, block: bool) -> None:
        """Read what the child has sent (at least one message when ``block``); notice its death."""
        while True:
            try:
                ready = self._conn.poll(0.5 if block else 0)
                if not ready:
                    if not self.process.is_alive():
                        self._died()
                    if block:
                        continue
                    return
                kind, *payload = self._conn.recv()
            except (OSError, EOFError):
                self._died()
            if kind == "outputs":
                outputs, self._num_waiting, stats = payload
                self._pending.append(outputs)
                if stats is not None:
                    self._stats = stats
                if block:
                    return
            elif kind == "stats":
                self._stats = payload[0]
            elif kind == "step_failed":
                self._pending.append(RuntimeError(payload[0]))
                if block:
                    return

    def _died(self):
        """The child is gone: forget its requests, tell the server once, raise for the caller."""
        if self.dead is None:
            self.process.join(1)
            self.dead = EngineProcessDied(f"the engine process (pid {self.process.pid}) exited with code "
                                          f"{self.process.exitcode}")
            log.error("engine process died", extra={"fields": {"pid": self.process.pid,
                                                               "exitcode": self.process.exitcode}})
            self._live.clear()
            self.requests.clear()
            self._pending.clear()
            self._outbox = []
            if self.on_death is not None:
                try:
                    self.on_death(self.dead)
                except Exception:  # noqa: BLE001
                    log.exception("on_death callback failed")
        raise self.dead

    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to stop; kill it if it does not within ``timeout`` seconds (it ignores SIGTERM)."""
        if self.process.is_alive():
            try:
                self._conn.send([("shutdown",)])
            except (OSError, EOFError):
                pass
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()
