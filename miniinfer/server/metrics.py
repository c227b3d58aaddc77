"""Prometheus metrics of the server (``GET /metrics``), with ``prometheus-client``.

What an operator reads from each (the Grafana dashboard in ``deploy/grafana`` plots them):

* ``miniinfer_time_to_first_token_seconds`` (histogram): how long users stare at nothing. Grows with
  queueing and with long prompts (prefill).
* ``miniinfer_inter_token_latency_seconds`` (histogram): the streaming speed a user sees; grows with
  the batch size (each step does more work) and with prefills mixed into decode steps.
* ``miniinfer_e2e_request_latency_seconds``, ``miniinfer_request_queue_time_seconds`` (histograms):
  total time, and the part spent waiting for a seat. Queue time rising while TTFT rises = overload.
* ``miniinfer_num_requests_running`` / ``_waiting`` (gauges): the batch and the queue right now.
* ``miniinfer_kv_cache_usage_ratio``, ``miniinfer_kv_blocks_used`` / ``miniinfer_kv_pool_blocks`` (gauges): the KV pool;
  near 1, new requests wait or running ones get preempted.
* counters: prompt, generated and prefix-cache-hit tokens (hit rate = hit / prompt), preemptions,
  finished requests by finish reason, rejected requests (queue full).
* GPU memory and utilization, when a GPU is present.

Engine-side numbers (tokens, preemptions, KV blocks) are read from the engine thread's last stats
snapshot at scrape time (a custom collector), so a scrape never touches the engine itself.
"""

from __future__ import annotations

import bisect
import math

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["ServerMetrics", "CONTENT_TYPE_LATEST"]

# Bucket edges cover a laptop CPU (hundreds of ms per token) and an H200 (a few ms).
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                    0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0)
FINISH_REASONS = ("stop", "length", "abort", "error", "timeout")


class _EngineCollector:
    """Turns the engine thread's stats snapshot into metric families at scrape time."""

    def __init__(self, stats_source, model_name: str, gpu: bool):
        self.stats_source = stats_source
        self.model_name = model_name
        self.gpu = gpu

    def describe(self):
        return []  # no fixed description: collected on demand only

    def collect(self):
        stats = self.stats_source() or {}
        labels = ["model_name"]
        value = [self.model_name]

        def gauge(name, documentation, number):
            family = GaugeMetricFamily(name, documentation, labels=labels)
            family.add_metric(value, float(number))
            return family

        def counter(name, documentation, number):
            family = CounterMetricFamily(name, documentation, labels=labels)
            family.add_metric(value, float(number))
            return family

        total = stats.get("kv_blocks_total", 0) or 0
        used = stats.get("kv_blocks_used", 0) or 0
        yield gauge("miniinfer_num_requests_running", "Requests with sequences in the running batch.",
                    stats.get("num_running", 0))
        yield gauge("miniinfer_num_requests_waiting", "Sequences waiting for a seat (incl. preempted ones).",
                    stats.get("num_waiting", 0) + stats.get("num_pending", 0))
        yield gauge("miniinfer_kv_pool_blocks", "KV-cache blocks in the pool.", total)
        yield gauge("miniinfer_kv_blocks_used", "KV-cache blocks held by requests (cached-only blocks not counted).",
                    used)
        yield gauge("miniinfer_kv_blocks_cached", "Blocks in the radix prefix cache.", stats.get("kv_blocks_cached", 0))
        yield gauge("miniinfer_kv_cache_usage_ratio", "Fraction of the KV pool held by requests (0..1).",
                    used / total if total else 0.0)
        yield counter("miniinfer_prompt_tokens", "Prompt tokens of admitted requests.", stats.get("prompt_tokens", 0))
        yield counter("miniinfer_generation_tokens", "Tokens generated.", stats.get("generation_tokens", 0))
        yield counter("miniinfer_prefix_cache_hit_tokens", "Prompt tokens served by the prefix cache.",
                      stats.get("prefix_cache_hit_tokens", 0))
        yield counter("miniinfer_prefill_tokens_computed", "Prompt tokens computed (incl. recomputation).",
                      stats.get("prefill_tokens_computed", 0))
        yield counter("miniinfer_num_preemptions", "Sequences preempted (KV freed, to be recomputed).",
                      stats.get("num_preemptions", 0))
        yield counter("miniinfer_engine_steps", "Engine steps run.", stats.get("num_steps", 0))
        yield counter("miniinfer_engine_busy_seconds", "Seconds the engine thread spent in steps.",
                      stats.get("_busy_seconds", 0.0))
        if self.gpu:
            yield from self._gpu_metrics()

    def _gpu_metrics(self):
        try:
            import torch

            if not torch.cuda.is_available():
                return
            memory = GaugeMetricFamily("miniinfer_gpu_memory_bytes", "GPU memory by kind.",
                                       labels=["device", "kind"])
            utilization = GaugeMetricFamily("miniinfer_gpu_utilization_ratio", "GPU utilization (0..1), via NVML.",
                                            labels=["device"])
            have_utilization = False
            for index in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(index)
                memory.add_metric([str(index), "allocated"], float(torch.cuda.memory_allocated(index)))
                memory.add_metric([str(index), "reserved"], float(torch.cuda.memory_reserved(index)))
                memory.add_metric([str(index), "used"], float(total - free))
                memory.add_metric([str(index), "total"], float(total))
                try:
                    utilization.add_metric([str(index)], torch.cuda.utilization(index) / 100.0)
                    have_utilization = True
                except Exception:  # noqa: BLE001 - needs pynvml; memory alone is still worth having
                    pass
            yield memory
            if have_utilization:
                yield utilization
        except Exception:  # noqa: BLE001 - a broken driver must not break /metrics
            return


