"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, models, health, metrics.

Each handler parses and validates the body (:mod:`miniinfer.server.protocol`), tokenizes, checks the
context, submits one engine request per prompt to the :class:`~miniinfer.server.async_engine.AsyncEngine`,
and then either waits for the finished outputs or streams them as server-sent events (SSE)::

    data: {"id": "cmpl-…", "object": "text_completion", "choices": [{"index": 0, "text": " my", …}]}\\n\\n
    …
    data: [DONE]\\n\\n

The handler never blocks the event loop on the engine: it awaits its requests' queues. When the
client goes away (a dropped stream, a closed socket while waiting) the handler is cancelled or notices,
and its requests are aborted, which frees their KV blocks at the engine's next iteration.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from miniinfer.server.async_engine import AsyncEngine, EngineStopped, QueueFull, RequestStream, RequestTimeout
from miniinfer.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from miniinfer.server.protocol import (
    CHAT_RESPONSE_SCHEMA,
    COMPLETION_RESPONSE_SCHEMA,
    ERROR_SCHEMA,
    MAX_N,
    APIError,
    bad,
    chat_request_schema,
    completion_request_schema,
    parse_chat,
    parse_completion,
)
from miniinfer.server.sse import format_sse
from miniinfer.server.tracing import TraceContext, Tracer, parse_traceparent, random_hex

__all__ = ["ServerState", "create_app"]

log = logging.getLogger("miniinfer.server.access")
MAX_BODY_BYTES = 8 * 2**20


@dataclass
class ServerState:
    """Everything the handlers share: the engine bridge, the tokenizer, names, defaults, metrics."""

    engine: AsyncEngine
    tokenizer: object
    model_name: str
    max_model_len: int
    defaults: dict = field(default_factory=dict)        # generation_config.json's sampling defaults
    chat_stop: list[str] | None = None                  # default stop strings for chat (bundled models)
    metrics: ServerMetrics | None = None
    tracer: Tracer = field(default_factory=Tracer)
    created: int = field(default_factory=lambda: int(time.time()))
    shutdown_drain_timeout: float = 0.0
    format_sse: Callable[[str], str] = format_sse          # how one SSE event is written (chapter 13's seam)
    grpc_address: tuple[str, int] | None = None         # (host, port): serve gRPC beside HTTP
    grpc_port: int | None = None                        # the bound gRPC port, once started


# -- helpers ----------------------------------------------------------------------------------------


async def _read_json(request: Request) -> dict:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is {length} bytes, more than the {MAX_BODY_BYTES} allowed",
                       code="request_too_large")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is more than {MAX_BODY_BYTES} bytes", code="request_too_large")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        kind = request.headers.get("content-type", "none")
        raise bad(f"the request body is not valid JSON ({error}); send a JSON object with "
                  f"Content-Type: application/json (got Content-Type: {kind})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(404, f"The model '{model:.200}' does not exist. This server serves '{state.model_name}' "
                            "(GET /v1/models).", param="model", code="model_not_found")


def _tokenize(state: ServerState, prompt, param: str) -> list[int]:
    if isinstance(prompt, list):
        return list(prompt)
    from miniinfer.tokenizer import check_text

    try:
        check_text(prompt)
    except ValueError as error:
        raise bad(str(error), param) from None
    return state.tokenizer.encode(prompt)


def _check_length(state: ServerState, token_ids: list[int], params, param: str, max_tokens_given: bool):
    """OpenAI's and vLLM's rule: prompt + max_tokens must fit in the context (400 otherwise).
    Returns the params, with ``max_tokens`` set to what is left of the context when none was given."""
    limit = state.max_model_len
    if len(token_ids) >= limit:
        raise bad(f"This model's maximum context length is {limit} tokens. However, your prompt has "
                  f"{len(token_ids)} tokens (at least one must be left to generate).", param,
                  code="context_length_exceeded")
    if not max_tokens_given:
        return replace(params, max_tokens=limit - len(token_ids), min_tokens=min(params.min_tokens,
                                                                                 limit - len(token_ids)))
    if len(token_ids) + params.max_tokens > limit:
        raise bad(f"This model's maximum context length is {limit} tokens. However, you requested "
                  f"{len(token_ids) + params.max_tokens} tokens ({len(token_ids)} in the prompt, "
                  f"{params.max_tokens} in the completion). Reduce the prompt or max_tokens.",
                  "max_tokens", code="context_length_exceeded")
    return params


