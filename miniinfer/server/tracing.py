"""W3C trace context and optional OpenTelemetry spans.

A ``traceparent`` header (``00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>``) joins our work
to the caller's trace; without one we start a trace. The response carries a ``traceparent`` naming our
server span, so a client (or a proxy) can find the request in its tracing backend, and the trace id
appears in every log line of the request.

Spans (``queue``, ``prefill``, ``decode`` under one ``generate`` span) are recorded with OpenTelemetry
only when it is installed *and* an exporter is configured (``OTEL_TRACES_EXPORTER`` or
``OTEL_EXPORTER_OTLP_ENDPOINT`` set, or ``MINIINFER_OTEL_CONSOLE=1`` for spans printed on stderr);
otherwise everything here is a cheap no-op. Spans are written after the request finishes, from the
timings the engine thread recorded, so tracing adds nothing to the engine loop.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time

__all__ = ["TraceContext", "parse_traceparent", "Tracer", "random_hex"]

log = logging.getLogger("miniinfer.server.tracing")
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

# Ids (trace, span, request) come from a generator of our own, seeded once from the OS, as OpenTelemetry's
# RandomIdGenerator does, not from secrets.token_hex / uuid4: os.urandom lets go of the interpreter lock
# for its system call, and under load the event loop then waits for the engine thread to hand it back,
# three times per request. Ids need to be unique, not unguessable.
_ids = random.Random()


def random_hex(bits: int) -> str:
    """``bits`` random bits as lower-case hex (``bits // 4`` digits), never all zeros (W3C: invalid)."""
    value = 0
    while not value:
        value = _ids.getrandbits(bits)
    return f"{value:0{bits // 4}x}"


class TraceContext:
    """The trace this request belongs to and our span's id in it."""

    __slots__ = ("trace_id", "parent_span_id", "span_id", "flags")

    def __init__(self, trace_id: str, parent_span_id: str | None, flags: str = "01"):
        self.trace_id = trace_id
        self.parent_span_id = parent_span_id
        self.span_id = random_hex(64)
        self.flags = flags

    @property
    def traceparent(self) -> str:
        """The header to send on: our span is the parent of whatever comes next."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"


def parse_traceparent(header: str | None) -> TraceContext:
    """A context continuing the caller's trace, or a new trace if the header is absent or invalid
    (the W3C rule: an invalid traceparent is ignored, never an error)."""
    if header:
        match = _TRACEPARENT.match(header.strip().lower())
        if match:
            version, trace_id, parent, flags = match.groups()
            if version != "ff" and trace_id != "0" * 32 and parent != "0" * 16:
                return TraceContext(trace_id, parent, flags)
    return TraceContext(random_hex(128), None)


class Tracer:
    """Writes a request's spans to OpenTelemetry when it is configured; a no-op otherwise."""

    def __init__(self, service_name: str = "miniinfer", exporter=None):
        """``exporter``: an OpenTelemetry span exporter to use (tests pass an in-memory one); without it,
        the environment decides (see the module's docstring)."""
        self._tracer = None
        self._ids = _PresetIds()
        if exporter is not None:
            self._tracer = _make_tracer(service_name, self._ids, exporter)
            return
        if not (os.environ.get("OTEL_TRACES_EXPORTER") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or os.environ.get("MINIINFER_OTEL_CONSOLE")):
            return
        if os.environ.get("OTEL_TRACES_EXPORTER", "").lower() == "none":
            return
        try:
            self._tracer = _make_tracer(service_name, self._ids)
        except Exception as error:  # noqa: BLE001 - tracing is optional: say why, serve anyway
            log.warning("OpenTelemetry tracing not enabled: %s", error)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def record(self, context: TraceContext, name: str, timing, attributes: dict) -> None:
        """Spans of one finished request: ``name`` (whole request) > queue, prefill, decode."""
        if self._tracer is None:
            return
        try:
            self._record(context, name, timing, attributes)
        except Exception:  # noqa: BLE001
            log.exception("could not record spans")

    def _record(self, context: TraceContext, name: str, timing, attributes: dict) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

        # perf_counter times -> epoch nanoseconds
        offset = time.time() - time.perf_counter()

        def ns(t):
            return int((t + offset) * 1e9)

        parent = None
        if context.parent_span_id is not None:
            remote = SpanContext(int(context.trace_id, 16), int(context.parent_span_id, 16), is_remote=True,
                                 trace_flags=TraceFlags(int(context.flags, 16)))
            parent = trace.set_span_in_context(NonRecordingSpan(remote))
        end = timing.finished or time.perf_counter()
        # The root span takes the id the response's traceparent already announced (and the trace id).
        self._ids.preset = (int(context.trace_id, 16), int(context.span_id, 16))
        try:
            root = self._tracer.start_span(name, context=parent, start_time=ns(timing.arrival),
                                           attributes=attributes)
        finally:
            self._ids.preset = None
        inner = trace.set_span_in_context(root)
        phases = [("queue", timing.arrival, timing.scheduled), ("prefill", timing.scheduled, timing.first_token),
                  ("decode", timing.first_token, timing.finished)]
        for phase, start, stop in phases:
            if start is not None and stop is not None:
                span = self._tracer.start_span(phase, context=inner, start_time=ns(start))
                span.end(end_time=ns(stop))
        root.end(end_time=ns(end))


class _PresetIds:
    """OpenTelemetry id generator that hands out a preset (trace id, span id) once, then random ids."""

    def __init__(self):
        import threading

        self._local = threading.local()

    @property
    def preset(self):
        return getattr(self._local, "preset", None)

    @preset.setter
    def preset(self, value):
        self._local.preset = value

    def generate_trace_id(self) -> int:
        return self.preset[0] if self.preset else int(random_hex(128), 16)

    def generate_span_id(self) -> int:
        if self.preset:
            span_id = self.preset[1]
            self._local.preset = None  # once: the child spans get fresh ids
            return span_id
        return int(random_hex(64), 16)


def _make_tracer(service_name: str, ids, exporter=None):
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}), id_generator=ids)
    if exporter is not None:
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return provider.get_tracer("miniinfer.server")
    if os.environ.get("MINIINFER_OTEL_CONSOLE"):
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # optional package

        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider.get_tracer("miniinfer.server")
