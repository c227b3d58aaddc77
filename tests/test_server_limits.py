"""Admission, timeouts, failure isolation and graceful shutdown of the server.

A deliberately tight server (2 sequences per step, 2 waiting requests at most) as a subprocess, plus
in-process tests of :class:`~miniinfer.server.async_engine.AsyncEngine` around a real engine.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from miniinfer.server.testing import ServerProcess  # noqa: E402

MODEL = "shakespeare"
LONG = {"model": MODEL, "prompt": "ROMEO.\n", "max_tokens": 400, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server():
    server = ServerProcess("--max-num-seqs", "2", "--max-waiting", "2", "--shutdown-timeout", "20",
                           "--request-timeout", "60", "--num-kv-blocks", "256")
    yield server
    server.stop()


class Streamer(threading.Thread):
    """A streaming client in a thread: reads until told to hang up (or the stream ends)."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.hang_up = threading.Event()
        self.status = None
        self.events: list[str] = []

    def run(self):
        with httpx.stream("POST", self.url + "/v1/completions", json=self.body, timeout=60) as response:
            self.status = response.status_code
            for line in response.iter_lines():
                if line:
                    self.events.append(line)
                if self.hang_up.is_set():
                    return


def test_full_queue_is_503_with_retry_after_then_recovers(server):
    streamers = [Streamer(server.url, LONG) for _ in range(4)]  # 2 run, 2 wait
    try:
        for count, s in enumerate(streamers, 1):
            s.start()
            deadline = time.monotonic() + 20
            while True:  # one at a time: the first two must be running before the next two queue
                stats = server.engine_stats()
                if stats["num_in_flight"] >= count and stats["num_waiting_total"] <= max(0, count - 2):
                    break
                assert time.monotonic() < deadline and s.status in (None, 200), (stats, s.status, s.events)
                time.sleep(0.02)
        response = httpx.post(server.url + "/v1/completions", json={**LONG, "stream": False}, timeout=10)
        assert response.status_code == 503, response.text
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "overloaded"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert info.value.status_code == 503
        assert httpx.get(server.url + "/health").status_code == 200  # overloaded, not unhealthy
        rejected = [line for line in httpx.get(server.url + "/metrics").text.splitlines()
                    if line.startswith("miniinfer_requests_rejected_total")]
        assert float(rejected[0].split()[-1]) >= 2
    finally:
        for s in streamers:
            s.hang_up.set()
        for s in streamers:
            s.join(30)
    server.wait_idle()
    ok = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_request_timeout_aborts_and_frees_blocks(server):
    body = {**LONG, "stream": False, "timeout": 0.3}
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    with httpx.stream("POST", server.url + "/v1/completions", json={**LONG, "timeout": 0.3}, timeout=30) as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "timeout"
    server.wait_idle()
    metrics = httpx.get(server.url + "/metrics").text
    assert 'miniinfer_request_success_total{finished_reason="timeout",model_name="shakespeare"} 2.0' in metrics


def test_graceful_shutdown_drains_in_flight_streams(server):
    streamer = Streamer(server.url, {**LONG, "max_tokens": 40})
    streamer.start()
    deadline = time.monotonic() + 20
    while len(streamer.events) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    server.process.send_signal(2)  # SIGINT, as Ctrl-C; SIGTERM takes the same path
    streamer.join(30)
    assert streamer.events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in streamer.events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # it ran to the end, not aborted
    assert server.process.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=2)


# -- the async engine in-process: one request's failure is its own --------------------------------------


@pytest.fixture(scope="module")
def llm():
    from miniinfer import LLM

    return LLM(device="cpu", max_num_seqs=8)