async def _submit_all(state: ServerState, prompts: list[list[int]], params, request_id: str,
                      timeout: float | None) -> list[RequestStream]:
    streams: list[RequestStream] = []
    try:
        for index, token_ids in enumerate(prompts):
            streams.append(await state.engine.submit(token_ids, params, request_id=f"{request_id}-{index}",
                                                     timeout=timeout))
    except QueueFull as error:
        _abort(streams)
        if state.metrics is not None:
            state.metrics.rejected.inc()
        raise APIError(503, str(error), code="overloaded", headers={"Retry-After": str(error.retry_after)}) from None
    except EngineStopped as error:
        _abort(streams)
        raise APIError(503, str(error), code="shutting_down", headers={"Retry-After": "5"}) from None
    except ValueError as error:  # the engine's own checks: a sampling parameter, or the prompt
        _abort(streams)
        message = str(error)
        param = "n" if message.startswith("n=") else "prompt"
        if message.startswith("SamplingParams."):  # "SamplingParams.logit_bias names token 99999, ..."
            param = message.split(" ")[0].removeprefix("SamplingParams.")
        raise bad(message, param) from None
    except BaseException:
        _abort(streams)
        raise
    return streams


def _abort(streams) -> None:
    for stream in streams:
        stream.abort()


@lru_cache(maxsize=65536)
def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _top(entry: dict[int, float], count: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda item: -item[1])[:count]


def _completion_logprobs(tokenizer, token_ids, entries, top: int, text_offset: int) -> dict:
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        text = _token_text(tokenizer, token_id)
        tokens.append(text)
        token_logprobs.append(entry.get(token_id))
        top_logprobs.append({_token_text(tokenizer, t): lp for t, lp in _top(entry, top)})
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def _chat_logprobs(tokenizer, token_ids, entries, top: int) -> dict:
    content = []
    for token_id, entry in zip(token_ids, entries):
        text = _token_text(tokenizer, token_id)
        content.append({"token": text, "logprob": entry.get(token_id), "bytes": list(text.encode()),
                        "top_logprobs": [{"token": (t_text := _token_text(tokenizer, t)), "logprob": lp,
                                          "bytes": list(t_text.encode())} for t, lp in _top(entry, top)]})
    return {"content": content}


def _finish_reason(completion) -> str | None:
    return completion.finish_reason


def _check_failed(outputs) -> None:
    for output in outputs:
        for completion in output.outputs:
            if completion.finish_reason == "error":
                raise APIError(500, f"generation failed: {completion.error or 'the engine reported an error'}",
                               code="generation_failed")


