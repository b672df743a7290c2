"""Smoke test of `elasticserve bench serve` against a real server on a free loopback port."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from elasticserve.bench import serve  # noqa: E402
from elasticserve.bench.serve_client import ClientConfig, parse_memory, run_benchmark  # noqa: E402
from elasticserve.bench.serve_report import SLO, goodput_rates, markdown_run, summarize  # noqa: E402
from elasticserve.engine.args import EngineArgs  # noqa: E402
from elasticserve.engine.async_engine import AsyncEngine  # noqa: E402
from elasticserve.engine.multi_model import ModelPool, ModelSpec  # noqa: E402
from elasticserve.server.api_server import build_app  # noqa: E402
from elasticserve.workload.generators import RequestSpec  # noqa: E402
from tests.uvicorn_server import serve_in_thread  # noqa: E402

TOKEN = "bench-token"
METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from elasticserve.models.make_model import make_model

    path = make_model("llama", "tiny", str(tmp_path_factory.mktemp("bench") / "tiny"))
    pool = ModelPool([ModelSpec("tiny", path), ModelSpec("tiny-b", path)], 256 << 20,
                     EngineArgs(model=""))
    engines = {name: AsyncEngine(e, name=name) for name, e in pool.engines.items()}
    app = build_app(engines, pool=pool, admin_token=TOKEN)
    with serve_in_thread(app) as url:
        yield url
    for engine in engines.values():
        engine.shutdown()
    pool.close()


def _specs() -> list[RequestSpec]:
    return [RequestSpec(0.05 * i, "tiny" if i % 2 else "tiny-b", 5 + 5 * i, 4 + i)
            for i in range(8)]


def test_core_run_reports_every_metric(base_url: str) -> None:
    cfg = ClientConfig(base_url, admin_token=TOKEN, memory_interval_s=0.05, progress=False)
    run = asyncio.run(run_benchmark(_specs(), cfg))
    assert len(run.records) == 8
    for rec in run.records:
        assert rec.ok, (rec.status, rec.failure, rec.error)
        assert rec.ttft_s is not None and rec.e2e_s is not None and rec.ttft_s <= rec.e2e_s
        assert rec.output_tokens == rec.usage_completion_tokens == rec.max_tokens
        assert rec.usage_prompt_tokens == rec.input_len
        assert len(rec.itl_s) == rec.output_tokens - 1
    summary = summarize(run, SLO(ttft_s=30.0, tpot_s=30.0))
    for part in [summary["overall"], *summary["models"].values()]:
        for metric in METRICS:
            assert all(v is not None and v >= 0 for v in part[metric].values()), metric
        assert part["failed"] == 0 and part["token_count_mismatches"] == 0
        assert part["request_throughput"] > 0 and part["output_token_throughput"] > 0
        assert part["slo_attainment"] == 1.0 and part["goodput"] > 0
    assert set(summary["models"]) == {"tiny", "tiny-b"}
    assert summary["overall"]["output_tokens"] == sum(s.output_len for s in _specs())
    assert run.memory and summary["memory"]["models"]["tiny"]["kv_mapped_bytes"]["peak"] > 0
    assert "TTFT" in markdown_run(summary) and "kv_used_bytes" in markdown_run(summary)
    json.dumps(summary)  # JSON-ready


def test_failures_are_counted_not_raised(base_url: str) -> None:
    specs = [RequestSpec(0.0, "no-such-model", 4, 2), RequestSpec(0.0, "tiny", 4, 2),
             RequestSpec(99.0, "tiny", 4, 2)]
    cfg = ClientConfig(base_url, admin_token="wrong", time_limit_s=10.0, progress=False)
    run = asyncio.run(run_benchmark(specs, cfg))
    summary = summarize(run, SLO(ttft_s=30.0))
    assert summary["overall"]["failures"] == {"404": 1, "not_sent": 1}
    assert summary["overall"]["completed"] == 1 and summary["overall"]["slo_met"] == 1
    assert run.memory_note is not None and "401" in run.memory_note


def test_cli_preset_sweep_json_and_plots(base_url: str, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    argv = ["--base-url", base_url, "--preset", "alternating", "--burst-s", "0.25",
            "--duration", "1", "--sweep-rates", "4,8", "--input-len", "16", "--output-len", "4",
            "--ttft-slo", "30000", "--admin-token", TOKEN, "--out-json", str(out),
            "--no-progress", "--cooldown", "0"]
    if _has_matplotlib():
        argv += ["--plots", str(tmp_path / "plots")]
    assert serve.main(argv) == 0
    report = json.loads(out.read_text())
    assert [r["rate"] for r in report["runs"]] == [4.0, 8.0]
    assert report["goodput"]["max_rate_at_90pct"] == 8.0
    if _has_matplotlib():
        assert {Path(p).name for p in report["plots"]} >= {"memory.png", "latency_cdf.png",
                                                           "attainment.png"}


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_alternating_profile_bursts_one_model_at_a_time() -> None:
    a = serve.alternating_profile(0, 2, 3.0, 1.0, 4.0)
    b = serve.alternating_profile(1, 2, 3.0, 1.0, 4.0)
    assert [a.rate(t) for t in (0.5, 1.5, 2.5, 3.5)] == [3.0, 0.0, 3.0, 0.0]
    assert [b.rate(t) for t in (0.5, 1.5, 2.5, 3.5)] == [0.0, 3.0, 0.0, 3.0]
    assert a.expected_count == pytest.approx(6.0) == b.expected_count


def test_fit_lengths_and_goodput_rates() -> None:
    fitted = serve.fit_lengths([RequestSpec(0, "m", 500, 300), RequestSpec(0, "m", 0, 0)],
                               {"m": 256})
    assert [(s.input_len, s.output_len) for s in fitted] == [(128, 128), (1, 1)]
    runs = [{"rate": r, "overall": {"slo_attainment": a}}
            for r, a in ((1, 1.0), (2, 0.95), (4, 0.5))]
    assert goodput_rates(runs) == {"max_rate_at_90pct": 2, "max_rate_at_99pct": 1}


def test_parse_memory_flattens_nested_fields() -> None:
    sample = parse_memory({"budget": {"bytes": 8}, "models": {"a": {
        "state": "awake", "weights_bytes": 3, "kv": {"kv_mapped_bytes": 2, "kv_used_bytes": 1}}}},
        1.5)
    assert sample.budget_bytes == 8 and sample.states == {"a": "awake"}
    assert sample.models["a"] == {"weights_bytes": 3, "kv_mapped_bytes": 2, "kv_used_bytes": 1}


def test_multi_model_budgets_split_the_burst(tmp_path: Path) -> None:
    from elasticserve.bench import multi_model as mm
    from elasticserve.models.make_model import make_model

    sc = mm.Scenario(rounds=2, burst_rate=4.0, burst_s=1.0, slot_s=2.0)
    specs = sc.requests()
    for spec in specs:  # A only in its turns, B only in its own
        assert spec.model == mm.MODELS[int(spec.arrival // sc.slot_s) % 2]
        assert spec.arrival % sc.slot_s <= sc.burst_s
    assert {s.model for s in specs} == set(mm.MODELS)
    path = make_model("llama", "tiny", str(tmp_path / "m"))
    peak = 40 << 20
    awake = mm.budget_for(path, peak, "given", sc, "awake")
    # the burst does not fit the static half, and fits what the arbiter can give one model
    assert awake.static_kv_bytes < peak <= awake.arbiter_room_bytes
    assert awake.arbiter_room_bytes < 2 * awake.static_kv_bytes + (4 << 20)
    asleep = mm.budget_for(path, peak, "given", sc, "sleep")
    # tiny weights: sleeping frees little, so the room rule sizes this budget
    assert asleep.static_kv_bytes < peak <= asleep.arbiter_room_bytes
    assert awake.memory_bytes % mm.PAGE == 0 and asleep.memory_bytes % mm.PAGE == 0
    # calibration: both policies on a budget where even the static half holds the burst, so
    # the SLO taken from it is what either policy reaches when memory is not short
    est = mm.estimate_peak(path, sc)
    generous = mm.budget_for(path, est, "estimated", sc, "sleep", mm.generous_memory(path, sc))
    assert generous.static_kv_bytes >= 1.5 * est and generous.arbiter_room_bytes >= 1.5 * est


def test_multi_model_compare_and_section() -> None:
    from elasticserve.bench import multi_model_report as mr
    from elasticserve.bench.serve_report import RequestRecord, RunResult, records_json

    def run(label: str, ttfts: list[float]) -> dict[str, Any]:
        recs = [RequestRecord("model-a", 8, 4, 0.0, 0.0, t, [0.01] * 3, t + 0.03, 4, 8, 4, 200)
                for t in ttfts]
        result = RunResult(label, None, 10.0, recs)
        return summarize(result, SLO(ttft_s=1.0)) | {"requests": records_json(result)}

    summaries = {"arbiter": run("arbiter", [0.2, 0.3, 0.5, 0.9]),
                 "static": run("static", [0.2, 0.4, 3.0, 5.0])}
    cmp = mr.compare(summaries)
    assert (cmp["arbiter_within_slo"], cmp["static_within_slo"]) == (4, 2)
    assert cmp["within_slo_ratio"] == 2.0 and cmp["within_s"]["4"] == {"arbiter": 4, "static": 3}
    budget = {"memory_bytes": 300 << 20, "weights_bytes": 100 << 20, "kv_bytes_per_token": 16384,
              "burst_peak_bytes": 60 << 20, "peak_source": "given", "static_kv_bytes": 50 << 20,
              "arbiter_room_bytes": 90 << 20}
    scenario = {"burst_rate": 16.0, "burst_s": 0.5, "slot_s": 10.0, "rounds": 3,
                "input_len": 384, "output_len": 48, "ttft_slo_s": 1.0}
    text = mr.markdown_section(scenario, budget, {"awake": {
        "budget": budget, "summaries": summaries, "compare": cmp, "order": ["static", "arbiter"]}},
        ["footer line"], threads=2, calibration_order=["arbiter", "static"])
    assert "2.00x" in text and "| arbiter | 4/4 | 4 (100%)" in text and "footer line" in text
    # what the run did, not fixed sentences: its threads and the order the policies ran in
    assert "`--threads 2`" in text and "(83% of the burst peak)" in text
    assert "calibration arbiter, calibration static, awake static, awake arbiter" in text
    assert "0.4 s" not in text and "no run-to-run spread was measured" in text
