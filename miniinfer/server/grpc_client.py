"""A small gRPC client for ``miniinfer serve --grpc-port P``.

    from miniinfer.server.grpc_client import GeneratorClient
    with GeneratorClient("127.0.0.1:50051") as client:
        print(client.health())                                   # "SERVING"
        out = client.generate("ROMEO.\\n", max_tokens=32, temperature=0)
        print(out.completions[0].text, out.completion_tokens)
        for message in client.generate_stream("JULIET.\\n", max_tokens=32):
            print(message.completions[0].text, end="", flush=True)

Errors arrive as ``grpc.RpcError`` with the server's status code (INVALID_ARGUMENT for a bad value,
RESOURCE_EXHAUSTED when the queue is full, DEADLINE_EXCEEDED after a timeout).
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from miniinfer.server import grpc_messages as pb

__all__ = ["GeneratorClient", "build_request"]

_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "seed", "stop", "ignore_eos", "n", "logprobs")


def build_request(prompt, *, max_tokens: int = 16, timeout_s: float = 0.0, request_id: str = "",
                  **sampling) -> pb.GenerateRequest:
    """A ``GenerateRequest`` from a prompt (text or token ids) and sampling keywords."""
    unknown = set(sampling) - set(_SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling option(s) {sorted(unknown)}; known: {_SAMPLING_FIELDS}")
    options = {k: v for k, v in sampling.items() if v is not None}
    if isinstance(options.get("stop"), str):
        options["stop"] = [options["stop"]]
    request = pb.GenerateRequest(max_tokens=max_tokens, timeout_s=timeout_s, request_id=request_id,
                                 sampling=pb.Sampling(**options))
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.ids.extend(int(t) for t in prompt)
    return request


class GeneratorClient:
    def __init__(self, target: str, channel: grpc.Channel | None = None):
        self.channel = channel or grpc.insecure_channel(target)
        self._generate = self.channel.unary_unary(pb.GENERATE, request_serializer=pb.GenerateRequest.SerializeToString,
                                                  response_deserializer=pb.GenerateResponse.FromString)
        self._generate_stream = self.channel.unary_stream(
            pb.GENERATE_STREAM, request_serializer=pb.GenerateRequest.SerializeToString,
            response_deserializer=pb.GenerateResponse.FromString)

    def generate(self, prompt, *, timeout: float | None = None, **options) -> pb.GenerateResponse:
        """The whole result. ``timeout`` is the call's gRPC deadline (seconds)."""
        return self._generate(build_request(prompt, **options), timeout=timeout)

    def generate_stream(self, prompt, *, timeout: float | None = None, **options) -> Iterator[pb.GenerateResponse]:
        """Messages as tokens come; ``.cancel()`` on the returned iterator (or dropping it) aborts the request."""
        return self._generate_stream(build_request(prompt, **options), timeout=timeout)

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """The standard health check: ``SERVING``, ``NOT_SERVING``, …"""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GeneratorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
