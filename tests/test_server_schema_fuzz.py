"""Schemathesis fuzzes ``miniinfer serve`` from the server's own ``/openapi.json``.

The request bodies of POST /v1/completions and POST /v1/chat/completions are described by hand-written JSON
schemas (``miniinfer/server/protocol.py``); the parsers beside them stay the one place that validates. This
file proves that the description and the server agree, and that no body breaks the server:

* **positive** generation (bodies the schema accepts): never a 5xx (a 504 only for a body that set its own
  ``timeout``), every 4xx carries OpenAI's error object, every 200 has the documented shape, and a stream
  ends in ``data: [DONE]``. A body the schema accepts may still get a 400 for a rule JSON Schema cannot say
  (the prompt's tokens plus max_tokens must fit the context, min_tokens <= max_tokens, ...): the schema's
  descriptions say which;
* **negative** generation (bodies the schema calls invalid): every one is refused with a 4xx carrying the
  error object (schemathesis's ``negative_data_rejection``): the schema never calls a body invalid that the
  server would serve;
* schemathesis's **coverage phase** (no randomness: each field at and past its boundaries, each type it
  does not take, missing required fields, other HTTP methods) passes the same checks;
* the server stays healthy and idle (no request in flight, no KV block held) after each run;
* the bugs this found stay fixed (``REGRESSIONS`` at the end: a 500 from a tiny repetition penalty, a bad
  ``max_tokens`` ignored beside ``max_completion_tokens``, and places where schema and parser disagreed).

Deterministic: Hypothesis runs derandomized (its seed comes from the test, not the clock) and keeps no
example database, so CI sees the same bodies every time. Bounded: a few dozen examples per endpoint and
mode, a timeout on every request, and pytest-timeout on the whole test.
"""

from __future__ import annotations

import json
import os

import pytest

schemathesis = pytest.importorskip("schemathesis")  # in the dev extra; skipped where it is not installed
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402  (schemathesis depends on hypothesis)
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from miniinfer.server.testing import ServerProcess  # noqa: E402

