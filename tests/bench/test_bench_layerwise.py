"""Smoke test of bench/layerwise.py on the tiny model: structure and counters, never timings."""

from __future__ import annotations

from elasticserve.bench import layerwise
from elasticserve.models.make_model import make_model


def test_burst_runs_both_onload_kinds_and_reports_them(tmp_path: str) -> None:
    model = make_model("llama", "tiny", f"{tmp_path}/tiny")
    runs = layerwise.measure(model, count=9, length=60, max_tokens=24, pairs=1)
    assert set(runs) == set(layerwise.CONFIGS)
    blocking, lw = runs["blocking"][0], runs["layerwise"][0]
    # both forced through the tier; only the second copies its swap-ins layer-wise (a step
    # with block copies beside its swap-in stays blocking, hence <=)
    assert blocking["onloaded"] > 0 and lw["onloaded"] > 0
    assert 0 < lw["layerwise_jobs"] <= lw["onload_steps"]
    assert blocking["layerwise_jobs"] == 0 and blocking["stall"] > 0
    assert all(r["ttft_p50"] <= r["ttft_p99"] <= r["makespan"] and r["cpu"] > 0
               for r in (blocking, lw))
    text = layerwise.report(runs, "setup", ["--pairs", "1"])
    assert text.count("\n| ") == 3 and "| layerwise |" in text and "bench.layerwise" in text
    assert text.count("vs blocking") == 5