def _usage(outputs) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def _collect(streams: list[RequestStream], request: Request) -> list:
    """Wait for every stream's final output; abort all of them if the client disconnects first."""
    async def final(stream):
        async for _ in stream:
            pass
        return stream.final

    gather = asyncio.ensure_future(asyncio.gather(*(final(s) for s in streams)))
    disconnect = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({gather, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        if gather in done:
            return gather.result()
        raise asyncio.CancelledError("client disconnected")
    finally:
        disconnect.cancel()
        if not gather.done():
            gather.cancel()
        _abort(streams)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, object]]:
    """Outputs of several streams as they come: ``(stream index, RequestOutput)``."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index, stream):
        try:
            async for output in stream:
                await queue.put((index, output))
            await queue.put((index, None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, error))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        _abort(streams)


def _sse(state: ServerState, payload) -> str:
    """One SSE event: a JSON payload, or the final ``[DONE]``."""
    return state.format_sse(payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False))


# -- the OpenAPI description -----------------------------------------------------------------------------
#
# The handlers take the raw Request and validate bodies in protocol.py, so FastAPI cannot infer the request
# bodies: without the lines below /openapi.json would show POST /v1/completions with no body at all. The
# schemas are written by hand in protocol.py and attached here; they describe, they do not validate.


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(name: str) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _ref(name)}}}}


def _errors(*statuses: int) -> dict:
    reasons = {400: "Invalid request (the error's param names the field)", 404: "Unknown model",
               413: "Request body too large", 500: "Internal error, or this request's generation failed",
               503: "Overloaded (see Retry-After) or shutting down", 504: "The request's timeout ran out"}
    error = {"application/json": {"schema": _ref("ErrorResponse")}}
    return {status: {"description": reasons[status], "content": error} for status in statuses}


# One server-sent event of a stream (each event is described on its own, as schemathesis validates them):
# a JSON chunk, an error object, or the final "[DONE]".
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "event": {"const": "message"},
    "data": {"type": "string", "description": "a JSON chunk, or [DONE] at the end"}}}


def _generation_responses(response_schema: str, chunk_object: str) -> dict:
    return {200: {"description": f"The whole answer, or with stream: true server-sent events of "
                                 f"{chunk_object} chunks ending in 'data: [DONE]'",
                  "content": {"application/json": {"schema": _ref(response_schema)},
                              "text/event-stream": {"schema": _SSE_EVENT}}},
            **_errors(400, 404, 413, 500, 503, 504)}


def _openapi_components(state: ServerState) -> dict:
    """The hand-written schemas, with this server's limits (context, vocabulary, sequences per step)."""
    engine = getattr(state.engine, "engine", None)
    vocab_size = getattr(getattr(getattr(engine, "model", None), "config", None), "vocab_size", None) or 2**31
    max_num_seqs = getattr(getattr(engine, "config", None), "max_num_seqs", None) or MAX_N
    limits = dict(model_name=state.model_name, max_model_len=state.max_model_len, vocab_size=vocab_size,
                  max_n=min(MAX_N, max_num_seqs))  # n > max_num_seqs is refused: the n sequences run at once
    return {"CompletionRequest": completion_request_schema(**limits),
            "ChatCompletionRequest": chat_request_schema(**limits),
            "CompletionResponse": COMPLETION_RESPONSE_SCHEMA, "ChatCompletionResponse": CHAT_RESPONSE_SCHEMA,
            "ErrorResponse": ERROR_SCHEMA}


# -- the app ----------------------------------------------------------------------------------------


