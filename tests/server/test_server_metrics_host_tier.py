"""The host KV tier's and layer-wise residency's counters reach /metrics (issue 13): a burst
three times the device budget, streamed from the tier, shows up in the scrape."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from elasticserve.engine.async_engine import AsyncEngine
from elasticserve.server.metrics import ServerMetrics
from tests.engine import test_streamed_prefill as streaming_prefill
from tests.engine.test_layerwise_residency import burst, run, streaming


def scrape(metrics: ServerMetrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    return {s.name: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.labels.get("model_name") == "tiny"}


def test_streamed_burst_counts_in_the_scrape(model_dir: str) -> None:
    llm = streaming(model_dir)
    try:
        metrics = ServerMetrics({"tiny": AsyncEngine(llm.engine, name="tiny")})
        before = scrape(metrics)
        assert before["elasticserve:kv_streamed_steps_total"] == 0
        run(llm, burst())
        after, stats = scrape(metrics), llm.stats()
        assert after["elasticserve:kv_streamed_steps_total"] == stats["kv_streamed_steps"] > 0
        assert after["elasticserve:kv_offloaded_blocks_total"] == stats["kv_offloaded_blocks"] > 0
        assert after["elasticserve:kv_onloaded_blocks_total"] > 0
        assert after["elasticserve:kv_streamed_layer_bytes_total"] > 0
        assert after["elasticserve:num_recomputes_total"] == 0
        assert after["elasticserve:num_requests_streamed"] == 0  # all done, all back
        assert after["elasticserve:host_kv_mapped_bytes"] == \
            llm.memory_stats()["host_kv_mapped_bytes"]
    finally:
        llm.engine.close()


def test_a_prompt_larger_than_the_device_counts_as_streamed_prefill(model_dir: str) -> None:
    llm = streaming_prefill.streaming(model_dir)
    try:
        metrics = ServerMetrics({"tiny": AsyncEngine(llm.engine, name="tiny")})
        streaming_prefill.run(llm, [streaming_prefill.BIG])
        after = scrape(metrics)
        assert after["elasticserve:kv_streamed_prefill_tokens_total"] == \
            llm.stats()["kv_streamed_prefill_tokens"] >= len(streaming_prefill.BIG) // 2
    finally:
        llm.engine.close()


def test_tpot_guard_refusals_count_in_the_scrape(model_dir: str) -> None:
    llm = streaming(model_dir, stream_tpot_ms=1e-3)  # every measured step is over 1 us
    try:
        metrics = ServerMetrics({"tiny": AsyncEngine(llm.engine, name="tiny")})
        llm.generate([{"prompt_token_ids": [5, 6, 7]}])  # the guard measures its first steps
        run(llm, burst())
        after = scrape(metrics)
        assert after["elasticserve:kv_stream_guarded_total"] == llm.stats()["kv_stream_guarded"] > 0
    finally:
        llm.engine.close()
