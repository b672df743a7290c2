"""The batched inter-token histogram exports exactly what prometheus_client's Histogram would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from elasticserve.server.metrics import ITL_BUCKETS
from elasticserve.server.metrics_batch import BatchHistogramCollector


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) if f.name == name
            for s in f.samples if not s.name.endswith("_created")}


def test_batches_match_one_at_a_time_observations() -> None:
    values = [0.0, 0.01, 0.0100001, 0.3, 0.3, 7.5, 79.0, 80.0, 81.0, 1e6]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batch = BatchHistogramCollector({"itl": "gaps", "tpot": "same gaps"}, "model_name",
                                    ITL_BUCKETS)
    ours.register(batch)
    batch.labels("m").observe_many(values[:4])
    batch.labels("m").observe_many(values[4:])
    reference = Histogram("itl", "gaps", ["model_name"], buckets=ITL_BUCKETS, registry=theirs)
    for v in values:
        reference.labels("m").observe(v)
    expected = samples(theirs, "itl")
    assert expected and samples(ours, "itl") == expected
    alias = {(name.replace("itl", "tpot"), labels): v for (name, labels), v in expected.items()}
    assert samples(ours, "tpot") == alias
