"""A mixed serving load for side-by-side runs: short chat requests (Poisson) with long prompts
arriving among them, sent over HTTP to a real ``elasticserve serve`` child, summarised per class.
Shared by ``bench pd`` (P/D vs colocated) and ``bench slo-engine`` (FCFS vs SLO scheduling)."""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from elasticserve.bench.fairness import abba, noise_pct
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


def add_load_args(p: argparse.ArgumentParser, short_len: str, short_rate: float,
                  long_len: str, long_rate: float, long_burst: int = 1) -> None:
    """The flags every mixed-load bench shares, with its own defaults."""
    p.add_argument("--model-size", default="small", help="models/make_model.py size")
    p.add_argument("--pairs", type=int, default=2, help="ABBA pairs")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals")
    p.add_argument("--short-rate", type=float, default=short_rate,
                   help="short requests per second")
    p.add_argument("--short-len", default=short_len, help="short prompt:output tokens")
    p.add_argument("--long-rate", type=float, default=long_rate,
                   help="long arrivals per second")
    p.add_argument("--long-len", default=long_len, help="long prompt:output tokens")
    p.add_argument("--long-burst", type=int, default=long_burst,
                   help="long prompts per long arrival")
    p.add_argument("--write-docs", action="store_true",
                   help="write the result into docs/BENCHMARKS.md")


def load_from_args(args: argparse.Namespace) -> Load:
    (s_in, s_out), (l_in, l_out) = ([int(x) for x in v.split(":")]
                                    for v in (args.short_len, args.long_len))
    return Load(args.duration, args.short_rate, s_in, s_out, args.long_rate, l_in, l_out,
                args.long_burst)


def describe(load: Load) -> str:
    """The load in words, for a report's header."""
    burst = f"bursts of {load.long_burst} " if load.long_burst > 1 else ""
    return (f"{load.duration_s:.0f} s of arrivals (~{len(load.specs(0))} requests): short "
            f"{load.short_in}:{load.short_out} tokens at {load.short_rate}/s, {burst}long "
            f"{load.long_in}:{load.long_out} at {load.long_rate}/s (Poisson, same arrivals "
            "both sides)")


def run_abba(a: Side, b: Side, pairs: int,
             run: Callable[[Side, int], dict[str, float]]) -> dict[str, list[dict[str, float]]]:
    """`run(side, seed)` for both sides, alternated ABBA; pair i uses seed i on both sides."""
    runs: dict[str, list[dict[str, float]]] = {a.label: [], b.label: []}
    for i, (first, second) in enumerate(abba(a, b, pairs)):
        for side in (first, second):
            print(f"  run {i}: {side.label} ...", file=sys.stderr, flush=True)
            runs[side.label].append(run(side, i))
    return runs
