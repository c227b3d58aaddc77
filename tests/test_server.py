"""``miniinfer serve`` as a real subprocess, driven by the official ``openai`` client and raw HTTP.

One server per module (started once, ~3 s); every test leaves it idle (no request in flight, no KV
block held), which the tests check through ``/debug/engine``.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from miniinfer.server.testing import ServerProcess, free_port  # noqa: E402
from tests.server_fixtures import MODEL, PROMPTS  # noqa: E402  (client and offline: conftest.py)


@pytest.fixture(scope="module")
def server():
    grpc_port = free_port()
    server = ServerProcess("--max-num-seqs", "8", "--max-waiting", "64", "--seed", "0", "--grpc-port", str(grpc_port),
                           "--num-kv-blocks", "1024")
    server.grpc_target = f"127.0.0.1:{grpc_port}"
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def leaves_server_idle(request):
    yield
    if "server" in request.fixturenames:
        request.getfixturevalue("server").wait_idle()


def post(server, path, body, headers=None):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=data, headers={"Content-Type": "application/json", **(headers or {})},
                      timeout=30)


# -- the happy paths ----------------------------------------------------------------------------------


def test_models_health_and_greedy_completion_matches_offline(server, client, offline):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.choices[0].text == offline[PROMPTS[0]]
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_chat_completion_uses_the_chat_template(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What news?"}],
                                         max_tokens=20, temperature=0)
    choice = out.choices[0]
    assert out.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content and "\n\n" not in choice.message.content  # the bundled models' turn end
    assert choice.finish_reason in ("stop", "length")
    # max_completion_tokens is the newer name
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Speak."}],
                                         max_completion_tokens=3, temperature=0, stop=["zzz"])
    assert out.usage.completion_tokens <= 3


def test_streaming_completion_with_usage_equals_non_streaming(client, offline):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == offline[PROMPTS[1]]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_streaming_chat_deltas_and_raw_sse_framing(server, client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Who is there?"}], "max_tokens": 8,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    streamed = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads)
    whole = client.chat.completions.create(**{k: v for k, v in body.items() if k != "stream"})
    assert streamed == whole.choices[0].message.content


def test_n_completions_stop_and_seed(client):
    out = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=10, n=3, temperature=1.0, seed=7)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert 3 <= out.usage.completion_tokens <= 30
    again = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=10, n=3, temperature=1.0, seed=7)
    assert [c.text for c in out.choices] == [c.text for c in again.choices]  # seeded: reproducible
    # stop strings end the text and are cut from it
    full = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0).choices[0].text
    stop = full[5:7]
    cut = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full[:full.index(stop)]
    # n > 1 streaming: every index streams and ends once
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=6, n=2, stream=True,
                                            seed=3))
    ends = [choice.index for c in chunks for choice in c.choices if choice.finish_reason]
    assert sorted(ends) == [0, 1]


def test_logprobs_both_forms(client):
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == out.choices[0].text
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and len(top) == 3
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the chosen token is the most likely
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hail!"}],
                                         max_tokens=4, logprobs=True, top_logprobs=2, temperature=0)
    content = out.choices[0].logprobs.content
    assert 1 <= len(content) <= 4
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert math.isfinite(entry.logprob)


# -- bad input: a 4xx with OpenAI's error object, never a 5xx ---------------------------------------------

BAD_BODIES = [
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 2}, "top_p"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 10**6}, "n"),
    ({"prompt": "x", "top_k": -5}, "top_k"),
    ({"prompt": "x", "min_p": 1.5}, "min_p"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": -9}, "frequency_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "logprobs": 99}, "logprobs"),
    ({"prompt": "x", "seed": 2**70}, "seed"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 1000}}, "logit_bias"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": "ROMEO " * 2000}, "prompt"),
    ({}, "prompt"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD_BODIES)])
def test_bad_completion_parameters_are_400_naming_the_field(server, body, param):
    response = post(server, "/v1/completions", {"model": MODEL, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


BAD_CHATS = [
    {"messages": []},
    {"messages": "hi"},
    {"messages": [{"role": "wizard", "content": "hi"}]},
    {"messages": [{"role": "user"}]},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
    {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 50},
    {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
    {"messages": [{"role": "user", "content": "hi " * 3000}]},
]


@pytest.mark.parametrize("body", BAD_CHATS, ids=range(len(BAD_CHATS)))
def test_bad_chat_requests_are_400(server, body):
    response = post(server, "/v1/chat/completions", {"model": MODEL, **body})
    assert response.status_code == 400, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_non_finite_numbers_malformed_json_and_wrong_routes(server):
    for raw in (b'{"model": "shakespeare", "prompt": "x", "temperature": NaN}',
                b'{"model": "shakespeare", "prompt": "x", "top_p": Infinity}',
                b'{"model": "shakespeare", "prompt": "x",', b"not json", b"[1, 2]", b"\xff\xfe"):
        response = post(server, "/v1/completions", raw)
        assert response.status_code == 400, (raw, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
    form = httpx.post(server.url + "/v1/completions", data={"prompt": "x"})
    assert form.status_code == 400 and "Content-Type" in form.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert "error" in httpx.get(server.url + "/v1/nothing").json()
    assert httpx.get(server.url + "/v1/completions").status_code == 405
    assert post(server, "/v1/completions", b"x" * (9 * 2**20)).status_code == 413


def test_fuzzed_bodies_never_get_a_5xx_and_the_server_keeps_serving(server):
    """80 random bodies: every field of both endpoints drawn from well-typed, out-of-range and wrong-typed
    values (seeded; replay with MINIINFER_TEST_SEED). Each answer is a 200 or a 4xx with an error object."""
    import os
    import random

    seed = int(os.environ.get("MINIINFER_TEST_SEED", random.randrange(2**31)))
    print(f"seed={seed}")
    rng = random.Random(seed)
    junk = [None, True, -1, 0, 1, 2**63, -2**63, 1e308, -1e-9, 0.5, "", "x", [], [1], ["a"], {}, {"a": 1},
            [[1, 2]], "\ud800"]
    valid = {  # field -> values the server must accept
        "max_tokens": [1, 2, 4], "temperature": [0, 0.7, 2], "top_p": [0.1, 1], "top_k": [-1, 0, 5],
        "min_p": [0, 0.2], "n": [1, 2, 3], "stop": ["\n", ["a", "b"], [""]], "seed": [0, -5, 2**63 - 1],
        "presence_penalty": [0, 1.5], "frequency_penalty": [-2, 0.3], "repetition_penalty": [1, 1.3],
        "stream": [True, False], "ignore_eos": [True, False], "user": ["alice"], "logit_bias": [{"5": 2}, {}],
        "min_tokens": [0, 1], "stop_token_ids": [[0], []], "no_such_field": [1, "x", None],
    }
    invalid = {  # field -> values the server must refuse with a 4xx
        "model": ["nope", 5], "max_tokens": [0, -1, 10**12, "4"], "temperature": [2.5, -1], "top_p": [0, 1.5],
        "top_k": [-7], "min_p": [1.1], "n": [0, 65], "stop": [[1]], "seed": [2**70], "presence_penalty": [3],
        "frequency_penalty": [-2.1], "repetition_penalty": [0, -1], "logit_bias": [{"x": 1}, {"5": 500}, []],
        "stream_options": [{"include_usage": "x"}, 3], "best_of": [5], "min_tokens": [100],
        "stop_token_ids": [[-1], "a"], "ignore_eos": [1], "user": [5],
    }
    completion_only = {"prompt": (["ROMEO.\n", [1, 2, 3], ["a", "b"], [[1], [2]]], ["", [10**9], [], 5]),
                       "logprobs": ([0, 3], [21, True]), "echo": ([False], [True])}
    chat_only = {"messages": ([[{"role": "user", "content": "Hail!"}],
                               [{"role": "assistant", "content": [{"type": "text", "text": "Hm."}]}]],
                              [[], [{"role": "user"}], "hi", [{"role": "user", "content": "\ud800"}]]),
                 "logprobs": ([True, False], [3]), "top_logprobs": ([0, 2], [30])}
    statuses = []
    for i in range(80):
        chat = i % 2 == 1
        body = {"model": MODEL, "max_tokens": 2}
        body.update({"messages": [{"role": "user", "content": "Hail!"}]} if chat else {"prompt": "ROMEO.\n"})
        own = chat_only if chat else completion_only
        names = sorted(set(valid) | set(invalid) | set(own))
        expect_error = False
        for name in rng.sample(names, rng.randint(1, 6)):
            good, bad_values = own.get(name, (valid.get(name, []), invalid.get(name, [])))
            if good and rng.random() < 0.85:
                body[name] = rng.choice(good)
            else:
                body[name] = rng.choice(bad_values + junk) if bad_values else rng.choice(junk)
                # 1 == True in Python: compare types too
                expect_error |= any(type(body[name]) is type(v) and body[name] == v for v in bad_values)
        if chat and body.get("top_logprobs") is not None and not body.get("logprobs"):
            expect_error = True
        if not body.get("stream") and "stream_options" in body and body["stream_options"] is not None:
            expect_error = True
        path = "/v1/chat/completions" if chat else "/v1/completions"
        response = httpx.post(server.url + path, content=json.dumps(body),
                              headers={"Content-Type": "application/json"}, timeout=60)
        statuses.append(response.status_code)
        assert response.status_code < 500, (path, body, response.text)
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text
        elif expect_error:
            raise AssertionError(f"accepted a bad request: {path} {body}")
    assert statuses.count(200) >= 20 and statuses.count(400) >= 20, statuses
    assert httpx.get(server.url + "/health").status_code == 200


def test_openai_exception_types_and_unknown_fields(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-17", prompt="x", max_tokens=2)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x " * 3000}],
                                       max_tokens=2)
    assert info.value.code == "context_length_exceeded"
    # unknown fields are ignored, as OpenAI and vLLM do; user is accepted
    out = client.completions.create(model=MODEL, prompt="x", max_tokens=2, user="alice",
                                    extra_body={"no_such_field": [1, 2], "ignore_eos": True})
    assert out.usage.completion_tokens == 2


# -- faults, load, observability ---------------------------------------------------------------------------


def test_abandoned_streams_free_their_kv_blocks(server):
    before = _metric(server, 'miniinfer_request_success_total{finished_reason="abort",model_name="shakespeare"}')
    logged_499 = server.read_log().count('"status": 499')
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 500, "ignore_eos": True, "stream": True}
    for _ in range(3):
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
            next(response.iter_lines())  # one chunk, then hang up mid-stream
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up is noticed too
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
    stats = server.wait_idle()
    assert stats["kv_blocks_used"] == 0
    assert _metric(server, 'miniinfer_request_success_total{finished_reason="abort",model_name="shakespeare"}') \
        >= before + 4
    assert _metric(server, 'miniinfer_kv_blocks_used{model_name="shakespeare"}') == 0
    # each hang-up is logged as such (499, nginx's "client closed request"), not as a 200
    assert server.read_log().count('"status": 499') >= logged_499 + 4


def test_concurrent_clients_all_get_their_own_answer(server, offline):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)

        async def one(i):
            prompt = PROMPTS[i % len(PROMPTS)]
            if i % 2:
                out = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
                return prompt, out.choices[0].text
            stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                     stream=True)
            return prompt, "".join([c.choices[0].text async for c in stream if c.choices])

        results = await asyncio.gather(*(one(i) for i in range(32)))
        await client.close()
        return results

    start = time.perf_counter()
    results = asyncio.run(main())
    assert all(text == offline[prompt] for prompt, text in results), results
    print(f"32 concurrent clients: {time.perf_counter() - start:.2f} s")


def test_load_with_random_disconnects_loses_nothing(server):
    """64 streaming clients at once, a fifth of them hang up at a random point: every other one gets its
    whole answer, nothing hangs, and afterwards every KV block is free and the server healthy."""
    import random

    rng = random.Random(1234)
    quitters = set(rng.sample(range(64), 13))

    async def main():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            async def one(i):
                body = {"model": MODEL, "prompt": PROMPTS[i % 4], "max_tokens": 16, "ignore_eos": True,
                        "stream": True, "seed": i, "stream_options": {"include_usage": True}}
                chunks = 0
                async with http.stream("POST", server.url + "/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if not line:
                            continue
                        if line == "data: [DONE]":
                            return "done", chunks
                        chunks += 1
                        if i in quitters and chunks >= 1 + i % 8:
                            return "quit", chunks  # leaving the block closes the connection mid-stream
                return "cut", chunks

            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(64))), 60)

    results = asyncio.run(main())
    assert all(results[i][0] == "done" for i in range(64) if i not in quitters), results
    stats = server.wait_idle()
    assert stats["kv_blocks_used"] == 0 and stats["num_waiting"] == 0
    assert httpx.get(server.url + "/health").status_code == 200


def test_traceparent_is_continued_and_returned(server):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1},
                    headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    version, returned_trace, span, flags = response.headers["traceparent"].split("-")
    assert returned_trace == trace_id and span != "00f067aa0ba902b7" and len(span) == 16
    fresh = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1},
                 headers={"traceparent": "garbage"}).headers["traceparent"]
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", fresh) and trace_id not in fresh
    log = server.read_log()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{") and trace_id in line]
    assert lines and lines[-1]["msg"] == "request finished" and lines[-1]["completion_tokens"] == 1
    assert lines[-1]["route"] == "/v1/completions" and lines[-1]["ttft_s"] is not None


def test_metrics_exposition(server):
    long_prompt = "ROMEO.\n" + "Good morrow, cousin, what news from the court? " * 4
    for _ in range(2):  # the second one finds the first one's prompt blocks in the prefix cache
        post(server, "/v1/completions", {"model": MODEL, "prompt": long_prompt, "max_tokens": 1})
    text = httpx.get(server.url + "/metrics").text
    for name in ("miniinfer_time_to_first_token_seconds_bucket", "miniinfer_inter_token_latency_seconds_bucket",
                 "miniinfer_e2e_request_latency_seconds_bucket", "miniinfer_request_queue_time_seconds_bucket",
                 "miniinfer_num_requests_running", "miniinfer_num_requests_waiting", "miniinfer_kv_cache_usage_ratio",
                 "miniinfer_prompt_tokens_total", "miniinfer_generation_tokens_total",
                 "miniinfer_prefix_cache_hit_tokens_total", "miniinfer_num_preemptions_total",
                 "miniinfer_request_success_total"):
        assert name in text, name
    assert _metric(server, 'miniinfer_generation_tokens_total{model_name="shakespeare"}') > 0
    assert _metric(server, 'miniinfer_prefix_cache_hit_tokens_total{model_name="shakespeare"}') > 0  # repeats
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _metric(server, series: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


# -- gRPC beside HTTP, on the same engine ---------------------------------------------------------------


def test_grpc_unary_streaming_errors_and_cancel(server, offline):
    grpc = pytest.importorskip("grpc")
    from miniinfer.server.grpc_client import GeneratorClient

    with GeneratorClient(server.grpc_target) as client:
        assert client.health() == "SERVING" and client.health("miniinfer.v1.Generator") == "SERVING"
        out = client.generate(PROMPTS[0], max_tokens=12, temperature=0, logprobs=2, timeout=30)
        assert out.finished and out.completions[0].text == offline[PROMPTS[0]]
        assert out.completion_tokens == 12 and out.completions[0].finish_reason == "length"
        assert len(out.completions[0].logprobs) == 12 and len(out.completions[0].logprobs[0].top) >= 2
        messages = list(client.generate_stream(PROMPTS[1], max_tokens=12, temperature=0, timeout=30))
        assert "".join(m.completions[0].text for m in messages) == offline[PROMPTS[1]]
        assert messages[-1].finished and messages[-1].completion_tokens == 12
        ids = client.generate([5, 6, 7], max_tokens=3, n=2, seed=1, timeout=30)
        assert sorted(c.index for c in ids.completions) == [0, 1]
        for bad in ({"temperature": 5.0}, {"top_p": 0.0}, {"max_tokens": 10**6}):
            with pytest.raises(grpc.RpcError) as info:
                client.generate("x", timeout=30, **bad)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            client.generate(PROMPTS[0], max_tokens=500, ignore_eos=True, timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stream = client.generate_stream(PROMPTS[0], max_tokens=500, ignore_eos=True, timeout=30)
        next(stream)
        stream.cancel()  # the client hangs up: the request is aborted, its blocks freed
    server.wait_idle()
    text = httpx.get(server.url + "/metrics").text
    assert 'miniinfer_grpc_requests_total{method="Generate",status="OK"}' in text


def test_grpc_descriptor_is_generated_from_the_proto():
    pytest.importorskip("grpc_tools")
    from miniinfer.server import grpc_codegen
    from miniinfer.server.proto.descriptor import FILE_DESCRIPTOR

    assert FILE_DESCRIPTOR == grpc_codegen.descriptor_bytes(), "run python -m miniinfer.server.grpc_codegen"


# -- a real Prometheus scrapes the server; every dashboard query returns data ---------------------------


def test_prometheus_scrapes_and_every_dashboard_query_returns_data(server, client, tmp_path):
    from pathlib import Path

    import yaml

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (Debian package 'prometheus')")
    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "deploy/prometheus/prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "500ms"
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [server.url.removeprefix("http://")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prometheus = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api/v1/query"
    try:
        def query(expr):
            response = httpx.get(api, params={"query": expr}, timeout=5)
            assert response.status_code == 200, (expr, response.text)
            return response.json()["data"]["result"]

        deadline = time.monotonic() + 30
        while True:  # until a few scrapes have landed, with traffic in between
            try:
                if len(query("miniinfer_engine_steps_total[30s]")[0]["values"]) >= 3:
                    break
            except (httpx.HTTPError, IndexError, KeyError):
                pass
            client.completions.create(model=MODEL, prompt=PROMPTS[0] * 3, max_tokens=4)
            assert time.monotonic() < deadline and prometheus.poll() is None, "Prometheus did not scrape the server"
            time.sleep(0.25)
        dashboard = json.loads((root / "deploy/grafana/miniinfer-dashboard.json").read_text())
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
        assert len(exprs) >= 12
        for expr in exprs:
            if "gpu" in expr:
                continue  # GPU series exist on GPU servers only
            concrete = expr.replace("$__rate_interval", "10s").replace('"$job"', '".*"')
            assert query(concrete), f"no data for {concrete}"
    finally:
        prometheus.kill()  # its data lives in tmp_path: nothing to shut down cleanly
        prometheus.wait(10)
