"""gRPC beside HTTP: ``miniinfer.v1.Generator`` (unary ``Generate``, server-streaming ``GenerateStream``)
and the standard ``grpc.health.v1.Health`` service, on the same engine and event loop as the HTTP API.

The server is ``grpc.aio``: it runs on uvicorn's event loop (started and stopped in the app's
lifespan), so gRPC requests go through the same :class:`~miniinfer.server.async_engine.AsyncEngine`
— the same batch, queue bound, metrics and timeouts as HTTP requests. Validation reuses the HTTP
layer's rules; its errors map to gRPC status codes (400 -> INVALID_ARGUMENT, 503 -> RESOURCE_EXHAUSTED,
504 -> DEADLINE_EXCEEDED). A cancelled call (the client hung up, or its deadline passed) aborts the
request and frees its KV blocks.
"""

from __future__ import annotations

import logging
import time
import uuid

import grpc

from miniinfer.server import grpc_messages as pb
from miniinfer.server.protocol import APIError, _sampling

__all__ = ["GeneratorService", "start_grpc_server"]

log = logging.getLogger("miniinfer.server.grpc")

_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.INVALID_ARGUMENT,
           500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.RESOURCE_EXHAUSTED,
           504: grpc.StatusCode.DEADLINE_EXCEEDED}


class GeneratorService:
    def __init__(self, state):
        self.state = state

    # -- request -> engine ---------------------------------------------------------------------------

    def _parse(self, request, context):
        """(token ids, SamplingParams, timeout) or an APIError."""
        from miniinfer.server.api import _check_length, _tokenize

        state = self.state
        sampling = request.sampling
        body = {}
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "seed"):
            if sampling.HasField(name):
                body[name] = getattr(sampling, name)
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.ignore_eos:
            body["ignore_eos"] = True
        if sampling.n:
            body["n"] = sampling.n
        logprobs = sampling.logprobs if sampling.HasField("logprobs") else None
        params = _sampling(body, state.defaults, request.max_tokens or 16, logprobs)
        which = request.WhichOneof("input")
        if which is None:
            raise APIError(400, "give 'prompt' or 'prompt_token_ids'", param="prompt")
        if which == "prompt":
            if not request.prompt:
                raise APIError(400, "'prompt' must not be empty", param="prompt")
            token_ids = _tokenize(state, request.prompt, "prompt")
        else:
            token_ids = list(request.prompt_token_ids.ids)
            if not token_ids:
                raise APIError(400, "'prompt_token_ids' must not be empty", param="prompt_token_ids")
        _check_length(state, token_ids, params, "prompt", max_tokens_given=True)
        timeout = request.timeout_s if request.timeout_s > 0 else None
        remaining = context.time_remaining()
        if remaining is not None:  # the client's deadline bounds the request too
            timeout = remaining if timeout is None else min(timeout, remaining)
        return token_ids, params, timeout

    async def _submit(self, request, context):
        from miniinfer.server.api import _submit_all

        token_ids, params, timeout = self._parse(request, context)
        request_id = request.request_id or f"grpc-{uuid.uuid4().hex}"
        (stream,) = await _submit_all(self.state, [token_ids], params, request_id, timeout)
        return stream, params

    async def _fail(self, context, error: APIError, method: str):
        self._count(method, _STATUS.get(error.status, grpc.StatusCode.UNKNOWN).name)
        if error.status == 503 and "shutting" in error.message:
            await context.abort(grpc.StatusCode.UNAVAILABLE, error.message)
        await context.abort(_STATUS.get(error.status, grpc.StatusCode.UNKNOWN), error.message)

    def _count(self, method: str, status: str) -> None:
        if self.state.metrics is not None:
            self.state.metrics.grpc_requests.labels(method, status).inc()

    # -- the two calls ---------------------------------------------------------------------------------

    async def Generate(self, request, context):
        from miniinfer.server.async_engine import RequestTimeout

        start = time.perf_counter()
        try:
            stream, params = await self._submit(request, context)
        except APIError as error:
            await self._fail(context, error, "Generate")
        try:
            async for _ in stream:
                pass
        except RequestTimeout as error:
            await self._fail(context, APIError(504, str(error)), "Generate")
        finally:
            stream.abort()  # no-op once finished; frees the blocks when the call was cancelled
        output = stream.final
        errors = [c.error for c in output.outputs if c.finish_reason == "error"]
        if errors:
            await self._fail(context, APIError(500, f"generation failed: {errors[0]}"), "Generate")
        self._count("Generate", "OK")
        log.info("grpc request finished", extra={"fields": {
            "request_id": stream.request_id, "method": "Generate", "prompt_tokens": len(output.prompt_token_ids),
            "completion_tokens": sum(len(c.token_ids) for c in output.outputs),
            "e2e_s": round(time.perf_counter() - start, 6)}})
        return self._response(output, whole=True)

    async def GenerateStream(self, request, context):
        from miniinfer.server.async_engine import RequestTimeout

        try:
            stream, params = await self._submit(request, context)
        except APIError as error:
            await self._fail(context, error, "GenerateStream")
        try:
            async for output in stream:
                yield self._response(output, whole=False)
        except RequestTimeout as error:
            await self._fail(context, APIError(504, str(error)), "GenerateStream")
        finally:
            stream.abort()
        self._count("GenerateStream", "OK")

    def _response(self, output, whole: bool):
        completions = []
        for c in output.outputs:
            token_ids = c.token_ids if whole else c.new_token_ids
            entries = []
            if c.logprobs is not None:
                new = c.logprobs if whole else c.logprobs[len(c.logprobs) - len(token_ids):] if token_ids else []
                for token_id, entry in zip(token_ids, new):
                    entries.append(pb.TokenLogprob(token_id=token_id, logprob=entry.get(token_id, 0.0),
                                                   top={t: lp for t, lp in entry.items()}))
            completions.append(pb.Completion(index=c.index, text=c.text if whole else c.new_text,
                                             token_ids=token_ids, finish_reason=c.finish_reason or "",
                                             logprobs=entries))
        response = pb.GenerateResponse(request_id=output.request_id.rsplit("-", 1)[0], completions=completions,
                                       finished=output.finished)
        if output.finished:
            response.prompt_tokens = len(output.prompt_token_ids)
            response.completion_tokens = sum(len(c.token_ids) for c in output.outputs)
            response.cached_tokens = output.num_cached_tokens
        return response


def _handlers(service: GeneratorService):
    generate = grpc.unary_unary_rpc_method_handler(
        service.Generate, request_deserializer=pb.GenerateRequest.FromString,
        response_serializer=pb.GenerateResponse.SerializeToString)
    generate_stream = grpc.unary_stream_rpc_method_handler(
        service.GenerateStream, request_deserializer=pb.GenerateRequest.FromString,
        response_serializer=pb.GenerateResponse.SerializeToString)
    return grpc.method_handlers_generic_handler(pb.SERVICE, {"Generate": generate, "GenerateStream": generate_stream})


async def start_grpc_server(state, host: str, port: int):
    """Start the aio server on the running loop; returns ``(server, health servicer, bound port)``."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1.health import aio as health_aio

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handlers(GeneratorService(state)),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind the gRPC server to {host}:{port}")
    await server.start()
    for name in ("", pb.SERVICE):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("grpc serving", extra={"fields": {"host": host, "port": bound}})
    return server, health, bound
