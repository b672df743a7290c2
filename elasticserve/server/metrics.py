"""Prometheus metrics with vLLM's names and semantics (prefix `elasticserve:`), one
`model_name` label per served engine, plus the elastic memory's own.

Each app owns its CollectorRegistry (not prometheus-client's global one), so a process (or a
test session) can build several apps. Gauges and the memory counters are read from the engines
at scrape time (`_EngineCollector`); token counters and latency histograms are recorded by a
`ModelObserver` (server/metrics_observer.py) on each engine's step thread, every step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Receive, Scope, Send

from elasticserve.engine.pd import LATENCY_BOUNDS
from elasticserve.engine.protocol import EngineClient
from elasticserve.server.metrics_batch import BatchHistogramCollector
from elasticserve.server.metrics_observer import ModelObserver

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LABEL = "model_name"  # vLLM's label, so vLLM dashboards and alerts work unchanged
# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def one_two_five(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's token-count buckets)."""
    out: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class ServerMetrics:
    """The registry of one app, and the observers its engines report steps and outputs to."""

    def __init__(self, engines: Mapping[str, EngineClient]) -> None:
        self.registry = CollectorRegistry()
        self._latency_histograms()
        self._token_metrics(max((e.max_model_len for e in engines.values()), default=1))
        self.registry.register(_EngineCollector(engines))
        for name, engine in engines.items():
            engine.observer = ModelObserver(self, name)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(f"elasticserve:{name}", doc, [LABEL], buckets=buckets,
                         registry=self.registry)

    def _counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(f"elasticserve:{name}", doc, [LABEL, *labels], registry=self.registry)

    def _latency_histograms(self) -> None:
        h = self._histogram
        self.ttft = h("time_to_first_token_seconds",
                      "From the request's arrival at the server to its first token.", TTFT_BUCKETS)
        # many per step: batched (metrics_batch.py), and exported under vLLM's older name too
        self.itl = BatchHistogramCollector(
            {"elasticserve:inter_token_latency_seconds":
             "Time between successive tokens of a request.",
             "elasticserve:time_per_output_token_seconds":
             "Same as inter_token_latency_seconds (vLLM's older name)."}, LABEL, ITL_BUCKETS)
        self.registry.register(self.itl)
        self.e2e = h("e2e_request_latency_seconds",
                     "From arrival at the server to the end of a finished request.",
                     REQUEST_BUCKETS)
        self.queue = h("request_queue_time_seconds",
                       "From arrival at the server to the request's first step.", REQUEST_BUCKETS)
        self.prefill = h("request_prefill_time_seconds",
                         "From the request's first step to its first token.", REQUEST_BUCKETS)
        self.decode = h("request_decode_time_seconds",
                        "From the request's first token to its last.", REQUEST_BUCKETS)
        self.inference = h("request_inference_time_seconds",
                           "From the request's first step to its last token.", REQUEST_BUCKETS)

    def _token_metrics(self, longest: int) -> None:
        h, c = self._histogram, self._counter
        self.request_prompt = h("request_prompt_tokens",
                                "Prompt tokens of each finished request.", one_two_five(longest))
        self.request_generation = h("request_generation_tokens",
                                    "Generated tokens returned by each finished request.",
                                    one_two_five(longest))
        self.iteration = h("iteration_tokens_total",
                           "Tokens computed per engine step (prefill chunks + decodes).",
                           ITERATION_BUCKETS)
        self.prompt_tokens = c("prompt_tokens", "Prompt tokens of requests that started "
                               "generating (counted at their first token).")
        self.generation_tokens = c("generation_tokens", "Generated tokens, counted every step.")
        self.success = c("request_success", "Requests finished without error.",
                         ("finished_reason",))
        self.prefix_queries = c("prefix_cache_queries", "Tokens looked up in the prefix cache.")
        self.prefix_hits = c("prefix_cache_hits", "Tokens found in the prefix cache.")

    def render(self) -> bytes:
        return generate_latest(self.registry)


ARRIVAL_KEY = "elasticserve.arrival_time"


