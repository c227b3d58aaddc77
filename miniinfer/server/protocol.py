"""OpenAI request bodies -> prompts + :class:`~miniinfer.SamplingParams`, and OpenAI's error object.

Every check names the offending parameter, and every failure is an :class:`APIError` with the status
code and ``{"error": {"message", "type", "param", "code"}}`` body OpenAI uses, so the official client
raises its matching exception (400 ``BadRequestError``, 404 ``NotFoundError``, 503 ``InternalServerError``).
Unknown fields are ignored (as OpenAI and vLLM do), so newer clients keep working.

The end of the module describes the same bodies as JSON Schema, for the server's ``/openapi.json``
(:func:`completion_request_schema`, :func:`chat_request_schema`, :data:`ERROR_SCHEMA`); the parsers stay the
one place where a body is validated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from miniinfer.sampling import MAX_LOGPROBS, SamplingParams

__all__ = ["APIError", "CompletionRequest", "ChatRequest", "parse_completion", "parse_chat", "MAX_N",
           "completion_request_schema", "chat_request_schema", "ERROR_SCHEMA", "COMPLETION_RESPONSE_SCHEMA",
           "CHAT_RESPONSE_SCHEMA"]

MAX_N = 64            # completions per prompt, at most
MAX_PROMPTS = 64      # prompts in one /v1/completions batch, at most
MAX_STOP = 16         # stop strings, at most (OpenAI allows 4; vLLM more)
# The repetition penalty divides positive logits (and multiplies negative ones) in float32: a penalty of 1e-38
# makes them infinite and the request fails with a 500 (found by the schema fuzzer). Bounded on both sides,
# symmetric in log space: 1/2**31 .. 2**31 keeps every logit finite.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 2.0**-31, 2.0**31


class APIError(Exception):
    """An error answered with OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        # A lone surrogate echoed from the request would make the JSON response unencodable: escape it.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class CompletionRequest:
    model: str | None
    prompts: list                      # strings or token-id lists
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None        # completions: top alternatives per token (the int form)
    echo: bool = False
    user: str | None = None
    timeout: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class ChatRequest:
    model: str | None
    messages: list
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False             # chat: logprobs true + top_logprobs N
    top_logprobs: int = 0
    user: str | None = None
    timeout: float | None = None


# -- field readers ----------------------------------------------------------------------------------


def _number(body: dict, name: str, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"'{name}' must be a number, got {type(value).__name__}", name)
    if not math.isfinite(value):
        raise bad(f"'{name}' must be a finite number, got {value}", name)
    if low is not None and (value <= low if low_open else value < low):
        raise bad(f"'{name}' must be {'>' if low_open else '>='} {low}, got {value}", name)
    if high is not None and value > high:
        raise bad(f"'{name}' must be <= {high}, got {value}", name)
    return float(value)


def _is_integer(value) -> bool:
    """An integer as JSON means it: ``3`` or ``3.0`` (JSON Schema's "integer" takes both), never ``true``."""
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


def _token_ids(value) -> list[int] | None:
    """A non-empty list of integers (``3.0`` read as ``3``), else None."""
    if not isinstance(value, list) or not value or not all(_is_integer(t) for t in value):
        return None
    return [int(t) for t in value]


