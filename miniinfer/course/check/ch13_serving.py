"""Checks for chapter 13: SSE event formatting, the thread-safe bridge to asyncio, the admission rule.

Oracles: for SSE, a small parser written here from the WHATWG rules (independent of the package's
:func:`miniinfer.server.sse.parse_sse`) plus the package's :func:`~miniinfer.server.sse.format_sse`;
for the bridge, a real event loop in its own thread, in asyncio's debug mode (which raises when a
loop is touched from another thread), with a consumer awaiting the queue; for admission, the
package's :func:`~miniinfer.server.async_engine.admission_rule` on random and boundary cases.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
import time

from miniinfer.course.checking import call_student, exercise, fail
from miniinfer.server.async_engine import admission_rule as reference_admission
from miniinfer.server.sse import format_sse as reference_format_sse

__all__ = ["format_sse", "deliver", "admission"]


# ------------------------------------------------------------------------------------------------
# 13.1 SSE events
# ------------------------------------------------------------------------------------------------

def _parse(text: str) -> list[tuple[str, str]]:
    """The WHATWG event-stream rules we need: lines end with CR, LF or CRLF; "field: value"; a blank
    line dispatches; data lines join with LF; the event type defaults to "message"."""
    events, data, event, i = [], None, "message", 0
    lines = []
    while i < len(text):
        j = i
        while j < len(text) and text[j] not in "\r\n":
            j += 1
        lines.append(text[i:j])
        if j < len(text) and text[j] == "\r" and j + 1 < len(text) and text[j + 1] == "\n":
            j += 1
        i = j + 1
        if j >= len(text):
            lines.append(None)  # the text did not end with a line break: the last line is incomplete
    for line in lines:
        if line is None:
            break
        if line == "":
            if data is not None:
                events.append((event, "\n".join(data)))
            data, event = None, "message"
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data = (data or []) + [value]
            elif name == "event":
                event = value
    return events


def _sse_cases(rng: random.Random) -> list[tuple[str, str | None]]:
    chunk = {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": " my lord",
                                                                          "finish_reason": None}]}
    cases = [(json.dumps(chunk), None), ("[DONE]", None), ("", None), ("first\nsecond", None),
             ("a\r\nb\rc\nd", None), ("  leading spaces, a colon: here", None), ("émoji 🎭 ok", None),
             (json.dumps({"error": {"message": "overloaded"}}), "error"), ("line\n\nafter a blank line", None),
             ("ends with a newline\n", None), ("x", "token")]
    for _ in range(6):
        words = ["ROMEO", "data:", "event:", ":", " ", "\n", "{\"k\": 1}", "é", "\r\n"]
        cases.append(("".join(rng.choice(words) for _ in range(rng.randint(1, 8))),
                      rng.choice([None, None, "delta", "done"])))
    return cases


def _sse_hint(got: str, data: str, event: str | None) -> str:
    if not got.endswith("\n\n"):
        return "an event ends with a blank line: the last data line, then '\\n\\n'"
    if "\n" in data or "\r" in data:
        return ("a payload with line breaks (\\n, \\r or \\r\\n) becomes one 'data: ' line per line; "
                "the reader joins them back with '\\n'")
    if event is not None and not got.startswith(f"event: {event}\n"):
        return "with an event type, the event starts with the line 'event: <type>'"
    return "each line is 'data: ' + the payload (one space after the colon), then a blank line ends the event"


@exercise("13.1", "server-sent events")
def format_sse(fn) -> int:
    """Payloads (JSON chunks, [DONE], empty, with \\n / \\r\\n / \\r line breaks, colons, emoji) with and without an
    event type. The result must be exactly the package's (the format is fixed), and an independent
    event-stream parser must read back one event with the same type and data."""
    rng = random.Random()
    cases = 0
    for data, event in _sse_cases(rng):
        case = f"data={data!r}" + (f", event={event!r}" if event is not None else "")
        got = call_student(fn, data, event, case=case) if event is not None else call_student(fn, data, case=case)
        if not isinstance(got, str):
            fail(f"expected a str, got {type(got).__name__}", case=case,
                 hint="return the text of the event (the server encodes it to bytes when it writes it)")
        expected = reference_format_sse(data, event)
        parsed = _parse(got)
        want = [(event or "message", "\n".join(data.replace("\r\n", "\n").replace("\r", "\n").split("\n")))]
        if parsed != want or got != expected:
            fail(f"expected {expected!r}, got {got!r} (a reader sees {parsed!r})", case=case,
                 hint=_sse_hint(got, data, event))
        cases += 1
    return cases


# ------------------------------------------------------------------------------------------------
# 13.2 the bridge: engine thread -> asyncio queue
# ------------------------------------------------------------------------------------------------

class _LoopThread:
    """An event loop running in its own thread (debug mode), with a consumer draining one queue."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.loop.set_debug(True)  # touching the loop from another thread raises RuntimeError
        self.queue: asyncio.Queue | None = None
        self.received: list[tuple[object, float]] = []
        self.consumer_thread: int | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.ready.wait(10):
            raise RuntimeError("the check's event loop did not start")

    def _run(self):
        asyncio.set_event_loop(self.loop)

        async def consume():
            self.queue = asyncio.Queue()
            self.consumer_thread = threading.get_ident()
            self.ready.set()
            while True:
                item = await self.queue.get()
                self.received.append((item, time.perf_counter()))

        self.task = self.loop.create_task(consume())
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def stop(self):
        if self.loop.is_closed():
            return

        async def finish():
            self.task.cancel()
            await asyncio.wait([self.task], timeout=0.5)  # a consumer a wrong-thread call left stuck stays stuck
            self.loop.stop()

        self.task._log_destroy_pending = False  # no "Task was destroyed but it is pending" noise on a stuck one
        asyncio.run_coroutine_threadsafe(finish(), self.loop)
        self.thread.join(10)