class ArrivalTimeMiddleware:
    """Stamps each HTTP request's arrival (time.monotonic()) before its body is read, so TTFT
    and end-to-end latency include reading, tokenizing and queueing it (`arrival_time`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[ARRIVAL_KEY] = time.monotonic()
        await self.app(scope, receive, send)


def arrival_time(request: Request) -> float:
    """When the server received `request` (now, if the middleware is not installed)."""
    stamp = request.scope.get(ARRIVAL_KEY)
    return stamp if isinstance(stamp, float) else time.monotonic()


# read from the engines at scrape time: (metric name, help, stats()/memory_stats() key, source)
_GAUGES = (
    ("num_requests_running", "Requests in the running batch.", "num_running", "stats"),
    ("num_requests_waiting", "Requests waiting to be scheduled.", "num_waiting", "stats"),
    ("num_requests_swapped", "Requests swapped out to host memory.", "num_swapped", "stats"),
    ("num_requests_streamed", "Running requests decoding from the host KV tier "
     "(--layerwise-residency).", "kv_streamed_sequences", "stats"),
    ("kv_mapped_bytes", "KV cache bytes backed by memory.", "kv_mapped_bytes", "mem"),
    ("kv_used_bytes", "KV cache bytes held by live blocks.", "kv_used_bytes", "mem"),
    ("host_kv_mapped_bytes", "Host KV tier bytes backed by memory.", "host_kv_mapped_bytes",
     "mem"),
)
# the elastic memory's life, per model: pages granted (a grow maps them), pages taken back by
# the arbiter, sleeps and wakes
_COUNTERS = (
    ("num_preemptions", "Requests preempted for lack of KV memory.", "preemptions", "stats"),
    ("num_recomputes", "Preempted requests whose KV was dropped and recomputed.", "recomputes",
     "stats"),
    # the host KV tier (--host-kv-memory) and layer-wise residency
    ("kv_offloaded_blocks", "KV blocks copied to host memory by preemption.",
     "kv_offloaded_blocks", "stats"),
    ("kv_onloaded_blocks", "KV blocks copied back from host memory.", "kv_onloaded_blocks",
     "stats"),
    ("host_prefix_hit_tokens", "Prompt tokens served from prefix blocks in the host tier.",
     "host_prefix_hit_tokens", "stats"),
    ("kv_streamed_steps", "Sequence-steps decoded with the KV in the host tier.",
     "kv_streamed_steps", "stats"),
    ("kv_streamed_layer_bytes", "KV bytes staged layer by layer from the host tier.",
     "kv_streamed_layer_bytes", "stats"),
    ("kv_streamed_prefill_tokens", "Prompt tokens prefilled with the KV in the host tier.",
     "kv_streamed_prefill_tokens", "stats"),
    ("kv_stream_guarded", "Admission streamings refused by the TPOT guard (--stream-tpot-ms).",
     "kv_stream_guarded", "stats"),
    ("kv_grow_events", "Times the KV cache mapped more pages.", "grow_events", "mem"),
    ("kv_shrink_events", "Times the KV cache unmapped pages.", "shrink_events", "mem"),
    ("kv_pages_granted", "KV pages mapped (granted by the budget, if shared).", "pages_granted",
     "mem"),
    ("kv_pages_reclaimed", "KV pages the arbiter took back for other models.",
     "pages_reclaimed", "mem"),
    ("model_sleeps", "Times the model was put to sleep.", "sleeps", "stats"),
    ("model_wakes", "Times the model was woken.", "wakes", "stats"),
    # prefill/decode disaggregation (--pd), counted where the KV arrives
    ("kv_handoff_sequences", "Sequences handed from a prefill worker to a decode worker.",
     "kv_handoff_sequences", "stats"),
    ("kv_handoff_pages", "KV pages that changed owner in hand-offs (nothing copied).",
     "kv_handoff_pages", "stats"),
    ("kv_handoff_bytes_copied", "KV bytes copied in hand-offs (0 when every page is lent).",
     "kv_handoff_bytes_copied", "stats"),
)


class _EngineCollector(Collector):
    """Gauges and the memory counters, read live from the engines at scrape time. A key an
    engine does not report is left out rather than failing the scrape."""

    def __init__(self, engines: Mapping[str, EngineClient]) -> None:
        self.engines = engines

    def collect(self) -> Iterator[Metric]:
        gauges: list[tuple[GaugeMetricFamily | CounterMetricFamily, str, str]] = [
            (GaugeMetricFamily(f"elasticserve:{n}", doc, labels=[LABEL]), key, source)
            for n, doc, key, source in _GAUGES]
        counters: list[tuple[GaugeMetricFamily | CounterMetricFamily, str, str]] = [
            (CounterMetricFamily(f"elasticserve:{n}", doc, labels=[LABEL]), key, source)
            for n, doc, key, source in _COUNTERS]
        usage = GaugeMetricFamily("elasticserve:kv_cache_usage_perc",
                                  "Fraction of the KV cache's blocks in use (1 = full; elastic: "
                                  "of the blocks mapped now).", labels=[LABEL])
        info = GaugeMetricFamily("elasticserve:cache_config_info",
                                 "The KV cache's settings, as labels (value 1).")
        for model, engine in self.engines.items():
            sources = {"stats": engine.stats(), "mem": engine.memory_stats()}
            for family, key, source in (*gauges, *counters):
                value = sources[source].get(key)
                if value is not None:
                    family.add_metric([model], float(value))
            used, total = sources["stats"].get("blocks_used"), sources["stats"].get("blocks_total")
            if used is not None and total is not None:
                usage.add_metric([model], used / total if total else 0.0)
            # each engine may report its own settings, so samples carry their own label names
            info.add_sample(info.name, {LABEL: model, **engine.config_info()}, 1.0)
        yield from (family for family, _, _ in gauges)
        yield usage
        yield info
        yield from (family for family, _, _ in counters)
        yield self._handoff_latency()

    def _handoff_latency(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "elasticserve:kv_handoff_latency_seconds",
            "From a prefill worker handing a request over to its KV in the decode worker's "
            "blocks.", labels=[LABEL])
        for model, engine in self.engines.items():
            stats = engine.stats()
            counts = stats.get("kv_handoff_latency_buckets")
            if counts:
                bounds = [str(b) for b in LATENCY_BOUNDS] + ["+Inf"]
                family.add_metric([model], list(zip(bounds, map(float, counts), strict=True)),
                                  float(stats.get("kv_handoff_latency_sum_s", 0.0)))
        return family