MODEL = "shakespeare"
ENDPOINTS = ["/v1/completions", "/v1/chat/completions"]
# Per endpoint and mode. To fuzz deeper or elsewhere: MINIINFER_FUZZ_EXAMPLES=500 (more bodies, the same ones
# first) and MINIINFER_TEST_SEED=<n> (other bodies: Hypothesis seeded with n instead of derandomized).
MAX_EXAMPLES = int(os.environ.get("MINIINFER_FUZZ_EXAMPLES", 30))
SEED = os.environ.get("MINIINFER_TEST_SEED")
REQUEST_TIMEOUT_S = 30             # a request that takes longer is a hang: the test fails
# Positive bodies may ask for a lot of work (64 prompts x 8 completions x 100 tokens): on 2 CPU cores that
# is minutes, so they are scaled down before they are sent (still schema-valid): at most this many tokens,
# completions and prompts per request.
MAX_TOKENS, MAX_N, MAX_PROMPTS = 4, 2, 2
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server():
    # A small context (128 tokens) keeps max_tokens, and so every accepted request, short; 8 sequences per
    # step make n > 8 a 400 that the schema states (maximum of n).
    server = ServerProcess("--max-num-seqs", "8", "--max-model-len", "128", "--num-kv-blocks", "256",
                           "--seed", "0")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def test_the_schema_describes_the_request_bodies_and_the_error_object(server):
    """/openapi.json names the real request bodies, their required fields and ranges, and the error object."""
    schema = httpx.get(server.url + "/openapi.json", timeout=10).json()
    components = schema["components"]["schemas"]
    for path, name, required in (("/v1/completions", "CompletionRequest", "prompt"),
                                 ("/v1/chat/completions", "ChatCompletionRequest", "messages")):
        operation = schema["paths"][path]["post"]
        body = operation["requestBody"]
        assert body["required"] and body["content"]["application/json"]["schema"]["$ref"].endswith(name)
        assert components[name]["required"] == [required]
        for status in ("400", "404", "413", "500", "503", "504"):
            error = operation["responses"][status]["content"]["application/json"]["schema"]
            assert error["$ref"].endswith("/ErrorResponse")
        assert set(operation["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    properties = components["CompletionRequest"]["properties"]
    assert properties["temperature"]["anyOf"][0] == {"type": "number", "minimum": 0, "maximum": 2}
    assert properties["max_tokens"]["anyOf"][0]["maximum"] == 127  # the context, less one prompt token
    assert properties["n"]["anyOf"][0]["maximum"] == 8              # --max-num-seqs 8
    assert properties["model"]["anyOf"][0]["enum"] == [MODEL]
    assert set(components["ErrorResponse"]["properties"]["error"]["required"]) == ERROR_FIELDS


# -- the checks ------------------------------------------------------------------------------------------


def _asked_for_a_deadline(case) -> bool:
    return isinstance(case.body, dict) and case.body.get("timeout") is not None


def _check_status_and_error_object(response, case) -> None:
    """No 5xx (but a 504 for a body that set a timeout and ran out of it); every 4xx/5xx is OpenAI's error."""
    body = json.dumps(case.body, default=repr)[:2000]
    where = f"{case.method} {case.path} {body} -> {response.status_code}: {response.text[:1000]}"
    if response.status_code >= 500:
        assert response.status_code == 504 and _asked_for_a_deadline(case), where
    if response.status_code >= 400:
        error = response.json().get("error")
        assert isinstance(error, dict) and set(error) == ERROR_FIELDS, where
        assert isinstance(error["message"], str) and error["message"], where


def _check_stream(response, case) -> None:
    """A 200 stream is a run of ``data: {json}`` events ending in ``data: [DONE]``; an error event only for a
    request that ran out of its own timeout."""
    content_type = (response.headers.get("content-type") or [""])[0]  # schemathesis: header -> list of values
    if response.status_code != 200 or not content_type.startswith("text/event-stream"):
        return
    events = [event for event in response.text.split("\n\n") if event]
    where = f"{case.path} {json.dumps(case.body, default=repr)[:2000]}: {response.text[-1000:]}"
    assert not response.stream_cut_short, where  # read to its end, not stopped at a time or event limit
    assert events and events[-1] == "data: [DONE]", where
    for event in events[:-1]:
        assert event.startswith("data: "), where
        payload = json.loads(event.removeprefix("data: "))
        if "error" in payload:
            assert payload["error"]["code"] == "timeout" and _asked_for_a_deadline(case), where


def _scale_down(body: dict) -> None:
    """Shrink a positive body's workload in place, keeping it valid: fewer tokens, completions, prompts."""
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(name), (int, float)):
            body[name] = min(body[name], MAX_TOKENS)
    if "messages" in body and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS  # a chat without one would generate up to the end of the context
    for name in ("n", "best_of"):
        if isinstance(body.get(name), (int, float)):
            body[name] = min(body[name], MAX_N)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        body["prompt"] = prompt[:MAX_PROMPTS]


def _call_and_check(server, case, mode: GenerationMode, statuses: dict, refused: dict) -> None:
    """Send one generated case and run every check on its answer; count its status and refused parameter."""
    if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
        _scale_down(case.body)
    response = case.call(base_url=server.url, timeout=REQUEST_TIMEOUT_S)
    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    _check_status_and_error_object(response, case)
    if response.status_code >= 400:
        param = f"{response.status_code} {response.json()['error']['param']}"
        refused[param] = refused.get(param, 0) + 1
    _check_stream(response, case)
    checks = [status_code_conformance, content_type_conformance, response_schema_conformance]
    if mode is GenerationMode.NEGATIVE:
        checks.append(negative_data_rejection)  # a body the schema calls invalid must get a 4xx
    case.validate_response(response, checks=checks)


def _fuzz(server, operation, mode: GenerationMode) -> dict[int, int]:
    """Run Hypothesis over ``operation``'s generated cases in ``mode``; return the count of each status (and
    print the count of each refused parameter: what the schema could not say, in positive mode)."""
    statuses: dict[int, int] = {}
    refused: dict[str, int] = {}

    @settings(max_examples=MAX_EXAMPLES, derandomize=SEED is None, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure prints its body and curl
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case):
        _call_and_check(server, case, mode, statuses, refused)

    if SEED is not None:
        fuzz = seed(int(SEED))(fuzz)
        print(f"MINIINFER_TEST_SEED={SEED}")
    fuzz()
    refused = dict(sorted(refused.items(), key=lambda item: -item[1]))
    print(f"{mode.value} {operation.path}: refused {refused}")
    return statuses


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize("path", ENDPOINTS)
def test_schemathesis_fuzzing(server, api_schema, path, mode):
    statuses = _fuzz(server, api_schema[path]["POST"], mode)
    print(f"{mode.value} {path}: {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= 10, statuses  # Hypothesis really ran
    if mode is GenerationMode.POSITIVE:
        # The schema is useful, not only safe: a fair share of the bodies it accepts are served.
        assert statuses.get(200, 0) >= 3, statuses
    else:
        assert set(statuses) <= {400, 404, 413}, statuses
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    server.wait_idle(timeout=30)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", ENDPOINTS)
def test_schemathesis_coverage_phase(server, api_schema, path):
    """Schemathesis's coverage phase: no randomness, each field at its boundaries (minimum, maximum, one past
    them, each type it does not take, required fields missing, other HTTP methods): the same checks."""
    operation = api_schema[path]["POST"]
    generation = api_schema.config.generation_for(operation=operation)
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        statuses: dict[int, int] = {}
        refused: dict[str, int] = {}
        for case in api_schema.iter_coverage_cases(operation, generation_modes=[mode],
                                                   generation_config=generation):
            _call_and_check(server, case, mode, statuses, refused)
        print(f"coverage {mode.value} {path}: {dict(sorted(statuses.items()))}")
        assert sum(statuses.values()) >= 50, statuses
        if mode is GenerationMode.NEGATIVE:  # 405: the coverage phase also tries GET, PUT, ... on the path
            assert set(statuses) <= {400, 404, 405, 413}, statuses
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    server.wait_idle(timeout=30)


# -- what the fuzzer and the schema found: regression cases ----------------------------------------------

REGRESSIONS = [
    # (endpoint, body, expected status, the error's param): each was answered differently before
    # A repetition penalty that rounds to 0 in float32 made the logits infinite: a 500 "generation failed".
    ("/v1/completions", {"prompt": "0", "repetition_penalty": 5e-324}, 400, "repetition_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}], "repetition_penalty": 1e-38,
                              "max_tokens": 4}, 400, "repetition_penalty"),
    # A bad max_tokens was silently ignored when max_completion_tokens was given.
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hail!"}], "max_completion_tokens": 2,
                              "max_tokens": "ten"}, 400, "max_tokens"),
    # Token ids written 3.0 are integers to JSON Schema (and to every other integer field here): were a 400.
    ("/v1/completions", {"prompt": [261, 400.0, 920.0], "max_tokens": 2, "stop_token_ids": [5.0]}, 200, None),
    ("/v1/completions", {"prompt": [[261, 400.0], [1975.0]], "max_tokens": 2}, 200, None),
    # logit_bias keys are decimal token ids, as the schema's pattern says; int() alone also took " 5" and "٥".
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "logit_bias": {" 5": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "logit_bias": {"\u0665": 1}}, 400, "logit_bias"),
    # A token id outside the vocabulary in logit_bias was blamed on the prompt.
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    # More than 16 stop strings (maxItems) counted only the non-empty ones.
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "stop": ["a"] * 16 + [""]}, 400, "stop"),
]


@pytest.mark.parametrize("path,body,status,param", REGRESSIONS,
                         ids=[f"{i}-{r[3]}" for i, r in enumerate(REGRESSIONS)])
def test_regressions(server, path, body, status, param):
    response = httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == status, response.text
    if status >= 400:
        assert response.json()["error"]["param"] == param, response.text
    server.wait_idle()
