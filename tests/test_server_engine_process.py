"""``miniinfer serve --engine-process``: the engine in a child process, the API unchanged.

One server per module; the last test kills the engine's process, so it runs last (file order) and the
others leave the server idle. What must hold: the same answers as offline, the same errors at once (the
parent validates with the engine's own code), KV blocks freed on abort (the child's stats reach
/debug/engine), concurrency, and a dead child is a clean failure (5xx, /health 503), never a hang.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from miniinfer.server.testing import ServerProcess  # noqa: E402
from tests.server_fixtures import MODEL, PROMPTS  # noqa: E402  (client and offline: conftest.py)


@pytest.fixture(scope="module")
def server():
    server = ServerProcess("--engine-process", "--max-num-seqs", "16", "--max-waiting", "64", "--seed", "0",
                           "--num-kv-blocks", "1024", "--engine-cpus", "0")
    yield server
    server.stop()


def test_greedy_streaming_and_n_match_offline(server, client, offline):
    stats = server.engine_stats()
    assert stats["engine_process_alive"] and stats["engine_pid"] != server.process.pid
    # --engine-cpus 0: the engine's process on CPU 0, the server process (every thread) on the others.
    assert stats["engine_cpus"] == "0" and os.sched_getaffinity(stats["engine_pid"]) == {0}
    others = os.sched_getaffinity(0) - {0}
    for thread in os.listdir(f"/proc/{server.process.pid}/task"):
        assert os.sched_getaffinity(int(thread)) == (others or os.sched_getaffinity(0))
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert out.choices[0].text == offline[PROMPTS[0]] and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == offline[PROMPTS[1]]
    assert chunks[-1].usage.completion_tokens == 12
    many = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=10, n=3, temperature=1.0, seed=7)
    again = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=10, n=3, temperature=1.0, seed=7)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    assert [c.text for c in many.choices] == [c.text for c in again.choices]
    server.wait_idle()


def test_bad_requests_get_400_with_the_engines_message(server):
    for body, words in [({"prompt": [10**6]}, "outside the vocabulary"),
                        ({"prompt": "x", "n": 17}, "more than max_num_seqs=16")]:
        response = httpx.post(server.url + "/v1/completions", json={"model": MODEL, **body}, timeout=30)
        assert response.status_code == 400, response.text
        assert words in response.json()["error"]["message"]
    server.wait_idle()


def test_abandoned_streams_free_their_kv_blocks(server):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 500, "ignore_eos": True, "stream": True}
    for _ in range(3):
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
            next(response.iter_lines())  # one chunk, then hang up mid-stream
    server.wait_idle()
    # The counters come from the engine process, which sends them with its outputs and when it goes idle:
    # the parent can look idle a moment before the last abort's counts arrive, so wait for them (bounded).
    deadline = time.monotonic() + 10
    while (stats := server.engine_stats())["num_requests_aborted"] < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats["kv_blocks_used"] == 0 and stats["num_requests_aborted"] >= 3
    metrics = httpx.get(server.url + "/metrics", timeout=5).text
    assert 'miniinfer_kv_blocks_used{model_name="shakespeare"} 0.0' in metrics


def test_thirty_concurrent_streaming_clients_all_complete(server, offline):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)

        async def one(i):
            prompt = PROMPTS[i % len(PROMPTS)]
            stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                     stream=True)
            return prompt, "".join([c.choices[0].text async for c in stream if c.choices])

        results = await asyncio.gather(*(one(i) for i in range(30)))
        await client.close()
        return results

    results = asyncio.run(main())
    assert all(text == offline[prompt] for prompt, text in results), results
    server.wait_idle()


def test_a_burst_over_the_waiting_bound_is_refused_then_the_server_admits_again(server):
    """More requests at once than 16 running + 64 waiting: the rest get 503. Once the burst has drained,
    new requests must be admitted. (The parent's count of waiting requests was refreshed only when it sent
    commands, and a full queue sends none: the server refused every request from then on.)"""
    async def burst():
        async with httpx.AsyncClient(timeout=60) as http:
            body = {"model": MODEL, "prompt": "x", "max_tokens": 4, "ignore_eos": True}
            responses = await asyncio.gather(*(http.post(server.url + "/v1/completions", json=body)
                                               for _ in range(120)))
            return [r.status_code for r in responses]

    statuses = asyncio.run(burst())
    assert set(statuses) == {200, 503} and statuses.count(200) >= 16, statuses
    server.wait_idle()
    assert server.engine_stats()["num_waiting_total"] == 0
    after = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2},
                       timeout=30)
    assert after.status_code == 200, after.text


def test_a_dead_engine_process_fails_requests_cleanly(server):
    """Last: kills the child. The stream in flight ends with an error event, /health says 503, new
    requests get 503 — all within seconds, nothing hangs."""
    pid = server.engine_stats()["engine_pid"]
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 900, "ignore_eos": True, "stream": True}
    start = time.monotonic()
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=20) as response:
        lines = response.iter_lines()
        next(lines)  # the request is running in the child
        os.kill(pid, signal.SIGKILL)
        events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert "engine process" in error["message"], error
    assert time.monotonic() - start < 15
    assert httpx.get(server.url + "/health", timeout=5).status_code == 503
    response = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4},
                          timeout=10)
    assert response.status_code == 503, response.text
    assert server.engine_stats()["engine_process_alive"] is False
    assert server.stop() == 0  # the parent still shuts down gracefully