def observe_many(histogram, values) -> None:
    """``histogram.observe(v)`` for every ``v`` of ``values``, with one lock round per bucket touched instead
    of two per value (a request's inter-token latencies: one value per token, observed in the engine
    thread when it finishes). Falls back to ``observe`` if prometheus-client's internals differ."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    counts: dict[int, int] = {}
    for value in values:
        index = bisect.bisect_left(bounds, value)  # the first bound >= value, as observe's linear scan finds
        counts[index] = counts.get(index, 0) + 1
    if counts:
        total.inc(math.fsum(values))
        for index, count in counts.items():
            buckets[index].inc(count)


class ServerMetrics:
    """All server metrics in one registry of their own (several servers in one process do not clash)."""

    def __init__(self, model_name: str, stats_source=lambda: {}, gpu: bool | None = None):
        if gpu is None:
            try:
                import torch

                gpu = torch.cuda.is_available()
            except Exception:  # noqa: BLE001
                gpu = False
        self.model_name = model_name
        self.registry = registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        self.ttft = Histogram("miniinfer_time_to_first_token_seconds", "Time from arrival to the first token.",
                              labels, buckets=_LATENCY_BUCKETS, registry=registry).labels(model_name)
        self.itl = Histogram("miniinfer_inter_token_latency_seconds", "Time between consecutive streamed tokens.",
                             labels, buckets=_LATENCY_BUCKETS, registry=registry).labels(model_name)
        self.e2e = Histogram("miniinfer_e2e_request_latency_seconds", "Time from arrival to the last token.",
                             labels, buckets=_E2E_BUCKETS, registry=registry).labels(model_name)
        self.queue_time = Histogram("miniinfer_request_queue_time_seconds",
                                    "Time from arrival to the first step that computed the request.",
                                    labels, buckets=_LATENCY_BUCKETS, registry=registry).labels(model_name)
        self.prompt_len = Histogram("miniinfer_request_prompt_tokens", "Prompt length of finished requests.",
                                    labels, buckets=(1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192,
                                                     16384, 32768), registry=registry).labels(model_name)
        self.generation_len = Histogram("miniinfer_request_generation_tokens",
                                        "Tokens generated per finished request.", labels,
                                        buckets=(1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
                                        registry=registry).labels(model_name)
        finished = Counter("miniinfer_request_success", "Finished requests by finish reason.",
                           labels + ["finished_reason"], registry=registry)
        self.finished = {reason: finished.labels(model_name, reason) for reason in FINISH_REASONS}
        self.rejected = Counter("miniinfer_requests_rejected", "Requests refused with 503 (queue full or shutdown).",
                                labels, registry=registry).labels(model_name)
        self.http_requests = Counter("miniinfer_http_requests", "HTTP requests by route and status code.",
                                     ["route", "status"], registry=registry)
        self.grpc_requests = Counter("miniinfer_grpc_requests", "gRPC Generate calls by method and status.",
                                     ["method", "status"], registry=registry)
        registry.register(_EngineCollector(stats_source, model_name, gpu))

    def observe_finished(self, timing, reason: str) -> None:
        """One finished request (called from the engine thread; prometheus-client is thread-safe)."""
        if timing.queue_time is not None:
            self.queue_time.observe(timing.queue_time)
        if timing.ttft is not None:
            self.ttft.observe(timing.ttft)
        observe_many(self.itl, timing.inter_token_latencies)
        if timing.e2e is not None:
            self.e2e.observe(timing.e2e)
        self.prompt_len.observe(timing.num_prompt_tokens)
        self.generation_len.observe(timing.num_generated_tokens)
        self.finished.get(reason, self.finished["abort"]).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
