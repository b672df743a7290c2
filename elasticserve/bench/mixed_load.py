"""A mixed serving load for side-by-side runs: short chat requests (Poisson) with long prompts
arriving among them, sent over HTTP to a real ``elasticserve serve`` child, summarised per class.
Shared by ``bench pd`` (P/D vs colocated) and ``bench slo-engine`` (FCFS vs SLO scheduling)."""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from elasticserve.bench.fairness import noise_pct
from elasticserve.bench.serve_client import ClientConfig, run_benchmark
from elasticserve.bench.serve_process import serve_process
from elasticserve.bench.serve_report import SLO, RunResult, summarize_records
from elasticserve.workload.generators import RequestSpec


@dataclass(frozen=True, slots=True)
class Side:
    label: str
    argv: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Load:
    duration_s: float
    short_rate: float
    short_in: int
    short_out: int
    long_rate: float
    long_in: int
    long_out: int
    long_burst: int = 1  # long prompts arriving together at each long arrival

    def specs(self, seed: int) -> list[RequestSpec]:
        """Seeded Poisson arrivals of both classes (the same for every side of a seed)."""
        rng = random.Random(seed)
        out = []
        for rate, n_in, n_out, burst in (
                (self.short_rate, self.short_in, self.short_out, 1),
                (self.long_rate, self.long_in, self.long_out, self.long_burst)):
            t = rng.expovariate(rate)
            while t < self.duration_s:
                out += [RequestSpec(t, "m", n_in, n_out)] * burst
                t += rng.expovariate(rate)
        return sorted(out, key=lambda s: s.arrival)

    def classes(self) -> tuple[tuple[str, int], ...]:
        return (("short", self.short_in), ("long", self.long_in))


def serve_load(side: Side, model: str, load: Load, seed: int,
               after: Callable[[str], dict[str, float]] | None = None
               ) -> tuple[RunResult, dict[str, float]]:
    """One server of `side` (warmed up with two long prompts) under the load; `after(url)`
    reads the server once the load is done (e.g. its /metrics)."""
    with serve_process(["--model", f"m={model}", *side.argv], start_timeout_s=300) as url:
        warm = ClientConfig(url, max_concurrency=4, memory_interval_s=0.0, progress=False)
        asyncio.run(run_benchmark([RequestSpec(0.0, "m", load.long_in, 4)] * 2, warm))
        cfg = ClientConfig(url, max_concurrency=256, memory_interval_s=0.0, progress=False,
                           prompt_seed=seed, label=side.label)
        run = asyncio.run(run_benchmark(load.specs(seed), cfg))
        return run, (after(url) if after is not None else {})


def class_summaries(run: RunResult, load: Load, slo: SLO | None = None,
                    allow_failed: bool = False) -> dict[str, dict[str, Any]]:
    """`summarize_records` per request class (and "all"); failures raise unless allowed."""
    out = {}
    for cls, n_in in load.classes():
        records = [r for r in run.records if r.input_len == n_in]
        out[cls] = summarize_records(records, run.duration_s, slo or SLO())
        if out[cls]["failed"] and not allow_failed:
            raise RuntimeError(f"{run.label}: {out[cls]['failed']} {cls} requests failed: "
                               f"{out[cls]['failures']}")
    out["all"] = summarize_records(run.records, run.duration_s, slo or SLO())
    return out


def median_rows(runs: dict[str, list[dict[str, float]]], a: str, b: str,
                metrics: tuple[tuple[str, str], ...]) -> list[str]:
    """A markdown table: per metric, the median of each side's runs, b / a, and the spread."""
    out = [f"| metric | {a} (median) | {b} (median) | {b} / {a} | spread |",
           "|---|---|---|---|---|"]
    for key, name in metrics:
        va = [r[key] for r in runs[a] if r.get(key) is not None]
        vb = [r[key] for r in runs[b] if r.get(key) is not None]
        if not va or not vb:  # a class with no request in this run
            out.append(f"| {name} | - | - | - | - |")
            continue
        ma, mb = statistics.median(va), statistics.median(vb)
        ratio = f"{mb / ma:.2f}x" if ma else "-"
        out.append(f"| {name} | {ma:.1f} | {mb:.1f} | {ratio} | {noise_pct(va, vb):.0f}% |")
    return out