def create_app(state: ServerState) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        state.engine.start()
        log.info("engine started", extra={"fields": {"model": state.model_name}})
        grpc_server = None
        if state.grpc_address is not None:
            from miniinfer.server.grpc_server import start_grpc_server

            grpc_server, health, state.grpc_port = await start_grpc_server(state, *state.grpc_address)
        yield
        if grpc_server is not None:
            await health.enter_graceful_shutdown()
            await grpc_server.stop(grace=5.0)  # uvicorn has drained HTTP already; in-flight gRPC calls get 5 s
        await state.engine.shutdown(drain_timeout=state.shutdown_drain_timeout)
        log.info("engine stopped")

    app = FastAPI(title="MiniInfer", version="0.1.0", lifespan=lifespan, **_without_native_telemetry())
    app.state.server = state
    app.add_middleware(_TraceMiddleware, metrics=state.metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return JSONResponse(APIError(error.status_code, str(error.detail)).body(), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("internal error", extra={"fields": {"route": request.url.path}})
        return JSONResponse(APIError(500, f"internal error: {type(error).__name__}: {error}").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        if not state.engine.is_running:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        if state.metrics is None:
            raise APIError(404, "metrics are off")
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/debug/engine")
    async def debug_engine():
        """The engine thread's latest stats (KV blocks, queue, counters): for tests and operators."""
        engine = state.engine
        stats = dict(engine.stats_snapshot)
        stats["num_in_flight"] = engine.num_in_flight
        stats["num_waiting_total"] = engine.num_waiting
        # Counted on the event loop, possibly after the snapshot (which the engine-process mode refreshes
        # only when the child writes): read them now.
        stats["num_merged_outputs"] = engine.num_merged_outputs
        if "pump_seconds" in stats:
            stats["pump_seconds"] = engine.pump_seconds
        return stats

    def model_card():
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "miniinfer",
                "max_model_len": state.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", responses=_errors(404))
    async def model(model_id: str):
        _check_model(state, model_id)
        return model_card()

    @app.post("/v1/completions", openapi_extra=_json_body("CompletionRequest"),
              responses=_generation_responses("CompletionResponse", "text_completion"))
    async def completions(request: Request):
        body = await _read_json(request)
        parsed = parse_completion(body, state.defaults)
        _check_model(state, parsed.model)
        prompts = [_tokenize(state, p, "prompt") for p in parsed.prompts]
        params = parsed.params  # max_tokens is always set for completions (OpenAI's default: 16)
        for token_ids in prompts:
            _check_length(state, token_ids, params, "prompt", max_tokens_given=True)
        request_id = f"cmpl-{random_hex(128)}"
        streams = await _submit_all(state, prompts, params, request_id, parsed.timeout)
        context: TraceContext = request.state.trace
        meta = dict(route="/v1/completions", user=parsed.user, stream=parsed.stream)
        if parsed.stream:
            events = (_plain_events(state, parsed, streams[0], request_id, chat=False)
                      if len(streams) == 1 and parsed.params.n == 1 and parsed.logprobs is None
                      else _completion_events(state, parsed, streams, request_id))
            return _streaming_response(state, events, streams, request_id, context, meta)
        outputs = await _finish(state, streams, request, request_id, context, meta)
        n, top = params.n, parsed.logprobs
        choices = []
        for prompt_index, output in enumerate(outputs):
            for completion in output.outputs:
                logprobs = None
                if top is not None and completion.logprobs is not None:
                    logprobs = _completion_logprobs(state.tokenizer, completion.token_ids, completion.logprobs, top, 0)
                choices.append({"index": prompt_index * n + completion.index, "text": completion.text,
                                "logprobs": logprobs, "finish_reason": _finish_reason(completion)})
        return {"id": request_id, "object": "text_completion", "created": int(time.time()),
                "model": state.model_name, "choices": choices, "usage": _usage(outputs)}

    @app.post("/v1/chat/completions", openapi_extra=_json_body("ChatCompletionRequest"),
              responses=_generation_responses("ChatCompletionResponse", "chat.completion.chunk"))
    async def chat_completions(request: Request):
        body = await _read_json(request)
        parsed = parse_chat(body, state.defaults, default_stop=state.chat_stop)
        _check_model(state, parsed.model)
        try:
            prompt = state.tokenizer.apply_chat_template(parsed.messages, add_generation_prompt=True)
        except Exception as error:  # noqa: BLE001 - the template refuses these messages
            raise bad(f"the chat template could not render these messages: {error}", "messages") from None
        token_ids = _tokenize(state, prompt, "messages")
        given = body.get("max_completion_tokens") is not None or body.get("max_tokens") is not None
        params = _check_length(state, token_ids, parsed.params, "messages", max_tokens_given=given)
        request_id = f"chatcmpl-{random_hex(128)}"
        streams = await _submit_all(state, [token_ids], params, request_id, parsed.timeout)
        context: TraceContext = request.state.trace
        meta = dict(route="/v1/chat/completions", user=parsed.user, stream=parsed.stream)
        if parsed.stream:
            events = (_plain_events(state, parsed, streams[0], request_id, chat=True)
                      if parsed.params.n == 1 and not parsed.logprobs
                      else _chat_events(state, parsed, streams, request_id))
            return _streaming_response(state, events, streams, request_id, context, meta)
        outputs = await _finish(state, streams, request, request_id, context, meta)
        choices = []
        for completion in outputs[0].outputs:
            logprobs = None
            if parsed.logprobs and completion.logprobs is not None:
                logprobs = _chat_logprobs(state.tokenizer, completion.token_ids, completion.logprobs,
                                          parsed.top_logprobs)
            choices.append({"index": completion.index, "message": {"role": "assistant", "content": completion.text},
                            "logprobs": logprobs, "finish_reason": _finish_reason(completion)})
        return {"id": request_id, "object": "chat.completion", "created": int(time.time()),
                "model": state.model_name, "choices": choices, "usage": _usage(outputs)}

    default_openapi = app.openapi

    def openapi() -> dict:
        """FastAPI's generated schema plus our hand-written components (built once, then cached)."""
        if app.openapi_schema is None:
            schema = default_openapi()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(_openapi_components(state))
        return app.openapi_schema

    app.openapi = openapi
    return app


_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models"}


def _without_native_telemetry() -> dict:
    """FastAPI's own OpenTelemetry instrumentation (FastAPI 0.165 on), switched off where it exists.

    The server's spans are its own (:mod:`miniinfer.server.tracing`: queue, prefill and decode under the
    caller's ``traceparent``). FastAPI's would add a second span per request wherever an OpenTelemetry
    provider is configured, and even where none is it asks, for every request, whether one is: three
    provider lookups, each an ``os.environ`` miss (py-spy of the server process on an H200 at saturation
    put ~5 % of its samples under them, ``serving_h200_profile_2048.json``; on this CPU, switching it off
    saved ~3 % of the server's CPU per request)."""
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    return {}


class _TraceMiddleware:
    """Plain ASGI middleware (no BaseHTTPMiddleware: it must not get between a stream and its disconnect):
    reads ``traceparent``, stores the context for the handler, answers with our ``traceparent``, and
    counts responses by route and status."""

    def __init__(self, app, metrics: ServerMetrics | None):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        context = parse_traceparent(headers.get(b"traceparent", b"").decode("latin-1"))
        scope.setdefault("state", {})["trace"] = context
        path = scope.get("path", "")

        async def send_with_trace(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [
                    (b"traceparent", context.traceparent.encode())]
                if self.metrics is not None and path.startswith("/v1/"):
                    route = path if path in _ROUTES else "other"
                    self.metrics.http_requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, send_with_trace)


async def _finish(state: ServerState, streams, request: Request, request_id: str, context: TraceContext,
                  meta: dict) -> list:
    status = 200
    try:
        outputs = await _collect(streams, request)
        _check_failed(outputs)
        return outputs
    except RequestTimeout as error:
        status = 504
        raise APIError(504, str(error), code="timeout", type="timeout_error") from None
    except asyncio.CancelledError:
        status = 499  # client closed the request (nginx's code), for the log only
        raise
    except APIError as error:
        status = error.status
        raise
    finally:
        _log_request(state, streams, request_id, context, meta, status)


def _log_request(state: ServerState, streams, request_id: str, context: TraceContext, meta: dict,
                 status: int) -> None:
    timings = [s.timing for s in streams]
    finals = [s.final for s in streams]
    reasons = sorted({c.finish_reason or "abort" for f in finals if f is not None for c in f.outputs}) or ["abort"]
    first = [t.ttft for t in timings if t.ttft is not None]
    queue = [t.queue_time for t in timings if t.queue_time is not None]
    fields = dict(request_id=request_id, trace_id=context.trace_id, span_id=context.span_id, status=status,
                  **meta, prompt_tokens=sum(t.num_prompt_tokens for t in timings),
                  completion_tokens=sum(t.num_generated_tokens for t in timings),
                  cached_tokens=sum(t.num_cached_tokens for t in timings),
                  queue_s=round(max(queue), 6) if queue else None, ttft_s=round(max(first), 6) if first else None,
                  e2e_s=round(time.perf_counter() - min(t.arrival for t in timings), 6) if timings else None,
                  finish_reason=",".join(reasons))
    log.info("request finished", extra={"fields": fields})
    if state.tracer.enabled:
        for stream in streams:
            state.tracer.record(context, meta["route"], stream.timing,
                                {"miniinfer.request_id": stream.request_id, "http.status_code": status,
                                 "gen_ai.usage.input_tokens": stream.timing.num_prompt_tokens,
                                 "gen_ai.usage.output_tokens": stream.timing.num_generated_tokens})


class _EventStreamResponse(StreamingResponse):
    """Starlette's StreamingResponse, watching for the client's disconnect with one plain asyncio task.

    Under an ASGI server of spec 2.3 (uvicorn's HTTP protocols) StreamingResponse runs each response in
    an anyio task group of two tasks, so that a disconnect can cancel the stream. Profiles of the server
    process at saturation pointed at that group (its cancel scopes and task states), on an H200 and on
    this CPU; without it, a short streamed request costs the server ~20 % less CPU here (~340 against
    ~425 µs for 2 tokens). Here the stream runs in the request's own task, and a watcher task waits for
    ``http.disconnect``: then it calls ``on_disconnect`` (which aborts the engine's streams: their final
    outputs end the body at the next step, and the server drops writes to a closed connection) instead
    of cancelling anything. A server of spec 2.4 raises OSError from ``send`` instead: that ends the
    response as Starlette's would (ClientDisconnect)."""

    def __init__(self, content, on_disconnect: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self.on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            self.on_disconnect()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await self.stream_response(send)
        except OSError:
            self.on_disconnect()
            raise ClientDisconnect() from None
        finally:
            watcher.cancel()


def _streaming_response(state: ServerState, events: AsyncIterator[str], streams, request_id: str,
                        context: TraceContext, meta: dict) -> StreamingResponse:
    gone = False  # the client disconnected

    def on_disconnect():
        nonlocal gone
        gone = True
        _abort(streams)

    async def body():
        status = 200
        try:
            async for event in events:
                yield event
        except RequestTimeout as error:
            status = 504
            yield _sse(state, APIError(504, str(error), code="timeout", type="timeout_error").body())
            yield _sse(state, "[DONE]")
        except APIError as error:
            status = error.status
            yield _sse(state, error.body())
            yield _sse(state, "[DONE]")
        except (EngineStopped, RuntimeError) as error:
            status = 503 if isinstance(error, EngineStopped) else 500
            yield _sse(state, APIError(status, str(error)).body())
            yield _sse(state, "[DONE]")
        except BaseException:
            status = 499  # the stream was cancelled (e.g. at shutdown)
            raise
        finally:
            _abort(streams)
            _log_request(state, streams, request_id, context, meta, 499 if gone else status)

    return _EventStreamResponse(body(), on_disconnect, media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                         "X-Request-Id": request_id})


async def _completion_events(state: ServerState, parsed, streams, request_id: str) -> AsyncIterator[str]:
    created, n, top = int(time.time()), parsed.params.n, parsed.logprobs
    finals: dict[int, object] = {}
    offsets: dict[tuple[int, int], int] = {}
    usage_field = {"usage": None} if parsed.include_usage else {}
    ended: set[tuple[int, int]] = set()  # choices whose finish_reason went out already
    async for prompt_index, output in _merge(streams):
        choices = []
        for completion in output.outputs:
            if (prompt_index, completion.index) in ended or (
                    not completion.new_text and not completion.new_token_ids and not completion.finished):
                continue
            if completion.finished:
                ended.add((prompt_index, completion.index))
            logprobs = None
            if top is not None and completion.logprobs is not None:
                new = len(completion.new_token_ids)
                key = (prompt_index, completion.index)
                logprobs = _completion_logprobs(state.tokenizer, completion.new_token_ids,
                                                completion.logprobs[len(completion.logprobs) - new:] if new else [],
                                                top, offsets.get(key, 0))
                offsets[key] = offsets.get(key, 0) + len(completion.new_text)
            choices.append({"index": prompt_index * n + completion.index, "text": completion.new_text,
                            "logprobs": logprobs, "finish_reason": completion.finish_reason})
        if output.finished:
            _check_failed([output])
            finals[prompt_index] = output
        if choices:
            yield _sse(state, {"id": request_id, "object": "text_completion", "created": created,
                        "model": state.model_name, "choices": choices, **usage_field})
    if parsed.include_usage:
        yield _sse(state, {"id": request_id, "object": "text_completion", "created": created, "model": state.model_name,
                    "choices": [], "usage": _usage([finals[i] for i in sorted(finals)])})
    yield _sse(state, "[DONE]")


async def _chat_events(state: ServerState, parsed, streams, request_id: str) -> AsyncIterator[str]:
    created = int(time.time())
    usage_field = {"usage": None} if parsed.include_usage else {}

    def chunk(choices):
        return _sse(state, {"id": request_id, "object": "chat.completion.chunk", "created": created,
                     "model": state.model_name, "choices": choices, **usage_field})

    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None} for i in range(parsed.params.n)])
    final = None
    ended: set[int] = set()  # choices whose finish_reason went out already
    async for _, output in _merge(streams):
        choices = []
        for completion in output.outputs:
            if completion.index in ended or (
                    not completion.new_text and not completion.new_token_ids and not completion.finished):
                continue
            if completion.finished:
                ended.add(completion.index)
            logprobs = None
            if parsed.logprobs and completion.logprobs is not None:
                new = len(completion.new_token_ids)
                logprobs = _chat_logprobs(state.tokenizer, completion.new_token_ids,
                                          completion.logprobs[len(completion.logprobs) - new:] if new else [],
                                          parsed.top_logprobs)
            delta = {"content": completion.new_text} if completion.new_text or not completion.finished else {}
            choices.append({"index": completion.index, "delta": delta, "logprobs": logprobs,
                            "finish_reason": completion.finish_reason})
        if output.finished:
            _check_failed([output])
            final = output
        if choices:
            yield chunk(choices)
    if parsed.include_usage and final is not None:
        yield _sse(state, {"id": request_id, "object": "chat.completion.chunk", "created": created,
                    "model": state.model_name, "choices": [], "usage": _usage([final])})
    yield _sse(state, "[DONE]")


