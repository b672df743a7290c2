"""Smoke test of bench/host_tier.py on the tiny model: structure and counters, never timings."""

from __future__ import annotations

from elasticserve.bench import host_tier
from elasticserve.models.make_model import make_model


def test_burst_runs_every_preemption_kind_and_reports_them(tmp_path: str) -> None:
    model = make_model("llama", "tiny", f"{tmp_path}/tiny")
    runs = host_tier.measure(model, count=9, length=60, max_tokens=24, reps=1)
    assert set(runs) == set(host_tier.CONFIGS)
    tier, recompute, swap = runs["tier"][0], runs["recompute"][0], runs["swap"][0]
    # the device holds a third of the burst: every kind had to preempt, each its own way
    assert tier["recomputes"] == 0 and tier["offloaded"] > 0
    assert recompute["recomputes"] > 0 and recompute["offloaded"] == 0
    assert swap["swaps_out"] > 0 and swap["recomputes"] == 0
    stream = runs["stream"][0]  # victims kept decoding from the tier
    assert stream["recomputes"] == 0 and stream["streamed"] > 0 and tier["streamed"] == 0
    assert all(r["ttft_p50"] <= r["ttft_p99"] <= r["makespan"]
               for r in (tier, recompute, swap, stream))
    assert all(0 < r["tpot_p50"] <= r["tpot_p99"] < r["makespan"]
               for r in (tier, recompute, swap, stream))
    guard = runs["stream-guard"][0]  # its target: 2 x swap's TPOT P50 of this very command
    assert guard["target_ms"] == host_tier.GUARD_X_SWAP * swap["tpot_p50"] * 1000
    assert guard["recomputes"] + guard["swaps_out"] + guard["streamed"] > 0
    text = host_tier.report(runs, "setup", ["--reps", "1"])
    assert text.count("\n| ") == 6 and "| stream |" in text and "| tier |" in text
    assert "| stream-guard |" in text and "stream_tpot_ms per run" in text
    assert "bench.host_tier" in text
