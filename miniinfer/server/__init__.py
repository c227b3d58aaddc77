"""Chapter 13 — serving: an OpenAI-compatible HTTP server (and gRPC) around the engine.

Modules, from the socket down to the engine:

* :mod:`~miniinfer.server.serve` — ``miniinfer serve``: loads the model, runs uvicorn (and gRPC);
* :mod:`~miniinfer.server.api` — FastAPI routes: ``/v1/completions``, ``/v1/chat/completions``,
  ``/v1/models``, ``/health``, ``/metrics``; SSE streaming;
* :mod:`~miniinfer.server.protocol` — request bodies -> ``SamplingParams``; OpenAI's error object;
* :mod:`~miniinfer.server.async_engine` — the engine loop in its own thread, per-request asyncio
  queues, bounded admission, timeouts, aborts, graceful shutdown;
* :mod:`~miniinfer.server.metrics`, :mod:`~miniinfer.server.logs`, :mod:`~miniinfer.server.tracing` —
  Prometheus metrics, JSON-lines logs, W3C trace context and OpenTelemetry spans;
* :mod:`~miniinfer.server.grpc_server`, :mod:`~miniinfer.server.grpc_client` — gRPC beside HTTP.

Nothing here is imported by ``import miniinfer``: the server's dependencies are the ``serve`` extra.
"""