def _integer(body: dict, name: str, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer, got {type(value).__name__}", name)
    if low is not None and value < low:
        raise bad(f"'{name}' must be >= {low}, got {value}", name)
    if high is not None and value > high:
        raise bad(f"'{name}' must be <= {high}, got {value}", name)
    return value


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {type(value).__name__}", name)
    return value


def _string(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad(f"'{name}' must be a string, got {type(value).__name__}", name)
    return value


def _stop(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP:  # counted before empty strings are dropped, as the schema says (maxItems)
        raise bad(f"'stop' may hold at most {MAX_STOP} strings, got {len(stops)}", "stop")
    stops = [s for s in stops if s]  # OpenAI ignores empty stop strings
    return stops or None


def _stream_options(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    if not stream:
        raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    return _boolean(options, "include_usage")


def _sampling(body: dict, defaults: dict, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """The sampling fields shared by both endpoints (OpenAI's plus vLLM's extras)."""
    values = dict(defaults)
    readers = {
        "temperature": lambda: _number(body, "temperature", 0, 2),
        "top_p": lambda: _number(body, "top_p", 0, 1, low_open=True),
        "top_k": lambda: _integer(body, "top_k", -1),
        "min_p": lambda: _number(body, "min_p", 0, 1),
        "presence_penalty": lambda: _number(body, "presence_penalty", -2, 2),
        "frequency_penalty": lambda: _number(body, "frequency_penalty", -2, 2),
        "repetition_penalty": lambda: _number(body, "repetition_penalty", MIN_REPETITION_PENALTY,
                                              MAX_REPETITION_PENALTY),
        "n": lambda: _integer(body, "n", 1, MAX_N),
        "min_tokens": lambda: _integer(body, "min_tokens", 0),
    }
    for name, read in readers.items():
        value = read()
        if value is not None:
            values[name] = value
    seed = _integer(body, "seed", -2**63, 2**64 - 1)
    if seed is not None:
        values["seed"] = seed % 2**64  # OpenAI's seeds are signed 64-bit integers
    stop = _stop(body)
    if stop:
        values["stop"] = stop
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(_is_integer(t) and t >= 0 for t in stop_ids):
            raise bad("'stop_token_ids' must be a list of token ids (integers >= 0)", "stop_token_ids")
        values["stop_token_ids"] = [int(t) for t in stop_ids]
    values["ignore_eos"] = _boolean(body, "ignore_eos")
    values["include_stop_str_in_output"] = _boolean(body, "include_stop_str_in_output")
    values["skip_special_tokens"] = _boolean(body, "skip_special_tokens", True)
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise bad("'logit_bias' must map token ids to numbers in [-100, 100]", "logit_bias")
        parsed = {}
        for key, value in bias.items():
            # Keys are token ids in decimal ("50256"), as OpenAI documents: int() alone would also take " 5",
            # "+5", "1_0" or an Arabic-Indic digit, which the OpenAPI schema (pattern ^[0-9]+$) calls invalid.
            if not (isinstance(key, str) and key.isascii() and key.isdigit()):
                raise bad(f"'logit_bias' keys must be token ids (decimal digits), got {key!r}", "logit_bias")
            token = int(key)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or not -100 <= value <= 100 or token < 0):
                raise bad(f"'logit_bias' maps token ids (>= 0) to numbers in [-100, 100]; got {key!r}: {value!r}",
                          "logit_bias")
            parsed[token] = float(value)
        values["logit_bias"] = parsed or None
    if max_tokens is not None:
        values["max_tokens"] = max_tokens
    values["logprobs"] = logprobs
    if values.get("min_tokens", 0) > values.get("max_tokens", 64):
        raise bad("'min_tokens' must not exceed max_tokens", "min_tokens")
    try:
        return SamplingParams(**values)
    except ValueError as error:  # a rule SamplingParams has and we did not check above
        param = str(error).split(" ")[0].removeprefix("SamplingParams.")
        raise bad(str(error), param) from None


def _common(body: dict) -> tuple[str | None, bool, bool, str | None, float | None]:
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    model = _string(body, "model")
    stream = _boolean(body, "stream")
    include_usage = _stream_options(body, stream)
    user = _string(body, "user")
    timeout = _number(body, "timeout", 0, low_open=True)  # not OpenAI's: a per-request limit (seconds)
    best_of = _integer(body, "best_of", 1)
    if best_of is not None and best_of != body.get("n", 1):
        raise bad("'best_of' is not supported (only best_of == n)", "best_of")
    return model, stream, include_usage, user, timeout


def _max_tokens(body: dict, *names: str) -> int | None:
    """The first of ``names`` that is given; every one of them is checked (a bad ``max_tokens`` beside a good
    ``max_completion_tokens`` is a 400, not silently ignored)."""
    values = [_integer(body, name, 1) for name in names]
    return next((value for value in values if value is not None), None)


def parse_completion(body: dict, defaults: dict) -> CompletionRequest:
    model, stream, include_usage, user, timeout = _common(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("'prompt' is required", "prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif _token_ids(prompt) is not None:
        prompts = [_token_ids(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(_token_ids(p) is not None for p in prompt):
        prompts = [_token_ids(p) for p in prompt]
    else:
        raise bad("'prompt' must be a non-empty string, a list of strings, a list of token ids, or a list of "
                  "token-id lists", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise bad(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", "prompt")
    if any(p == "" for p in prompts):
        raise bad("'prompt' must not be empty", "prompt")
    logprobs = _integer(body, "logprobs", 0, MAX_LOGPROBS)
    echo = _boolean(body, "echo")
    if echo:
        raise bad("'echo' is not supported", "echo")
    if body.get("suffix") is not None:
        raise bad("'suffix' is not supported", "suffix")
    max_tokens = _max_tokens(body, "max_tokens")
    params = _sampling(body, defaults, max_tokens if max_tokens is not None else 16, logprobs)
    return CompletionRequest(model, prompts, params, stream, include_usage, logprobs, echo, user, timeout)


def parse_chat(body: dict, defaults: dict, default_stop: list[str] | None = None) -> ChatRequest:
    model, stream, include_usage, user, timeout = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {'role', 'content'} objects", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"messages[{index}] must be an object", "messages")
        if message.get("role") not in ("system", "developer", "user", "assistant"):
            raise bad(f"messages[{index}].role must be 'system', 'developer', 'user' or 'assistant', got "
                      f"{message.get('role')!r}", "messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages[{index}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{index}].content must be a string", "messages")
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise bad(f"messages[{index}].name must be a string", "messages")
        role = "system" if message["role"] == "developer" else message["role"]
        messages[index] = {"role": role, "content": content, **({"name": name} if name else {})}
    logprobs = _boolean(body, "logprobs")
    top_logprobs = _integer(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    max_tokens = _max_tokens(body, "max_completion_tokens", "max_tokens")
    if body.get("stop") is None and default_stop:
        body = {**body, "stop": default_stop}
    params = _sampling(body, defaults, max_tokens, (top_logprobs or 0) if logprobs else None)
    return ChatRequest(model, messages, params, stream, include_usage, logprobs, top_logprobs or 0, user, timeout)


# -- the OpenAPI description of the request bodies ----------------------------------------------------------
#
# The parsers above are the one source of validation: FastAPI never validates these bodies (the handlers read
# the raw request). The JSON schemas below only *describe* what the parsers accept, for /openapi.json, the
# /docs page, client generators and the schema fuzzing test (tests/test_server_schema_fuzz.py). They are
# honest in one direction that the fuzzer checks: a body the schema calls invalid is always refused with a
# 4xx. Rules that JSON Schema cannot say (the prompt's length in tokens plus max_tokens must fit the context,
# min_tokens <= max_tokens, top_logprobs needs logprobs, stream_options needs stream, best_of == n, text
# without lone surrogates) are in the descriptions: a body the schema accepts can still get a 400 for them.


def _nullable(schema: dict) -> dict:
    """Optional fields may also be ``null``: the parsers read ``null`` as "not given" (as OpenAI does)."""
    return {"anyOf": [schema, {"type": "null"}]}


def _sampling_schema(model_name: str, max_model_len: int, vocab_size: int, max_n: int) -> dict:
    """The sampling fields both endpoints share (OpenAI's and vLLM's), as JSON Schema properties."""
    token_id = {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}
    max_tokens = {"type": "integer", "minimum": 1, "maximum": max_model_len - 1,
                  "description": "tokens to generate at most; the prompt's tokens plus max_tokens must fit "
                                 f"in the context ({max_model_len} tokens)"}
    return {
        # Any other name is a 404 (model_not_found): the schema names the one this server serves.
        "model": _nullable({"type": "string", "enum": [model_name], "description": "see GET /v1/models"}),
        "max_tokens": _nullable(max_tokens),
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "top_k": _nullable({"type": "integer", "minimum": -1, "description": "0 or -1: off"}),
        "min_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
        "presence_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
        "frequency_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
        "repetition_penalty": _nullable({"type": "number", "minimum": MIN_REPETITION_PENALTY,
                                         "maximum": MAX_REPETITION_PENALTY, "description": "1: off"}),
        "n": _nullable({"type": "integer", "minimum": 1, "maximum": max_n,
                        "description": "completions per prompt"}),
        "min_tokens": _nullable({"type": "integer", "minimum": 0, "description": "at most max_tokens"}),
        "seed": _nullable({"type": "integer", "minimum": -2**63, "maximum": 2**64 - 1}),
        "stop": _nullable({"anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP}],
            "description": f"up to {MAX_STOP} stop strings (empty ones are ignored)"}),
        "stop_token_ids": _nullable({"type": "array", "items": token_id}),
        "ignore_eos": _nullable({"type": "boolean"}),
        "include_stop_str_in_output": _nullable({"type": "boolean"}),
        "skip_special_tokens": _nullable({"type": "boolean"}),
        "logit_bias": _nullable({"type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
                                 "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                                 "description": "token id (a decimal string) -> bias added to its logit"}),
        "stream": _nullable({"type": "boolean"}),
        "stream_options": _nullable({"type": "object", "properties": {
            "include_usage": _nullable({"type": "boolean"})}, "description": "only with stream: true"}),
        "user": _nullable({"type": "string"}),
        "timeout": _nullable({"type": "number", "exclusiveMinimum": 0,
                              "description": "not OpenAI's: seconds this request may take (504 after)"}),
        "best_of": _nullable({"type": "integer", "minimum": 1, "maximum": max_n,
                              "description": "only best_of == n is supported"}),
    }


def completion_request_schema(model_name: str, max_model_len: int, vocab_size: int,
                              max_n: int = MAX_N) -> dict:
    """JSON Schema of a POST /v1/completions body (what :func:`parse_completion` accepts)."""
    token_ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0,
                                                            "maximum": vocab_size - 1}}
    prompt = {"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS,
         "items": {"type": "string", "minLength": 1}},
        token_ids,
        {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS, "items": token_ids},
    ], "description": f"a prompt (text or token ids) or a batch of up to {MAX_PROMPTS}; each must leave room "
                      "in the context for max_tokens"}
    properties = {"prompt": prompt, **_sampling_schema(model_name, max_model_len, vocab_size, max_n)}
    properties["max_tokens"] = {**properties["max_tokens"], "default": 16}
    properties["logprobs"] = _nullable({"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS,
                                        "description": "also return this many most likely tokens per token"})
    properties["echo"] = _nullable({"const": False, "description": "not supported"})
    properties["suffix"] = {"type": "null", "description": "not supported"}
    return {"type": "object", "title": "CompletionRequest", "required": ["prompt"], "properties": properties,
            "additionalProperties": True,
            "description": "Unknown fields are ignored (as OpenAI and vLLM do)."}


def chat_request_schema(model_name: str, max_model_len: int, vocab_size: int,
                        max_n: int = MAX_N) -> dict:
    """JSON Schema of a POST /v1/chat/completions body (what :func:`parse_chat` accepts)."""
    text_part = {"type": "object", "required": ["type", "text"],
                 "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": text_part}]},
        "name": _nullable({"type": "string"})}}
    properties = {"messages": {"type": "array", "minItems": 1, "items": message,
                               "description": "the conversation (the chat template must render it)"},
                  **_sampling_schema(model_name, max_model_len, vocab_size, max_n)}
    properties["max_completion_tokens"] = {**properties["max_tokens"],
                                           "description": "the newer name of max_tokens (wins over it)"}
    properties["logprobs"] = _nullable({"type": "boolean"})
    properties["top_logprobs"] = _nullable({"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS,
                                            "description": "needs logprobs: true"})
    return {"type": "object", "title": "ChatCompletionRequest", "required": ["messages"],
            "properties": properties, "additionalProperties": True,
            "description": "Unknown fields are ignored (as OpenAI and vLLM do)."}


ERROR_SCHEMA = {
    "type": "object", "title": "ErrorResponse", "required": ["error"],
    "description": "OpenAI's error object: every 4xx and 5xx answer carries one.",
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string",
                     "examples": ["invalid_request_error", "server_error", "timeout_error"]},
            "param": {"type": ["string", "null"], "description": "the offending request field, if one"},
            "code": {"type": ["string", "null"], "examples": ["context_length_exceeded", "model_not_found",
                                                             "overloaded"]}}}},
}

_COUNT = {"type": "integer", "minimum": 0}
_USAGE_SCHEMA = {
    "type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {"prompt_tokens": _COUNT, "completion_tokens": _COUNT, "total_tokens": _COUNT,
                   "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": _COUNT}}}}


def _response_schema(title: str, object_name: str, choice: dict) -> dict:
    choice = {"type": "object", "required": ["index", "finish_reason"], "properties": {
        "index": {"type": "integer", "minimum": 0}, "logprobs": {"type": ["object", "null"]},
        "finish_reason": {"type": ["string", "null"], "examples": ["stop", "length"]}, **choice}}
    return {"type": "object", "title": title,
            "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {"id": {"type": "string"}, "object": {"const": object_name},
                           "created": {"type": "integer"}, "model": {"type": "string"},
                           "choices": {"type": "array", "items": choice}, "usage": _USAGE_SCHEMA}}


COMPLETION_RESPONSE_SCHEMA = _response_schema("CompletionResponse", "text_completion",
                                              {"text": {"type": "string"}})
CHAT_RESPONSE_SCHEMA = _response_schema("ChatCompletionResponse", "chat.completion", {"message": {
    "type": "object", "required": ["role", "content"],
    "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}}})