def test_a_failing_request_fails_alone(llm):
    from miniinfer import SamplingParams
    from miniinfer.server.async_engine import AsyncEngine

    engine = llm.engine
    original = engine._update_text

    def update_text(seq, request):  # a bug that strikes one request's bookkeeping only
        if request.request_id == "bad":
            raise RuntimeError("boom")
        return original(seq, request)

    engine._update_text = update_text
    finished = []
    bridge = AsyncEngine(engine, max_waiting=8, on_finish=lambda *args: finished.append(args[3]))

    async def main():
        bridge.start()
        params = SamplingParams(temperature=0, max_tokens=8)
        streams = [await bridge.submit("ROMEO.\n", params, request_id=r) for r in ("good-1", "bad", "good-2")]

        async def final(stream):
            async for _ in stream:
                pass
            return stream.final

        outs = await asyncio.gather(*(final(s) for s in streams))
        await bridge.shutdown()
        return outs

    try:
        outs = asyncio.run(main())
    finally:
        engine._update_text = original
    reasons = [o.outputs[0].finish_reason for o in outs]
    assert reasons == ["length", "error", "length"] and "boom" in outs[1].outputs[0].error
    assert outs[0].outputs[0].text == outs[2].outputs[0].text
    assert sorted(finished) == ["error", "length", "length"]
    assert engine.stats()["kv_blocks_used"] == 0


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(llm):
    from miniinfer import SamplingParams
    from miniinfer.server.async_engine import AsyncEngine

    engine = llm.engine
    original = engine.step
    calls = {"n": 0}

    def step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("the device fell over")
        return original()

    engine.step = step
    bridge = AsyncEngine(engine, max_waiting=8)

    async def main():
        bridge.start()
        params = SamplingParams(temperature=0, max_tokens=4)
        first = await bridge.submit("ROMEO.\n", params)
        with pytest.raises(RuntimeError, match="fell over"):
            async for _ in first:
                pass
        second = await bridge.submit("JULIET.\n", params)
        texts = [o async for o in second]
        await bridge.shutdown()
        return texts

    try:
        outputs = asyncio.run(main())
    finally:
        del engine.step
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "length"
    assert engine.stats()["kv_blocks_used"] == 0 and not engine.has_unfinished_requests()


# -- tracing: W3C traceparent and OpenTelemetry spans ------------------------------------------------------


def test_traceparent_parsing():
    from miniinfer.server.tracing import parse_traceparent

    context = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    assert context.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and context.parent_span_id == "00f067aa0ba902b7"
    assert context.traceparent.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-") and context.span_id != "00f067aa0ba902b7"
    for bad in (None, "", "00-xyz", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01"):
        fresh = parse_traceparent(bad)
        assert fresh.parent_span_id is None and len(fresh.trace_id) == 32 and fresh.trace_id != "0" * 32


def test_opentelemetry_spans_for_queue_prefill_decode():
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from miniinfer.server.async_engine import RequestTiming
    from miniinfer.server.tracing import Tracer, parse_traceparent

    exporter = InMemorySpanExporter()
    tracer = Tracer(exporter=exporter)
    context = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    timing = RequestTiming(arrival=10.0, scheduled=10.5, first_token=11.0, last_token=12.0, finished=12.0)
    tracer.record(context, "/v1/completions", timing, {"miniinfer.request_id": "r"})
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"/v1/completions", "queue", "prefill", "decode"}
    root = spans["/v1/completions"]
    assert format(root.context.trace_id, "032x") == context.trace_id
    assert format(root.context.span_id, "016x") == context.span_id  # the id the response header announced
    assert format(root.parent.span_id, "016x") == "00f067aa0ba902b7"
    for name in ("queue", "prefill", "decode"):
        assert spans[name].parent.span_id == root.context.span_id
    assert (spans["queue"].end_time - spans["queue"].start_time) == pytest.approx(0.5e9, rel=1e-6)
    assert not Tracer().enabled  # no exporter configured: a no-op


@pytest.mark.parametrize("mode", ["thread", "engine process"])
def test_shutdown_past_its_timeout_ends_every_stream_with_a_last_chunk_and_done(mode):
    """SIGINT with streams that cannot finish within --shutdown-timeout (one running, one queued): each
    client still gets a last chunk (finish reason ``abort``) and ``data: [DONE]``; before, uvicorn
    cancelled the requests' tasks at the timeout and the clients saw a broken chunked body."""
    extra = ["--engine-process"] if mode == "engine process" else ["--no-engine-process"]
    server = ServerProcess("--max-num-seqs", "1", "--shutdown-timeout", "2", "--num-kv-blocks", "256", *extra)
    try:
        streamers = [Streamer(server.url, {**LONG, "max_tokens": 1000}) for _ in range(2)]  # one runs, one queues
        for s in streamers:
            s.start()
        deadline = time.monotonic() + 20
        # Either may be the one that runs (the other queues behind it): wait for tokens from one, both in flight.
        while max(len(s.events) for s in streamers) < 2 or server.engine_stats()["num_in_flight"] < 2:
            assert time.monotonic() < deadline, ([s.events[-1:] for s in streamers], server.engine_stats())
            time.sleep(0.01)
        started = time.monotonic()
        server.process.send_signal(2)
        for s in streamers:
            s.join(30)
        assert server.process.wait(30) == 0
        assert time.monotonic() - started < 10
        for s in streamers:
            assert s.status == 200 and s.events[-1] == "data: [DONE]", s.events[-3:]
            last = json.loads(s.events[-2][6:])
            assert last["choices"][0]["finish_reason"] == "abort", last
        assert "timeout graceful shutdown exceeded" not in server.read_log()
    finally:
        if server.process.poll() is None:
            server.stop()
