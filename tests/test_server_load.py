"""The server under a burst of 200 streaming clients, a fifth of whom hang up, and with a request that fails.

What the load test proves, against a real ``miniinfer serve`` subprocess:

* 200 streaming clients at once (completions and chat, mixed) are all admitted: the server's limits are
  chosen so that none is refused (64 sequences per step, room for 256 waiting requests), so the queue
  really fills up and drains while clients come and go;
* a random 20 % of them hang up at a random point: while still waiting for the response headers (the
  task is cancelled, as a client-side timeout would), right after the first chunk, or mid-stream. The
  choice is seeded, printed, and replayable with ``MINIINFER_TEST_SEED=<seed>``;
* every other client gets its whole answer: exactly the tokens it asked for (``ignore_eos`` +
  ``max_tokens``), the same text as the model offline (greedy), and a stream that ends in ``data: [DONE]``;
* nothing is lost or hangs (the whole burst is bounded by ``asyncio.wait_for``);
* afterwards nothing is running or waiting and every KV block is free (``/debug/engine``), ``/health`` is
  200, and a fresh request still gets the offline answer.

A second test proves, over HTTP, that an exception inside one request's processing fails that request
only: ``tests/test_server_limits.py`` shows it for the async engine in-process (no HTTP); here a poisoned
request gets OpenAI's error object (a 500, or an error event in its stream) while the requests beside it
succeed, and the server stays healthy with every block free.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from miniinfer.server.testing import InProcessServer, ServerProcess  # noqa: E402

MODEL = "shakespeare"
PROMPTS = ["ROMEO.\n", "JULIET.\nO Romeo,", "HAMLET.\nTo be", "KING.\nWhat news"]
CHATS = ["Hail!", "Who is there?", "What news?"]
NUM_CLIENTS = 200
QUIT_FRACTION = 0.2
MAX_TOKENS = 10            # small: 200 clients x 10 tokens stays well within the time budget on 2 CPU cores
BURST_TIMEOUT_S = 75       # every client must be answered (or have hung up) by then: nothing may hang
QUIT_STAGES = ("before_headers", "after_first_chunk", "mid_stream")


@pytest.fixture(scope="module")
def server():
    # 64 sequences per step and room for 256 waiting requests: all 200 are admitted (none is refused with
    # 503), and about 136 of them really wait in the queue, so hang-ups happen in the queue as well as in
    # the running batch. 1024 KV blocks of 16 tokens hold 64 running sequences many times over.
    server = ServerProcess("--max-num-seqs", "64", "--max-waiting", "256", "--num-kv-blocks", "1024",
                           "--seed", "0")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llm():
    from miniinfer import LLM

    return LLM(device="cpu")


def _chat_messages(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def offline(llm):
    """The greedy answers of the same model offline, keyed by ``("completion" | "chat", prompt)``."""
    from miniinfer import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    # The server renders a chat through the tokenizer's chat template and then tokenizes that text.
    template = llm.tokenizer.apply_chat_template
    rendered = [template(_chat_messages(c), add_generation_prompt=True) for c in CHATS]
    outs = llm.generate(PROMPTS + rendered, params, use_tqdm=False)
    keys = [("completion", p) for p in PROMPTS] + [("chat", c) for c in CHATS]
    return {key: out.text for key, out in zip(keys, outs)}


def _request(i: int) -> tuple[str, tuple[str, str], dict]:
    """Client ``i``'s route, its offline key and its body: even clients complete, odd ones chat."""
    common = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True,
              "stream_options": {"include_usage": True}}
    if i % 2 == 0:
        prompt = PROMPTS[i // 2 % len(PROMPTS)]
        return "/v1/completions", ("completion", prompt), {**common, "prompt": prompt}
    content = CHATS[i // 2 % len(CHATS)]
    # "stop": [] turns off the bundled models' default chat stop string (a blank line), so a chat reply too
    # runs to exactly max_tokens and can be compared with the offline answer.
    body = {**common, "messages": _chat_messages(content), "stop": []}
    return "/v1/chat/completions", ("chat", content), body


def _chunk_text(route: str, chunk: dict) -> str:
    if not chunk["choices"]:
        return ""
    choice = chunk["choices"][0]
    return choice["text"] if route == "/v1/completions" else choice["delta"].get("content", "")


async def _client(http: httpx.AsyncClient, url: str, i: int,
                  quit_plan: tuple[str, float, int] | None) -> dict:
    """One streaming client. ``quit_plan`` is ``(stage, delay before hanging up, chunk to hang up after)``."""
    route, key, body = _request(i)
    result = {"i": i, "route": route, "key": key, "status": None, "events": [], "ended": "cut"}
    request = http.build_request("POST", url + route, json=body)
    sending = asyncio.ensure_future(http.send(request, stream=True))
    if quit_plan is not None and quit_plan[0] == "before_headers":
        # Hang up while still waiting for the response headers: cancel the request, as a client-side
        # timeout does. The server may or may not have admitted it yet; both must be clean.
        await asyncio.sleep(quit_plan[1])
        if not sending.done():
            sending.cancel()
            try:
                await sending
            except asyncio.CancelledError:
                pass
            result["ended"] = "quit before headers"
            return result
    response = await sending
    try:
        result["status"] = response.status_code
        async for line in response.aiter_lines():
            if not line:
                continue
            result["events"].append(line)
            if line == "data: [DONE]":
                result["ended"] = "done"
                break
            if quit_plan is not None and len(result["events"]) >= quit_plan[2]:
                result["ended"] = f"quit after chunk {len(result['events'])}"
                break
    finally:
        await response.aclose()  # closes the connection when the stream was not read to its end: a hang-up
    return result


def _quit_plans(seed: int) -> dict[int, tuple[str, float, int]]:
    """Which clients hang up, and when (seeded: the same seed replays the same hang-ups)."""
    rng = random.Random(seed)
    quitters = rng.sample(range(NUM_CLIENTS), round(QUIT_FRACTION * NUM_CLIENTS))
    plans = {}
    for i in quitters:
        stage = rng.choice(QUIT_STAGES)
        # A stream has the chat's role chunk (chat only), MAX_TOKENS content chunks at most, the usage chunk
        # and [DONE]: "mid-stream" hangs up after one of chunks 2 .. MAX_TOKENS - 1, never at the very end.
        after = rng.randint(2, MAX_TOKENS - 1) if stage == "mid_stream" else 1
        plans[i] = (stage, rng.uniform(0.0, 0.05), after)
    return plans


def test_200_streaming_clients_with_random_hang_ups_lose_nothing(server, offline):
    seed = int(os.environ.get("MINIINFER_TEST_SEED", random.randrange(2**31)))
    print(f"seed={seed} (replay with MINIINFER_TEST_SEED={seed})")
    plans = _quit_plans(seed)

    async def burst():
        # No connection pool limit: all 200 clients really are connected at once.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=BURST_TIMEOUT_S, limits=limits) as http:
            clients = [_client(http, server.url, i, plans.get(i)) for i in range(NUM_CLIENTS)]
            return await asyncio.wait_for(asyncio.gather(*clients), BURST_TIMEOUT_S)

    start = time.perf_counter()
    results = asyncio.run(burst())
    elapsed = time.perf_counter() - start
    endings: dict[str, int] = {}
    for result in results:
        kind = result["ended"] if not result["ended"].startswith("quit after") else "quit after a chunk"
        endings[kind] = endings.get(kind, 0) + 1
    print(f"{NUM_CLIENTS} clients in {elapsed:.1f} s: {endings}")

    for result in results:
        i, route = result["i"], result["route"]
        if i in plans:
            assert result["status"] in (None, 200), result  # a quitter is never refused either
            continue
        assert result["status"] == 200, result
        assert result["ended"] == "done" and result["events"][-1] == "data: [DONE]", result
        chunks = [json.loads(event.removeprefix("data: ")) for event in result["events"][:-1]]
        assert all(event.startswith("data: ") for event in result["events"]), result
        assert "error" not in chunks[-1], result
        usage = chunks[-1]["usage"]
        assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == MAX_TOKENS, result
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finish[-1] == "length" and not any(finish[:-1]), result
        text = "".join(_chunk_text(route, chunk) for chunk in chunks)
        assert text == offline[result["key"]], (i, text, offline[result["key"]])

    stats = server.wait_idle(timeout=30)
    assert stats["kv_blocks_used"] == 0 and stats["num_running"] == 0, stats
    assert stats["num_waiting"] == stats["num_waiting_total"] == stats["num_in_flight"] == 0, stats
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    route, key, body = _request(0)
    fresh = httpx.post(server.url + route, json={**body, "stream": False, "stream_options": None}, timeout=30)
    assert fresh.status_code == 200, fresh.text
    assert fresh.json()["choices"][0]["text"] == offline[key]
    server.wait_idle()


# -- an exception inside one request's processing fails that request only, over HTTP -----------------------

POISON = "POISON"


def _poison_calls() -> list[tuple[bool, bool, str, dict]]:
    """``(poisoned, stream, route, body)``: clean and poisoned, streaming or not, completion and chat."""
    calls = []
    for poisoned in (False, True):
        for stream in (False, True):
            suffix = POISON if poisoned else ""
            common = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                      "stream": stream}
            calls.append((poisoned, stream, "/v1/completions", {**common, "prompt": PROMPTS[0] + suffix}))
            calls.append((poisoned, stream, "/v1/chat/completions",
                          {**common, "messages": _chat_messages(CHATS[0] + suffix), "stop": []}))
    return calls


async def _send_all(url: str, calls) -> list[tuple[int, str]]:
    """Every call at once; ``(status, body text)`` of each."""
    async with httpx.AsyncClient(timeout=60) as http:
        async def one(route: str, body: dict) -> tuple[int, str]:
            async with http.stream("POST", url + route, json=body) as response:
                return response.status_code, (await response.aread()).decode()

        return await asyncio.wait_for(asyncio.gather(*(one(route, body) for *_, route, body in calls)), 60)


def _check_answer(poisoned: bool, stream: bool, route: str, status: int, text: str, offline: dict) -> None:
    where = (poisoned, stream, route, status, text)
    key = ("completion", PROMPTS[0]) if route == "/v1/completions" else ("chat", CHATS[0])
    if not stream and poisoned:  # OpenAI's error object, naming what went wrong
        error = json.loads(text)["error"]
        assert status == 500 and set(error) == {"message", "type", "param", "code"}, where
        assert error["code"] == "generation_failed" and "boom" in error["message"], where
    elif not stream:
        body = json.loads(text)
        choice = body["choices"][0]
        answer = choice["text"] if route == "/v1/completions" else choice["message"]["content"]
        assert status == 200 and body["usage"]["completion_tokens"] == MAX_TOKENS, where
        assert answer == offline[key], where
    else:  # a stream has sent its 200 before the failure: the error comes as its last event
        events = [event for event in text.split("\n\n") if event]
        assert status == 200 and events[-1] == "data: [DONE]", where
        last = json.loads(events[-2].removeprefix("data: "))
        if poisoned:
            assert last["error"]["code"] == "generation_failed" and "boom" in last["error"]["message"], where
        else:
            assert "error" not in last and last["choices"][0]["finish_reason"] == "length", where


def test_an_exception_in_one_request_fails_only_that_request_over_http(llm, offline):
    """A bug that strikes the bookkeeping of requests whose prompt holds ``POISON`` (the engine's
    detokenization step raises for them): each poisoned request, streaming or not, completion or chat,
    gets OpenAI's error object, and the clean requests running in the same batches get their answers."""
    engine = llm.engine
    original = engine._update_text

    def update_text(seq, request):
        # The server hands the engine token ids, not text: decode them to find the poisoned prompts.
        if POISON in llm.tokenizer.decode(request.prompt_token_ids):
            raise RuntimeError("boom: a bug in one request's processing")
        return original(seq, request)

    calls = _poison_calls()
    engine._update_text = update_text
    try:
        with InProcessServer(llm) as server:
            answers = asyncio.run(_send_all(server.url, calls))
            for (poisoned, stream, route, _), (status, text) in zip(calls, answers):
                _check_answer(poisoned, stream, route, status, text, offline)
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200
            deadline = time.monotonic() + 10
            while True:  # idle: nothing in flight, every KV block free
                stats = httpx.get(server.url + "/debug/engine", timeout=10).json()
                if not stats["num_in_flight"] and not stats["kv_blocks_used"]:
                    break
                assert time.monotonic() < deadline, stats
                time.sleep(0.05)
            assert stats["num_requests_failed"] == 4, stats  # the four poisoned requests, no other
    finally:
        engine._update_text = original