# -- the common streams, with less work per token ------------------------------------------------------------
#
# Most streamed requests have one prompt, one completion and no logprobs. For them every event is the same
# JSON object but for the new text and the finish reason, so it is written from a template: the fixed parts
# are encoded once per request, the text with one json.dumps of a string, instead of building two dicts and
# encoding the nested object for every token. The bytes are the same as json.dumps of the whole chunk
# (tests/test_server_sse_fast.py checks it), and the stream is read directly, without _merge's relay.


class _ChunkTemplate:
    """``json.dumps({...fixed fields..., "choices": [{"index": 0, <key>: VALUE, "logprobs": null,
    "finish_reason": REASON}], ...trailer})`` for any VALUE and REASON, without building the dicts."""

    def __init__(self, fixed: dict, key: str, trailer: dict):
        self.head = json.dumps(fixed, ensure_ascii=False)[:-1] + f', "choices": [{{"index": 0, "{key}": '
        trailer_text = json.dumps(trailer, ensure_ascii=False)[1:-1]
        self.end = "}]" + (", " + trailer_text if trailer_text else "") + "}"
        self.running = ', "logprobs": null, "finish_reason": null' + self.end

    def __call__(self, value: str, reason: str | None = None) -> str:
        tail = self.running if reason is None else (', "logprobs": null, "finish_reason": '
                                                    + json.dumps(reason, ensure_ascii=False) + self.end)
        return self.head + value + tail


