"""The bridge between asyncio request handlers and the engine: one engine loop in its own thread.

    engine = AsyncEngine(llm.engine, max_waiting=64)
    engine.start()
    stream = await engine.submit(prompt, params)      # raises QueueFull / ValueError at once
    async for output in stream:                       # RequestOutputs, token by token
        ...
    await engine.shutdown(drain_timeout=10)

Why a thread: ``LLMEngine.step()`` is plain blocking Python + torch (milliseconds to seconds). Run on
the event loop it would freeze every other client's socket for that long; in its own thread, the
event loop keeps accepting requests and writing tokens while the engine computes (torch releases the
GIL inside its kernels).

The engine is not thread-safe, so **only the engine thread touches it**. Handlers talk to it through
a command list (add, abort) guarded by a lock; the engine thread answers through each request's own
``asyncio.Queue``, filled with ``loop.call_soon_threadsafe`` (the only safe way to wake an event loop
from another thread). New requests join the running batch at the next step (continuous batching).

Two things keep the hand-over cheap when many requests stream at once (each token of each request is
one HTTP event, and the event loop and the engine thread share one interpreter lock, so every
microsecond the loop spends per token is one the engine does not step): a step's outputs for all the
requests of one event loop cross the thread boundary in **one** wake-up, not one per request; and a
request whose consumer has not yet read its previous output gets the new one **merged** into it
(:class:`OutputQueue`): a slow reader receives fewer, larger deltas instead of a growing backlog. A
reader that keeps up sees one output per step, as before.

Admission is bounded: at most ``max_waiting`` requests may wait for their first step; one more raises
:class:`QueueFull` (the HTTP layer answers 503 with ``Retry-After``) instead of letting latency grow
without limit. A request whose consumer goes away (client disconnect, timeout, cancelled task) is
aborted, which frees its KV blocks at once. An exception in one request's processing fails that
request only; the loop itself never dies of one.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from miniinfer.engine.sequence import SequenceStatus
from miniinfer.outputs import RequestOutput
from miniinfer.sampling import SamplingParams

__all__ = ["AsyncEngine", "QueueFull", "EngineStopped", "RequestTimeout", "RequestTiming", "deliver_threadsafe",
           "admission_rule", "OutputQueue", "merge_outputs", "DeferredOutput"]

log = logging.getLogger("miniinfer.server.engine")


def deliver_threadsafe(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item) -> None:
    """From the engine thread, put ``item`` into a queue that belongs to ``loop`` (another thread's).

    asyncio objects are not thread-safe: ``queue.put_nowait`` called here would wake the waiting
    handler through ``loop.call_soon``, which neither locks nor wakes a loop blocked in ``select``.
    ``loop.call_soon_threadsafe`` appends the call under a lock and writes a byte to the loop's
    self-pipe, so the loop wakes up and runs ``put_nowait`` itself, in its own thread."""
    loop.call_soon_threadsafe(queue.put_nowait, item)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    """In the event loop's thread: hand each ``(queue, item)`` of one engine step to its queue."""
    for queue, item in items:
        queue.put_nowait(item)


class DeferredOutput:
    """A streamed output that becomes a :class:`~miniinfer.outputs.RequestOutput` only when its consumer
    reads it (:meth:`materialize`, called by :class:`RequestStream` in the event loop's thread). What the
    engine's bookkeeping reads of a RequestOutput is there at once: ``request_id``, ``finished``,
    ``outputs`` (final only: the finish reasons), ``num_cached_tokens``, ``num_new_tokens``,
    ``num_generated_tokens``.
    ``merge(newer)``: one deferred output for two consecutive unread ones (the queue's backlog). The
    engine-process mode's :class:`~miniinfer.server.engine_process.PendingTokens` is one: its text is
    decoded by the reader, once per event, instead of once per token by the thread that reads the engine."""

    __slots__ = ()

    def merge(self, newer: DeferredOutput) -> DeferredOutput:
        raise NotImplementedError

    def materialize(self) -> RequestOutput:
        raise NotImplementedError


def merge_outputs(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """One streamed output for two consecutive ones of a request: ``newer``, whose deltas (``new_text``,
    ``new_token_ids``) also carry those of ``older``. Everything else in a streamed output is cumulative
    (text, token ids, logprobs, finish reason), so ``newer`` already has it. New objects: the engine
    thread may still read ``newer`` (its finish callback). Deferred outputs merge their own way."""
    if isinstance(older, DeferredOutput):
        return older.merge(newer)
    deltas = {c.index: c for c in older.outputs if c.new_text or c.new_token_ids}
    if not deltas:
        return newer
    outputs = []
    for completion in newer.outputs:
        earlier = deltas.get(completion.index)
        if earlier is not None:
            completion = replace(completion, new_text=earlier.new_text + completion.new_text,
                                 new_token_ids=earlier.new_token_ids + completion.new_token_ids)
        outputs.append(completion)
    return replace(newer, outputs=outputs)


_OUTPUTS = (RequestOutput, DeferredOutput)


class OutputQueue(asyncio.Queue):
    """A request's ``asyncio.Queue`` of outputs, which merges a streamed output into the previous one while
    that one is still unread (:func:`merge_outputs`).

    Why: every output becomes one HTTP event, and under load the event loop's work per event competes with
    the engine thread for the interpreter lock. When the consumer falls behind, sending the backlog event
    by event would make it fall further behind; one event for the merged deltas costs what one did. The
    same tokens and text arrive, no later, in fewer chunks. (``_put`` is asyncio.Queue's hook for the
    storage policy, as PriorityQueue and LifoQueue use it.)"""

    def _init(self, maxsize):
        super()._init(maxsize)
        self.num_merged = 0

    def _put(self, item):
        queue = self._queue
        if (queue and isinstance(item, _OUTPUTS) and isinstance(queue[-1], _OUTPUTS)
                and not queue[-1].finished):
            queue[-1] = merge_outputs(queue[-1], item)
            self.num_merged += 1
        else:
            queue.append(item)


def admission_rule(num_waiting: int, max_waiting: int, finish_rate: float) -> int | None:
    """Admit (``None``) while fewer than ``max_waiting`` requests wait; else the seconds the client should
    wait before retrying (``Retry-After``): the time the queue needs to make room for one more request,
    at ``finish_rate`` requests per second (Little's law), between 1 and 60 s (1 when the rate is unknown)."""
    if num_waiting < max_waiting:
        return None
    if finish_rate <= 0:
        return 1
    return max(1, min(60, math.ceil((num_waiting - max_waiting + 1) / finish_rate)))


# engine.stats() walks the prefix cache's tree (O(cached blocks), about a millisecond with the bundled model
# once its cache has filled): while busy, the snapshot that /metrics and /debug/engine read is refreshed at
# most this often, not after every step (at 50 ms it cost ~2 % of the engine thread's time under load).
# Idle turns always publish. The admission rule reads its own live counts, never this snapshot.
STATS_INTERVAL_S = 0.5

class QueueFull(Exception):
    """The waiting queue is at its bound: try again later (HTTP 503 + Retry-After)."""

    def __init__(self, num_waiting: int, retry_after: int):
        super().__init__(f"the server is overloaded: {num_waiting} requests are already waiting; retry later")
        self.retry_after = retry_after


class EngineStopped(Exception):
    """The engine is shutting down (or its loop died): no new requests."""


class RequestTimeout(Exception):
    """The request ran past its deadline and was aborted."""


@dataclass
class RequestTiming:
    """Wall-clock times of one request (``time.perf_counter`` seconds), filled as it goes."""

    arrival: float
    scheduled: float | None = None      # first step that computed any of its tokens
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_generated_tokens: int = 0
    inter_token_latencies: list[float] = field(default_factory=list)

    @property
    def queue_time(self) -> float | None:
        return None if self.scheduled is None else self.scheduled - self.arrival

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival


_DONE = object()  # end of a request's stream


class _Tracked:
    """What the engine thread knows about one request it serves."""

    __slots__ = ("request_id", "queue", "loop", "timing", "stream", "held", "steps_held", "sent_tokens")

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, timing: RequestTiming):
        self.request_id = request_id
        self.queue: asyncio.Queue = OutputQueue()
        self.loop = loop
        self.timing = timing
        self.stream: RequestStream | None = None
        self.held: RequestOutput | None = None  # stream_interval > 1: outputs merged, not yet delivered
        self.steps_held = 0
        self.sent_tokens = False               # has an output with tokens been delivered (the first token)


class RequestStream:
    """The consumer's end of one request: ``async for output in stream``; ``abort()`` to drop it.

    Iteration ends after the final output. Leaving the loop early (``break``, an exception, a
    cancelled task, a timeout) aborts the request — ``aclose`` runs in a ``finally`` of the caller
    (or use ``async with``)."""

    def __init__(self, engine: AsyncEngine, tracked: _Tracked, timeout: float | None):
        self.engine = engine
        self.request_id = tracked.request_id
        self.timing = tracked.timing
        self._tracked = tracked
        self._deadline = None if timeout is None else tracked.timing.arrival + timeout
        self.finished = False
        self.final: RequestOutput | None = None

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._next()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                if isinstance(item, DeferredOutput):
                    item = item.materialize()
                if item.finished:
                    self.finished = True
                    self.final = item
                yield item
        finally:
            # Outputs merged because this consumer lagged: counted for /debug/engine (loop thread only).
            self.engine.num_merged_outputs += getattr(self._tracked.queue, "num_merged", 0)
            if not self.finished:
                self.abort()

    async def _next(self):
        queue = self._tracked.queue
        if not queue.empty():  # already here: no suspension, no timer (what get() would return at once)
            return queue.get_nowait()
        if self._deadline is None:
            return await queue.get()
        remaining = self._deadline - time.perf_counter()
        try:
            if remaining <= 0:
                return queue.get_nowait()
            return await asyncio.wait_for(queue.get(), remaining)
        except (asyncio.TimeoutError, asyncio.QueueEmpty):
            self.abort(reason="timeout")
            self.finished = True
            raise RequestTimeout(f"request {self.request_id} ran past its timeout and was aborted") from None

    def abort(self, reason: str = "abort") -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id, reason=reason)

    async def aclose(self) -> None:
        self.abort()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.abort()


