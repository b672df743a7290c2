"""Prometheus metrics with vLLM-like names, one `model` label per served engine.

Each app owns its CollectorRegistry (not prometheus-client's global one), so a process (or a
test session) can build several apps. Gauges are read from the engines at scrape time;
latencies and token counts are recorded from the outputs on each engine's step thread.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from elasticserve.engine.protocol import EngineClient, RequestTiming
from elasticserve.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0)
# (metric name, help, EngineClient.stats() key or memory_stats() key, source)
_GAUGES = (
    ("elasticserve:num_requests_running", "Requests in the running batch.", "num_running", "stats"),
    ("elasticserve:num_requests_waiting", "Requests waiting to be scheduled.", "num_waiting", "stats"),
    ("elasticserve:num_requests_swapped", "Requests swapped out to host memory.", "num_swapped",
     "stats"),
    ("elasticserve:kv_mapped_bytes", "KV cache bytes backed by memory.", "kv_mapped_bytes", "mem"),
    ("elasticserve:kv_used_bytes", "KV cache bytes held by live blocks.", "kv_used_bytes", "mem"),
)


class ServerMetrics:
    """The registry of one app, and the observers its engines report outputs to."""

    def __init__(self, engines: Mapping[str, EngineClient]) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.ttft = Histogram("elasticserve:time_to_first_token_seconds",
                              "Time from submission to the first generated token.", ["model"],
                              buckets=_LATENCY_BUCKETS, registry=reg)
        self.itl = Histogram("elasticserve:inter_token_latency_seconds",
                             "Time between successive generated tokens of a request.", ["model"],
                             buckets=_LATENCY_BUCKETS, registry=reg)
        self.e2e = Histogram("elasticserve:e2e_request_latency_seconds",
                             "Time from submission to the end of a finished request.", ["model"],
                             buckets=_E2E_BUCKETS, registry=reg)
        self.prompt_tokens = Counter("elasticserve:prompt_tokens",
                                     "Prompt tokens of finished requests.", ["model"], registry=reg)
        self.generation_tokens = Counter("elasticserve:generation_tokens",
                                         "Generated tokens of finished requests.", ["model"],
                                         registry=reg)
        reg.register(_EngineCollector(engines))
        for name, engine in engines.items():
            engine.observer = ModelObserver(self, name)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelObserver:
    """Records one model's latencies and token counts; runs on that engine's step thread."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self.ttft = metrics.ttft.labels(model=model)
        self.itl = metrics.itl.labels(model=model)
        self.e2e = metrics.e2e.labels(model=model)
        self.prompt_tokens = metrics.prompt_tokens.labels(model=model)
        self.generation_tokens = metrics.generation_tokens.labels(model=model)

    def on_output(self, output: RequestOutput, timing: RequestTiming, now: float) -> None:
        length = max((len(c.token_ids) for c in output.outputs), default=0)
        new = length - timing.num_tokens
        if new > 0:
            if timing.last_token is None:
                first = output.metrics.get("first_token_time", now)
                self.ttft.observe(max(0.0, first - timing.submitted))
                prev, new = first, new - 1  # the first token has no gap before it
            else:
                prev = timing.last_token
            # a non-streamed request reports all its tokens at once: spread the time evenly
            for _ in range(new):
                self.itl.observe(max(0.0, now - prev) / new)
            timing.num_tokens, timing.last_token = length, now
        if output.finished:
            self.e2e.observe(max(0.0, now - timing.submitted))
            self.prompt_tokens.inc(len(output.prompt_token_ids))
            self.generation_tokens.inc(sum(len(c.token_ids) for c in output.outputs))


class _EngineCollector(Collector):
    """Gauges and the preemption counter, read live from the engines at scrape time."""

    def __init__(self, engines: Mapping[str, EngineClient]) -> None:
        self.engines = engines

    def collect(self) -> Iterator[Metric]:
        gauges = [GaugeMetricFamily(name, doc, labels=["model"]) for name, doc, _, _ in _GAUGES]
        preemptions = CounterMetricFamily("elasticserve:num_preemptions",
                                          "Requests preempted for lack of KV memory.",
                                          labels=["model"])
        counters = [CounterMetricFamily(name, doc, labels=["model"])
                    for _, name, doc, _ in _COUNTERS]
        for model, engine in self.engines.items():
            sources = {"stats": engine.stats(), "mem": engine.memory_stats()}
            for gauge, (_, _, key, source) in zip(gauges, _GAUGES, strict=True):
                gauge.add_metric([model], float(sources[source][key]))
            preemptions.add_metric([model], float(sources["stats"]["preemptions"]))
            for family, (key, _, _, source) in zip(counters, _COUNTERS, strict=True):
                family.add_metric([model], float(sources[source][key]))
        yield from gauges
        yield preemptions
        yield from counters


# the elastic memory's life, per model: pages granted (grow events map them), pages taken
# back by the arbiter, sleeps and wakes: (stats key, metric name, help, source as in _GAUGES)
_COUNTERS = (
    ("grow_events", "elasticserve:kv_grow_events", "Times the KV cache mapped more pages.",
     "mem"),
    ("shrink_events", "elasticserve:kv_shrink_events", "Times the KV cache unmapped pages.",
     "mem"),
    ("pages_reclaimed", "elasticserve:kv_pages_reclaimed",
     "KV pages the arbiter took back for other models.", "mem"),
    ("sleeps", "elasticserve:model_sleeps", "Times the model was put to sleep.", "stats"),
    ("wakes", "elasticserve:model_wakes", "Times the model was woken.", "stats"),
)