async def _plain_events(state: ServerState, parsed, stream: RequestStream, request_id: str,
                       chat: bool) -> AsyncIterator[str]:
    """:func:`_completion_events` (one prompt) or :func:`_chat_events` for n = 1 without logprobs: the
    same events, each chunk filled into a JSON template instead of built and encoded as a dict."""
    created = int(time.time())
    fixed = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
             "created": created, "model": state.model_name}
    template = _ChunkTemplate(fixed, "delta" if chat else "text", {"usage": None} if parsed.include_usage else {})
    format_event, dumps = state.format_sse, json.dumps
    if chat:
        yield format_event(template('{"role": "assistant", "content": ""}'))
    final, ended = None, False
    async for output in stream:
        completion = output.outputs[0]
        reason = completion.finish_reason
        if output.finished:
            _check_failed([output])
            final = output
        if ended:
            continue
        new_text = completion.new_text
        if new_text or completion.new_token_ids or reason is not None:
            if not chat:
                piece = dumps(new_text, ensure_ascii=False)
            elif new_text or reason is None:
                piece = '{"content": ' + dumps(new_text, ensure_ascii=False) + "}"
            else:
                piece = "{}"
            yield format_event(template(piece, reason))
        ended = reason is not None  # its finish_reason went out: nothing more of it is streamed
    if parsed.include_usage and (final is not None or not chat):
        yield _sse(state, {**fixed, "choices": [], "usage": _usage([final] if final is not None else [])})
    yield _sse(state, "[DONE]")
