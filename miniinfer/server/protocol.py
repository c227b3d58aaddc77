"""OpenAI request bodies -> prompts + :class:`~miniinfer.SamplingParams`, and OpenAI's error object.

Every check names the offending parameter, and every failure is an :class:`APIError` with the status
code and ``{"error": {"message", "type", "param", "code"}}`` body OpenAI uses, so the official client
raises its matching exception (400 ``BadRequestError``, 404 ``NotFoundError``, 503 ``InternalServerError``).
Unknown fields are ignored (as OpenAI and vLLM do), so newer clients keep working.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from miniinfer.sampling import MAX_LOGPROBS, SamplingParams

__all__ = ["APIError", "CompletionRequest", "ChatRequest", "parse_completion", "parse_chat", "MAX_N"]

MAX_N = 64            # completions per prompt, at most
MAX_PROMPTS = 64      # prompts in one /v1/completions batch, at most
MAX_STOP = 16         # stop strings, at most (OpenAI allows 4; vLLM more)


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
    stops = [s for s in stops if s]  # OpenAI ignores empty stop strings
    if len(stops) > MAX_STOP:
        raise bad(f"'stop' may hold at most {MAX_STOP} strings, got {len(stops)}", "stop")
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
        "repetition_penalty": lambda: _number(body, "repetition_penalty", 0, 2**31, low_open=True),
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
        if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                     for t in stop_ids):
            raise bad("'stop_token_ids' must be a list of token ids (integers >= 0)", "stop_token_ids")
        values["stop_token_ids"] = stop_ids
    values["ignore_eos"] = _boolean(body, "ignore_eos")
    values["include_stop_str_in_output"] = _boolean(body, "include_stop_str_in_output")
    values["skip_special_tokens"] = _boolean(body, "skip_special_tokens", True)
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise bad("'logit_bias' must map token ids to numbers in [-100, 100]", "logit_bias")
        parsed = {}
        for key, value in bias.items():
            try:
                token = int(key)
            except (TypeError, ValueError):
                raise bad(f"'logit_bias' keys must be token ids, got {key!r}", "logit_bias") from None
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
    for name in names:
        value = _integer(body, name, 1)
        if value is not None:
            return value
    return None


def parse_completion(body: dict, defaults: dict) -> CompletionRequest:
    model, stream, include_usage, user, timeout = _common(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("'prompt' is required", "prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
            for p in prompt):
        prompts = list(prompt)
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