@exercise("13.2", "the bridge from the engine thread to asyncio")
def deliver(fn) -> int:
    """From a thread that is not the loop's (as the engine thread is), hand items one by one to a queue
    that a coroutine awaits. Every item must arrive, in order, within half a second, without touching
    the loop from the wrong thread (asyncio's debug mode raises when that happens)."""
    rng = random.Random()
    cases = 0
    for trial in range(3):
        loop_thread = _LoopThread()
        try:
            items = [rng.randrange(10**6) for _ in range(12)] + [None]  # a fixed count: a stable success line
            for index, item in enumerate(items):
                case = f"trial {trial}: item {index} of {len(items)} ({item!r}), sent from a thread that is not the loop's"
                sent = time.perf_counter()
                try:
                    result = call_student(fn, loop_thread.loop, loop_thread.queue, item, case=case)
                except RuntimeError as error:  # call_student's wrapper around what the function raised
                    if "thread" in str(error).lower():
                        fail("your function touched the event loop from another thread", case=case,
                             hint="asyncio objects belong to their loop's thread: ask the loop to run put_nowait "
                                  "itself with loop.call_soon_threadsafe(queue.put_nowait, item)")
                    raise
                if asyncio.iscoroutine(result):
                    result.close()
                    fail("your function returned a coroutine: nothing ran", case=case,
                         hint="deliver is a plain function called from the engine thread, not async")
                deadline = sent + 0.5
                while len(loop_thread.received) <= index and time.perf_counter() < deadline:
                    time.sleep(0.001)
                if len(loop_thread.received) <= index:
                    fail("the item did not reach the waiting coroutine within 0.5 s", case=case,
                         hint="queue.put_nowait from another thread does not wake a loop that is waiting for I/O: "
                              "use loop.call_soon_threadsafe(queue.put_nowait, item)")
            got = [item for item, _ in loop_thread.received]
            if got != items:
                fail(f"the consumer received {got}, expected {items}", case=f"trial {trial}",
                     hint="deliver each item exactly once, in the order of the calls")
            cases += len(items)
        finally:
            loop_thread.stop()
    return cases


# ------------------------------------------------------------------------------------------------
# 13.3 admission
# ------------------------------------------------------------------------------------------------

@exercise("13.3", "admission with a bounded queue")
def admission(fn) -> int:
    """Queues below, at and above the bound (including a bound of 0), finish rates from 0 (unknown) to
    hundreds of requests per second; the answer must be the package's: None (admit) or a whole number of
    seconds in [1, 60]."""
    rng = random.Random()
    cases = []
    for max_waiting in (0, 1, 2, 8, 64):
        for num_waiting in {0, max(0, max_waiting - 1), max_waiting, max_waiting + 1, max_waiting + 37}:
            for rate in (0.0, 0.05, 0.5, 1.0, 3.0, 250.0, rng.uniform(0.01, 20)):
                cases.append((num_waiting, max_waiting, rate))
    for num_waiting, max_waiting, rate in cases:
        case = f"num_waiting={num_waiting}, max_waiting={max_waiting}, finish_rate={rate:g} requests/s"
        got = call_student(fn, num_waiting, max_waiting, rate, case=case)
        expected = reference_admission(num_waiting, max_waiting, rate)
        if expected is None:
            if got is not None:
                fail(f"expected None (admit), got {got!r}", case=case,
                     hint="admit while fewer than max_waiting requests wait (num_waiting < max_waiting)")
            continue
        if got is None:
            fail(f"expected a rejection with Retry-After {expected}, got None (admit)", case=case,
                 hint="the queue is full when num_waiting >= max_waiting")
        if isinstance(got, bool) or not isinstance(got, int):
            fail(f"expected a whole number of seconds, got {got!r}", case=case,
                 hint="Retry-After is an integer: round up with math.ceil, then clamp to [1, 60]")
        if got != expected:
            needed = num_waiting - max_waiting + 1
            fail(f"expected Retry-After {expected}, got {got}", case=case,
                 hint=("with an unknown rate (0) answer 1 s" if rate <= 0 else
                       f"{needed} request(s) must finish before there is room; at {rate:g}/s that takes "
                       f"{needed / rate:.3g} s: round up (math.ceil), then clamp to [1, 60]"))
    assert math.isfinite(len(cases))
    return len(cases)