class AsyncEngine:
    """Run an :class:`~miniinfer.engine.LLMEngine` in a background thread for asyncio callers.

    ``max_waiting``: requests that may wait for their first step (more: :class:`QueueFull`);
    ``request_timeout``: default seconds a request may take end to end (None: no limit);
    ``on_step``: called in the engine thread after every step with ``(engine, step seconds)`` (thread mode
    only: with the engine in its own process the steps happen there, and the pump sees only their outputs);
    ``on_finish``: called in the engine thread as ``(request id, final output, timing, reason)``
    (reason: the finish reason, or ``timeout`` for a request aborted by its deadline).
    ``stream_interval``: deliver a request's streamed outputs every this many steps, merged (default 1:
    every step). The first token and the final output always go at once; in between, a larger interval
    sends fewer, larger chunks, which saves the event loop work per token (and with it, the interpreter
    lock the engine thread needs) at the cost of burstier inter-token latency — vLLM's ``stream_interval``.
    Chapter 13's seams: ``deliver(loop, queue, item)`` hands an output from the engine thread to a
    request's queue (default :func:`deliver_threadsafe`); ``admission(num_waiting, max_waiting,
    finish_rate)`` decides whether a new request may queue (default :func:`admission_rule`).
    """

    stream_interval: int = 1  # the default of the constructor's argument

    def __init__(self, engine, *, max_waiting: int = 256, request_timeout: float | None = None,
                 on_step: Callable | None = None, on_finish: Callable | None = None,
                 deliver: Callable | None = None, admission: Callable | None = None,
                 stream_interval: int | None = None):
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        if stream_interval is not None:
            if stream_interval < 1:
                raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
            self.stream_interval = stream_interval
        self.engine = engine
        self.max_waiting = max_waiting
        self.request_timeout = request_timeout
        self.on_step = on_step
        self.on_finish = on_finish
        self._deliver = deliver or deliver_threadsafe
        self._admission = admission or admission_rule
        self._finish_times: collections.deque[float] = collections.deque(maxlen=64)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._commands: list[tuple] = []       # ("add", tracked, prompt, params) | ("abort", id, reason)
        self._tracked: dict[str, _Tracked] = {}  # requests the engine thread serves (engine-thread only)
        self._unscheduled: dict[str, _Tracked] = {}  # of those, the ones not yet known to be scheduled
        self._num_pending_adds = 0             # submitted, not yet handed to the engine (under _lock)
        self._num_engine_waiting = 0           # the scheduler's waiting queue, as the engine thread saw it last
        self._abort_reasons: dict[str, str] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stopping = False
        self.stats_snapshot: dict = {}
        self._stats_published_at = 0.0
        self.num_steps = 0
        self.num_merged_outputs = 0            # streamed outputs merged into an unread one (OutputQueue)
        self.dead: BaseException | None = None
        self._pump_loop: asyncio.AbstractEventLoop | None = None  # the event loop that drives the engine
        self._pumping = False
        self._kick_pending = False
        self._pump_seconds = 0.0  # the event loop's time in the pump's callback

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None or self._pump_loop is not None:
            return
        self.stats_snapshot = self.engine.stats()
        self._accepting = True
        if self._can_pump():
            self._start_pump()
            return
        # torch's intra-op thread count (OpenMP) is a per-thread setting: a new thread starts from
        # OMP_NUM_THREADS or the core count, not from torch.set_num_threads in the thread that configured
        # the engine. The engine thread takes the starting thread's count.
        torch = sys.modules.get("torch")
        threads = torch.get_num_threads() if torch is not None else None
        self._thread = threading.Thread(target=self._run, args=(threads,), name="miniinfer-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        if self._pump_loop is not None:
            return self._pumping and self.dead is None
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return self._num_pending_adds + self._engine_waiting()

    def _engine_waiting(self) -> int:
        """The engine's waiting queue. Driven by this event loop (the pump), the engine is read live (a child
        process's count, as RemoteEngine keeps it from the child's reports and the adds on their way); an
        engine thread's scheduler is its own, so the count is the one it saw at its last turn."""
        if self._pumping:
            return len(self.engine.scheduler.waiting)
        return self._num_engine_waiting

    @property
    def num_in_flight(self) -> int:
        return len(self._tracked) + self._num_pending_adds

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting requests; let in-flight ones finish for up to ``drain_timeout`` seconds, then
        abort the rest (their consumers see finish reason ``abort``) and stop the thread."""
        self._accepting = False
        deadline = time.perf_counter() + drain_timeout
        while self.num_in_flight and time.perf_counter() < deadline and self.is_running:
            await asyncio.sleep(0.02)
        self._stopping = True
        self._wake.set()
        if self._pump_loop is not None:
            await self._stop_pump()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    # -- the asyncio side ----------------------------------------------------------------------------

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    async def submit(self, prompt, params: SamplingParams, request_id: str | None = None,
                     timeout: float | None = None) -> RequestStream:
        """Validate and queue one request; return its stream. Raises ``ValueError`` (bad prompt or
        parameters: nothing was queued), :class:`QueueFull` or :class:`EngineStopped`."""
        if not self._accepting or not self.is_running:
            started = self._thread is not None or self._pump_loop is not None
            raise EngineStopped("the server is shutting down" if started else "engine not started")
        # Validation reads only the engine's configuration and the (thread-safe) tokenizer: done here,
        # so that a bad request gets its 400 at once, and the engine thread receives token ids.
        text, token_ids = self.engine.validate_prompt(prompt, params)
        request_id = request_id or self.new_request_id()
        timing = RequestTiming(arrival=time.perf_counter(), num_prompt_tokens=len(token_ids))
        tracked = _Tracked(request_id, asyncio.get_running_loop(), timing)
        with self._lock:
            waiting = self._num_pending_adds + self._engine_waiting()
            retry_after = self._admission(waiting, self.max_waiting, self.finish_rate())
            if retry_after is not None:
                raise QueueFull(waiting, retry_after=int(retry_after))
            self._num_pending_adds += 1
            self._commands.append(("add", tracked, text if text is not None else token_ids, token_ids, params))
        self._wake.set()
        if self._pump_loop is tracked.loop and self._pumping and self._has_free_seat():
            self._send_commands()  # now, not at the loop's next turn: see _has_free_seat
        else:
            self._kick()
        tracked.stream = RequestStream(self, tracked, self.request_timeout if timeout is None else timeout)
        return tracked.stream

    @property
    def pump_seconds(self) -> float:
        """The event loop's seconds in the pump's callback (engine-process mode; 0 otherwise)."""
        return self._pump_seconds

    def finish_rate(self) -> float:
        """Requests finished per second, over the last 64 (0 when too few have finished to say)."""
        times = list(self._finish_times)
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Thread-safe: abort a request (frees its KV blocks at the engine's next iteration)."""
        with self._lock:
            self._commands.append(("abort", request_id, reason))
        self._wake.set()
        self._kick()

    # -- the pump: an engine in another process, driven by the event loop --------------------------------

    def _can_pump(self) -> bool:
        """An engine that steps by itself elsewhere (``RemoteEngine``: a child process) needs no thread here:
        the event loop reads its outputs when its pipe is readable. Not with a ``deliver`` hook (its contract
        is a call from the engine thread), nor outside a running event loop."""
        if not hasattr(self.engine, "ready_steps") or self._deliver is not deliver_threadsafe:
            return False
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def _start_pump(self) -> None:
        """Why not a thread: with the engine in a child process, a thread here would only wait on the pipe and
        hand each step's outputs to the event loop, and the two threads of this process would then contend
        for the one interpreter lock on every step (measured on an H200 at saturation: the server process
        at ~95 % of a core, its two threads taking turns). Read from the loop itself there is no contention,
        no cross-thread wake-up, and the outputs go straight into the requests' queues."""
        loop = self._pump_loop = asyncio.get_running_loop()
        self._pumping = True
        fd = self.engine.fileno()
        loop.add_reader(fd, self._on_engine_readable)
        # uvloop (libuv) makes a watched descriptor non-blocking; the pipe's recv and send expect a blocking
        # one: a message that arrives in pieces would raise BlockingIOError halfway (seen on an H200 under
        # load: "the engine process died" while it was alive). Readiness is still reported either way.
        os.set_blocking(fd, True)

    def _has_free_seat(self) -> bool:
        """Pump mode: whether a request submitted now would find a seat in the engine's next batch.

        Then its add goes to the engine's process at once. Batched per loop turn (:meth:`_kick`), a burst of
        requests reached the engine only after the event loop had parsed and validated all of them: all of
        a loop turn's request handlers run before the callback that sends their adds. On an H200, with 768
        requests at once, the engine then filled its batch over partly empty steps: 845 steps where offline
        ran 768 (``serving_h200_stream_interval_1.json``); with this, 772
        (``serving_h200_free_seat_adds_interval_1.json``). One small message per add costs the loop a pickle
        and a write; past a full batch the add would only wait in the engine's queue, so those are batched
        as before."""
        seats = getattr(getattr(self.engine, "config", None), "max_num_seqs", 0)
        return self.num_in_flight <= seats

    def _kick(self) -> None:
        """Commands are waiting (an add, an abort): have the loop apply and send them, once per loop turn."""
        if self._pump_loop is None or not self._pumping:
            return
        with self._lock:
            if self._kick_pending:
                return
            self._kick_pending = True
        try:
            self._pump_loop.call_soon_threadsafe(self._send_commands)
        except RuntimeError:  # the loop is closed
            pass

    def _send_commands(self) -> None:
        with self._lock:
            self._kick_pending = False
        if not self._pumping:
            return
        try:
            self._apply_commands()
            self.engine.flush()
        except Exception as error:  # noqa: BLE001 - the child is gone (EngineProcessDied): fail what is in flight
            self._engine_failed(error)

    def _on_engine_readable(self) -> None:
        """The child sent something: deliver every finished step's outputs."""
        if not self._pumping:
            return
        start = time.perf_counter()
        published = False
        try:
            while True:
                ready = self.engine.ready_steps()
                for outputs in ready:
                    if isinstance(outputs, BaseException):
                        log.error("engine step failed: %s", outputs)
                        # The child names the requests of the failed step: requests sent to it since
                        # then were not in that step and go on.
                        self._fail_all(outputs, getattr(outputs, "request_ids", None))
                        continue
                    now = time.perf_counter()
                    self.num_steps += 1
                    self._deliver_all(outputs, now, now)
                # Idle (e.g. the child's report that it went idle, its KV blocks freed), or due: publish,
                # once. The engine's stats() reads the pipe too: one more pass delivers what it read.
                if not published and (not self._tracked
                                      or time.perf_counter() - self._stats_published_at >= STATS_INTERVAL_S):
                    self._publish_stats()
                    published = True
                    continue
                if not ready:
                    break
            if self._commands:
                self._send_commands()
            else:
                self.engine.flush()  # what the engine itself queued (e.g. _fail_all's aborts) goes now
        except Exception as error:  # noqa: BLE001 - the child is gone (EngineProcessDied)
            self._engine_failed(error)
        self._pump_seconds += time.perf_counter() - start

    def _engine_failed(self, error: BaseException) -> None:
        """The engine's process died: fail everything in flight, stop reading its pipe."""
        log.error("engine failed: %s", error)
        self._stop_reading()
        with self._lock:
            commands, self._commands = self._commands, []
            self._num_pending_adds = 0
        for command in commands:  # adds that never reached the engine fail like the rest
            if command[0] == "add":
                self._send(command[1], RuntimeError(f"engine step failed: {type(error).__name__}: {error}"))
        self._fail_all(error)
        self._publish_stats()

    def _stop_reading(self) -> None:
        if self._pumping:
            self._pumping = False
            try:
                self._pump_loop.remove_reader(self.engine.fileno())
            except (OSError, ValueError, RuntimeError):  # the pipe or the loop is already closed
                pass

    async def _stop_pump(self) -> None:
        """Shutdown: abort what is still in flight, wait (a little) for the child's final outputs, then end
        the streams that did not get one with :class:`EngineStopped`."""
        if self._pumping:
            self._apply_commands()
            for request_id in list(self._tracked):
                self._abort_reasons[request_id] = "abort"
                self.engine.abort_request(request_id)
            try:
                self.engine.flush()
            except Exception:  # noqa: BLE001 - a dead child: nothing to wait for
                pass
            deadline = time.perf_counter() + 5.0
            while self._tracked and self._pumping and time.perf_counter() < deadline:
                await asyncio.sleep(0.01)
        self._stop_reading()
        self._end_remaining_streams()

    def _end_remaining_streams(self) -> None:
        """Shutdown, after the last outputs: streams still open end with :class:`EngineStopped`."""
        for tracked in list(self._tracked.values()):
            self._flush_held(tracked)
            self._send(tracked, EngineStopped("the server shut down before this request finished"))
        self._tracked.clear()
        self._unscheduled.clear()

    # -- the engine thread ----------------------------------------------------------------------------

    def _run(self, torch_threads: int | None = None) -> None:
        if torch_threads is not None:
            sys.modules["torch"].set_num_threads(torch_threads)
        busy = 0.0
        while True:
            self._apply_commands()
            engine = self.engine
            if self._stopping:
                for request_id in list(self._tracked):
                    engine.abort_request(request_id)
                self._abort_reasons.update({r: "abort" for r in self._tracked})
                self._deliver_all(engine.step() if engine.has_unfinished_requests() else [])
                self._end_remaining_streams()
                return
            if not engine.has_unfinished_requests():
                self._publish_stats(busy)
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            start = time.perf_counter()
            try:
                outputs = engine.step()
            except Exception as error:  # noqa: BLE001 - a step the engine could not contain: fail its requests
                log.exception("engine step failed")
                self._fail_all(error)
                continue
            now = time.perf_counter()
            busy += now - start
            self.num_steps += 1
            self._deliver_all(outputs, now, start)
            self._mark_scheduled(start)
            if now - self._stats_published_at >= STATS_INTERVAL_S:  # idle turns above always publish
                self._publish_stats(busy)
            if self.on_step is not None:
                try:
                    self.on_step(engine, now - start)
                except Exception:  # noqa: BLE001 - metrics must never stop the engine
                    log.exception("on_step callback failed")

    def _apply_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        engine = self.engine
        for command in commands:
            if command[0] == "add":
                _, tracked, prompt, token_ids, params = command
                with self._lock:
                    self._num_pending_adds -= 1
                if tracked.request_id in self._abort_reasons:  # aborted before it reached the engine
                    continue
                try:
                    # Token ids already validated on submission: no second tokenization here.
                    engine.add_request(token_ids, params, request_id=tracked.request_id, stream=True)
                except Exception as error:  # noqa: BLE001 - e.g. a duplicate request id: this request only
                    self._send(tracked, error)
                    continue
                request = engine.requests.get(tracked.request_id)
                if request is not None and isinstance(prompt, str):
                    request.prompt = prompt
                self._tracked[tracked.request_id] = tracked
                self._unscheduled[tracked.request_id] = tracked
            else:
                _, request_id, reason = command
                if request_id in self._tracked:
                    self._abort_reasons[request_id] = reason
                    engine.abort_request(request_id)  # its final output comes out of the next step
                else:
                    self._abort_reasons[request_id] = reason  # still among this batch's adds, or gone
        with self._lock:
            self._num_engine_waiting = len(engine.scheduler.waiting)
        # Forget abort marks of requests that never arrive (already finished): keep the dict small.
        if len(self._abort_reasons) > 4096:
            self._abort_reasons = {r: v for r, v in self._abort_reasons.items() if r in self._tracked}

    def _mark_scheduled(self, step_start: float) -> None:
        """Requests whose first tokens were computed in the step that started at ``step_start``. Only those
        not yet marked are looked at (with hundreds of requests waiting, scanning all of them every step
        was a measurable share of the step); a request's first token also marks it (:meth:`_account`)."""
        if not self._unscheduled:
            return
        requests = self.engine.requests
        for request_id, tracked in list(self._unscheduled.items()):
            timing = tracked.timing
            if timing.scheduled is None:
                request = requests.get(request_id)
                if request is not None and request.seqs and (
                        request.seqs[0].status is not SequenceStatus.WAITING or request.seqs[0].num_computed_tokens):
                    timing.scheduled = max(step_start, timing.arrival)
                    timing.num_cached_tokens = request.seqs[0].num_cached_tokens
            if timing.scheduled is not None or request_id not in self._tracked:
                del self._unscheduled[request_id]

    def _deliver_all(self, outputs: list[RequestOutput], now: float | None = None,
                     step_start: float | None = None) -> None:
        """Account for one step's outputs and hand them to their consumers.

        With the default ``deliver``, the outputs bound for one event loop travel together: one
        ``call_soon_threadsafe`` (one wake-up of the loop, one handle to run) per step instead of one per
        request. A ``deliver`` hook (chapter 13's exercise) is called for each output, as documented."""
        now = time.perf_counter() if now is None else now
        step_start = now if step_start is None else step_start
        batches: dict[asyncio.AbstractEventLoop, list] | None = {} if self._deliver is deliver_threadsafe else None
        finished = []
        for output in outputs:
            tracked = self._tracked.get(output.request_id)
            if tracked is None:
                continue
            try:
                self._account(tracked, output, now, step_start)
            except Exception:  # noqa: BLE001 - bookkeeping must not lose the output
                log.exception("timing bookkeeping failed for %s", output.request_id)
            item = self._coalesce(tracked, output)
            if item is None:
                pass  # held for a later step (stream_interval)
            elif batches is None:
                self._send(tracked, item)
            else:
                batches.setdefault(tracked.loop, []).append((tracked.queue, item))
            if output.finished:
                self._finish_times.append(now)
                del self._tracked[output.request_id]
                finished.append((tracked, output, self._abort_reasons.pop(output.request_id, None)))
        for loop, items in (batches or {}).items():
            if loop is self._pump_loop:  # this is that loop's thread (the pump): no hand-over needed
                _put_all(items)
                continue
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the consumers' event loop is closed: nobody is listening
                pass
        for tracked, output, reason in finished:  # after the hand-over, as with one deliver call per output
            self._finished(tracked, output, reason)

    def _coalesce(self, tracked: _Tracked, output: RequestOutput) -> RequestOutput | None:
        """What to deliver now for ``output``: itself (merged with held ones), or None to hold it."""
        if self.stream_interval == 1 and tracked.held is None:
            return output
        if tracked.held is not None:
            output = merge_outputs(tracked.held, output)
            tracked.held = None
        has_tokens = output.num_new_tokens > 0
        if output.finished or not tracked.sent_tokens or tracked.steps_held + 1 >= self.stream_interval:
            tracked.sent_tokens = tracked.sent_tokens or has_tokens
            tracked.steps_held = 0
            return output
        tracked.held = output
        tracked.steps_held += 1
        return None

    def _flush_held(self, tracked: _Tracked) -> None:
        """Deliver what ``stream_interval`` held back, before an error ends the request's stream."""
        if tracked.held is not None:
            held, tracked.held = tracked.held, None
            self._send(tracked, held)

    def _account(self, tracked: _Tracked, output: RequestOutput, now: float, step_start: float) -> None:
        timing = tracked.timing
        new_tokens, generated = output.num_new_tokens, output.num_generated_tokens
        if new_tokens:
            if timing.scheduled is None:  # its whole prefill ran in this step
                timing.scheduled = max(step_start, timing.arrival)
            if timing.first_token is None:
                timing.first_token = now
            else:
                timing.inter_token_latencies.append(now - timing.last_token)
            timing.last_token = now
        if output.num_cached_tokens > timing.num_cached_tokens:
            timing.num_cached_tokens = output.num_cached_tokens
        timing.num_generated_tokens = generated
        if output.finished:
            timing.finished = now

    def _finished(self, tracked: _Tracked, output: RequestOutput, abort_reason: str | None) -> None:
        if self.on_finish is None:
            return
        reasons = {c.finish_reason for c in output.outputs}
        reason = abort_reason if abort_reason and "abort" in reasons else (
            "error" if "error" in reasons else output.outputs[0].finish_reason or "abort")
        try:
            self.on_finish(tracked.request_id, output, tracked.timing, reason)
        except Exception:  # noqa: BLE001
            log.exception("on_finish callback failed")

    def _send(self, tracked: _Tracked, item) -> None:
        try:
            self._deliver(tracked.loop, tracked.queue, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            pass
        except Exception:  # noqa: BLE001 - a broken deliver hook: say so, keep the engine alive
            log.exception("deliver failed for %s", tracked.request_id)

    def _fail_all(self, error: Exception, request_ids=None) -> None:
        """Fail the tracked requests (only those of ``request_ids`` when given) with ``error``."""
        only = None if request_ids is None else set(request_ids)
        for request_id, tracked in list(self._tracked.items()):
            if only is not None and request_id not in only:
                continue
            try:
                self.engine.abort_request(request_id)
            except Exception:  # noqa: BLE001
                pass
            self._flush_held(tracked)
            self._send(tracked, RuntimeError(f"engine step failed: {type(error).__name__}: {error}"))
            del self._tracked[request_id]

    def _publish_stats(self, busy: float | None = None) -> None:
        """``busy``: the engine thread's seconds in steps; with the pump, the engine's process reports its
        own (``engine_busy_seconds``) and the event loop's seconds in the pump are ``pump_seconds``."""
        try:
            stats = self.engine.stats()
        except Exception:  # noqa: BLE001
            return
        if busy is None:
            busy = stats.get("engine_busy_seconds", 0.0)
            stats["pump_seconds"] = self._pump_seconds
        stats["_busy_seconds"] = busy
        stats["num_tracked"] = len(self._tracked)
        stats["num_merged_outputs"] = self.num_merged_outputs
        self.stats_snapshot = stats
        self._stats_published_at = time.perf_counter()
