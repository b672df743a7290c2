"""``elasticserve bench workers``: what running models in worker processes costs and gives.

Two comparisons, each side a real ``elasticserve serve`` child process driven over HTTP by the
same client, runs alternated (ABBA) and reported as medians with their spread:

* **split**: one model in the server process (``--in-process``) vs in one worker process,
  same model and workload: TPOT P50 at concurrency 1, output tokens/s at higher concurrency
  (every request of a level submitted at once, closed loop).
* **replicas**: one worker vs two replicas of the model on the same memory budget and the same
  total torch threads, at a load that saturates one.

Run: ``python -m elasticserve.bench.workers --model-size small --pairs 2 --write-docs``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from elasticserve import docs_section
from elasticserve.bench.fairness import abba, diff_pct, noise_pct, verdict
from elasticserve.bench.serve_client import ClientConfig, run_benchmark
from elasticserve.bench.serve_process import serve_process
from elasticserve.bench.serve_report import SLO, summarize_records
from elasticserve.workload.generators import RequestSpec


@dataclass(frozen=True, slots=True)
class Side:
    label: str
    argv: tuple[str, ...]


def _specs(n: int, input_len: int, output_len: int) -> list[RequestSpec]:
    return [RequestSpec(0.0, "m", input_len, output_len) for _ in range(n)]


def _run_level(url: str, concurrency: int, requests: int, input_len: int,
               output_len: int, seed: int) -> dict[str, Any]:
    cfg = ClientConfig(url, max_concurrency=concurrency, memory_interval_s=0.0,
                       progress=False, prompt_seed=seed, label=f"c{concurrency}")
    run = asyncio.run(run_benchmark(_specs(requests, input_len, output_len), cfg))
    s = summarize_records(run.records, run.duration_s, SLO())
    if s["failed"]:
        raise RuntimeError(f"{s['failed']} requests failed: {s['failures']}")
    return {"tok_s": s["output_token_throughput"], "tpot_p50": s["tpot_ms"]["p50"],
            "ttft_p50": s["ttft_ms"]["p50"], "ttft_p99": s["ttft_ms"]["p99"]}


WAVES = 3  # requests per level = WAVES x concurrency (c=1: 8 one by one): runs of seconds


def run_side(side: Side, model: str, levels: Sequence[int], input_len: int, output_len: int,
             seed: int) -> dict[int, dict[str, Any]]:
    """One server of `side`, every concurrency level in turn."""
    with serve_process(["--model", f"m={model}", *side.argv], start_timeout_s=300) as url:
        _run_level(url, 4, 4, input_len, 8, seed + 99)  # warm-up: first steps, kernels
        return {c: _run_level(url, c, 8 if c == 1 else WAVES * c, input_len, output_len, seed)
                for c in levels}


def compare(a: Side, b: Side, model: str, levels: Sequence[int], pairs: int, input_len: int,
            output_len: int, seed: int) -> dict[str, dict[int, list[dict[str, Any]]]]:
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {
        a.label: {c: [] for c in levels}, b.label: {c: [] for c in levels}}
    for first, second in abba(a, b, pairs):
        for side in (first, second):
            print(f"  {side.label} ...", file=sys.stderr, flush=True)
            for c, result in run_side(side, model, levels, input_len, output_len, seed).items():
                runs[side.label][c].append(result)
    return runs


def _rows(runs: dict[str, dict[int, list[dict[str, Any]]]], a: str, b: str,
          levels: Sequence[int]) -> list[str]:
    rows = [f"| concurrency | metric | {a} (median) | {b} (median) | {b} / {a} | spread | "
            "verdict |", "|---|---|---|---|---|---|---|"]
    for c in levels:
        metrics = [("tpot_p50", "TPOT P50 ms", "slower", "faster")] if c == 1 else []
        metrics.append(("tok_s", "output tok/s", "faster", "slower"))
        for key, name, above, below in metrics:
            va = [r[key] for r in runs[a][c]]
            vb = [r[key] for r in runs[b][c]]
            ratio = statistics.median(vb) / statistics.median(va)
            rows.append(f"| {c} | {name} | {statistics.median(va):.1f} | "
                        f"{statistics.median(vb):.1f} | {ratio:.3f}x | "
                        f"{noise_pct(va, vb):.0f}% | "
                        f"{verdict(diff_pct(vb, va), noise_pct(va, vb), above, below)} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="elasticserve bench workers", description=__doc__)
    p.add_argument("--model-size", default="small", help="models/make_model.py size")
    p.add_argument("--pairs", type=int, default=3, help="ABBA pairs per comparison")
    p.add_argument("--concurrency", default="1,32,128", help="split levels")
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="output tokens (ignore_eos)")
    p.add_argument("--replica-load", type=int, default=64, help="requests at once (replicas)")
    p.add_argument("--memory", default="2GiB", help="each server's --memory")
    p.add_argument("--threads", type=int, default=2, help="total torch threads per side")
    p.add_argument("--skip", choices=["split", "replicas"], default=None,
                   help="leave one comparison out")
    p.add_argument("--write-docs", action="store_true",
                   help="write the result into docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    from elasticserve.models.make_model import ensure_model

    model = ensure_model(size=args.model_size)
    levels = [int(c) for c in args.concurrency.split(",")]
    lines = [f"Command: `{docs_section.command_line('elasticserve.bench.workers', argv or sys.argv[1:])}`",
             f"- date: {docs_section.today()}; commit: {docs_section.git_commit()}; CPU: "
             f"{docs_section.cpu_model()} x {os.cpu_count()}; load before: "
             f"{docs_section.load_average()}; model: {args.model_size}; prompts "
             f"{args.input_len} tokens, outputs {args.output_len} (ignore_eos); {WAVES} x c "
             f"requests per level (c=1: 8 one by one); {args.pairs} "
             f"ABBA pairs; spread = (max - min) / median of either side", ""]
    mem = ("--memory", args.memory)
    if args.skip != "split":
        a = Side("in-process", ("--in-process", "--threads", str(args.threads), *mem))
        b = Side("worker", ("--threads", str(args.threads), *mem))
        runs = compare(a, b, model, levels, args.pairs, args.input_len, args.output_len, 0)
        lines += ["**split**: one model in the server process vs in one worker process", "",
                  *_rows(runs, a.label, b.label, levels), ""]
    if args.skip != "replicas":
        per = max(1, args.threads // 2)
        a = Side("1 replica", ("--threads", str(args.threads), *mem))
        b = Side("2 replicas", ("--replicas", "m=2", "--threads", str(per), *mem))
        load = [args.replica_load]
        runs = compare(a, b, model, load, args.pairs, args.input_len, args.output_len, 1)
        lines += [f"**replicas**: one worker ({args.threads} threads) vs two replicas "
                  f"({per} thread(s) each) on the same --memory {args.memory}, "
                  f"{args.replica_load} requests at once", "",
                  *_rows(runs, a.label, b.label, load), ""]
    body = "\n".join(lines)
    print(body)
    if args.write_docs:
        docs_section.update_section("workers", "## Worker processes (issue 11)\n\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
