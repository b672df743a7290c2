"""A burst three times the device KV budget: the host KV tier vs recompute vs swap preemption.

Every request of a seeded burst arrives at once; the elastic device cache may hold about a
third of the burst's KV (`kv_cache_max_bytes`) and the rest must go somewhere when decodes grow:
- `tier`: the elastic host tier (`host_kv_cache_bytes` = the burst's whole KV), offload-first;
- `recompute`: `preemption_mode="recompute"` (KV dropped, prompt + output prefilled again);
- `swap`: `preemption_mode="swap"` on today's fixed swap area of the same size;
- `stream`: the tier with `layerwise_residency`: a victim keeps decoding from the tier, one
  layer staged at a time, and waiting prompts are admitted meanwhile (core/sched_stream.py);
- `stream-guard`: `stream` with its TPOT guard, `stream_tpot_ms` = 2 x the `swap` runs' TPOT P50
  (median of those run so far in this command; `swap` comes before it in the first rep).
The five run alternated (rotating order), each `--reps` times, on the real engine; per run we
record TTFT P50/P99 (first token time - arrival) and the burst's makespan, and report medians
with spread = (max - min) / median. `--write-docs` puts the table in docs/BENCHMARKS.md.

    python -m elasticserve.bench.host_tier --reps 3 --write-docs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from typing import Any

from elasticserve import docs_section
from elasticserve.bench.fairness import spread_pct

CONFIGS = ("tier", "recompute", "swap", "stream", "stream-guard")
GUARD_X_SWAP = 2.0  # stream-guard's target: this many times swap's TPOT P50


def burst(count: int, length: int, seed: int) -> list[list[int]]:
    """Distinct prompts (no shared prefix, so the prefix cache cannot hide a recompute)."""
    return [[(seed * 131 + i * 37 + j * 11 + j * j) % 500 + 3 for j in range(length)]
            for i in range(count)]


def _engine_args(kind: str, model: str, device_bytes: int, host_bytes: int,
                 page: int, stream_tpot_ms: float | None = None) -> dict[str, Any]:
    base: dict[str, Any] = {"model": model, "page_size": page, "kv_reserve_pages": 0,
                            "kv_cache_max_bytes": device_bytes, "num_threads": 1}
    if kind == "tier":
        return base | {"host_kv_cache_bytes": host_bytes}
    if kind in ("stream", "stream-guard"):
        guard = {"stream_tpot_ms": stream_tpot_ms} if kind == "stream-guard" else {}
        return base | {"host_kv_cache_bytes": host_bytes, "layerwise_residency": True} | guard
    if kind == "recompute":
        return base | {"preemption_mode": "recompute"}
    return base | {"preemption_mode": "swap", "swap_space": host_bytes}


def run_once(kind: str, model: str, prompts: list[list[int]], max_tokens: int,
             budget: tuple[int, int, int], stream_tpot_ms: float | None = None) -> dict[str, float]:
    """One burst on a fresh engine: TTFT P50/P99, TPOT P50/P99 and makespan (s), preemption
    counters. TPOT: (finish - first token) / (tokens - 1) per request, so the decode cost of
    streaming (a stage copy per layer per step) shows beside its TTFT gain."""
    from elasticserve import LLM, SamplingParams

    llm = LLM(**_engine_args(kind, model, *budget, stream_tpot_ms=stream_tpot_ms))
    engine = llm.engine
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start = time.monotonic()
        for p in prompts:
            engine.add_request({"prompt_token_ids": p}, params)
        ttft: list[float] = []
        tpot: list[float] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    m = out.metrics
                    ttft.append(m["first_token_time"] - m["arrival_time"])
                    tpot.append((m["finished_time"] - m["first_token_time"]) / max(1, max_tokens - 1))
        makespan = time.monotonic() - start
        engine.check_integrity()
        stats = llm.stats()
    finally:
        engine.close()
    if len(ttft) != len(prompts):
        raise RuntimeError(f"{kind}: {len(prompts) - len(ttft)} requests did not finish")
    return {"ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99), "makespan": makespan,
            "tpot_p50": _pct(tpot, 50), "tpot_p99": _pct(tpot, 99),
            "recomputes": stats["recomputes"], "swaps_out": stats["swaps_out"],
            "offloaded": stats["kv_offloaded_blocks"], "streamed": stats["kv_streamed_steps"],
            "guarded": stats["kv_stream_guarded"], "target_ms": stream_tpot_ms or 0.0}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def budget_for(model: str, count: int, tokens: int) -> tuple[int, int, int]:
    """(device bytes ~ a third of the burst's KV, host bytes = all of it, page size)."""
    import torch

    from elasticserve.engine.kv_storage import kv_block_bytes
    from elasticserve.models.loader import load_config

    block = kv_block_bytes(load_config(model), 16, torch.float32)
    page = 4 * block
    whole = count * -(-tokens // 16) * block
    device = max(page, whole // 3 // page * page)
    return device, whole, page


def measure(model: str, count: int, length: int, max_tokens: int, reps: int
            ) -> dict[str, list[dict[str, float]]]:
    prompts = burst(count, length, seed=0)
    budget = budget_for(model, count, length + max_tokens)
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in CONFIGS}
    run_once("recompute", model, prompts[:2], 4, budget)  # warm-up (loads, kernel build): dropped
    for rep in range(reps):
        order = CONFIGS[rep % len(CONFIGS):] + CONFIGS[:rep % len(CONFIGS)]  # rotate the first
        for kind in order:
            target = None
            if kind == "stream-guard":  # swap ran before it (first rep: CONFIGS' order)
                swap_tpot = statistics.median(r["tpot_p50"] for r in runs["swap"])
                target = GUARD_X_SWAP * swap_tpot * 1000
            runs[kind].append(run_once(kind, model, prompts, max_tokens, budget, target))
    return runs


def report(runs: dict[str, list[dict[str, float]]], setup: str, argv: list[str]) -> str:
    lines = [f"Command: `{docs_section.command_line('elasticserve.bench.host_tier', argv)}`",
             f"- date: {docs_section.today()}; commit: {docs_section.git_commit()}; "
             f"CPU: {docs_section.cpu_model()}; load: {docs_section.load_average()} "
             f"(a shared machine: other jobs ran beside these runs)",
             f"- {setup}", "",
             "| preemption | TTFT P99 ms (median) | spread | TTFT P50 ms | TPOT P50 / P99 ms "
             "| makespan s | spread | recomputes | swap-outs | blocks offloaded "
             "| streamed seq-steps | guard refusals |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, rs in runs.items():
        def med(key: str, rs: list[dict[str, float]] = rs) -> float:
            return statistics.median(r[key] for r in rs)
        p99 = [r["ttft_p99"] for r in rs]
        span = [r["makespan"] for r in rs]
        lines.append(f"| {kind} | {med('ttft_p99') * 1000:.0f} | {spread_pct(p99):.0f}% "
                     f"| {med('ttft_p50') * 1000:.0f} "
                     f"| {med('tpot_p50') * 1000:.1f} / {med('tpot_p99') * 1000:.1f} "
                     f"| {med('makespan'):.2f} "
                     f"| {spread_pct(span):.0f}% | {med('recomputes'):.0f} "
                     f"| {med('swaps_out'):.0f} | {med('offloaded'):.0f} | {med('streamed'):.0f} "
                     f"| {med('guarded'):.0f} |")
    guard = runs.get("stream-guard")
    if guard:
        targets = ", ".join(f"{r['target_ms']:.1f}" for r in guard)
        lines.append(f"\nstream-guard's stream_tpot_ms per run ({GUARD_X_SWAP:g} x swap's TPOT "
                     f"P50 so far): {targets} ms")
    return "\n".join(lines)


def add_burst_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    """The burst's flags, shared with `bench layerwise-onload`."""
    p.add_argument("--model", default=None, help="checkpoint dir (default: a fresh llama "
                                                  "of --size, seed 0)")
    p.add_argument("--size", default="small", choices=["tiny", "small"],
                   help="models/make_model.py size when no --model is given")
    p.add_argument("--requests", type=int, default=16, help="requests in the burst")
    p.add_argument("--prompt-len", type=int, default=256, help="tokens per prompt")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="output tokens per request")
    p.add_argument("--write-docs", action="store_true",
                   help="write the table into docs/BENCHMARKS.md")


def burst_model(args: argparse.Namespace) -> str:
    """`--model`, or a fresh seeded llama of `--size` in a temporary directory."""
    if args.model is not None:
        return str(args.model)
    from elasticserve.models.make_model import make_model
    return make_model("llama", args.size, f"{tempfile.mkdtemp()}/{args.size}-llama", seed=0)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="elasticserve bench host-tier",
                                description=__doc__.splitlines()[0] if __doc__ else "")
    add_burst_args(p, max_tokens=64)
    p.add_argument("--reps", type=int, default=3, help="runs of each kind (order rotated)")
    args = p.parse_args(argv)
    model = burst_model(args)
    runs = measure(model, args.requests, args.prompt_len, args.max_tokens, args.reps)
    setup = (f"{args.requests} requests at once, {args.prompt_len}-token prompts, "
             f"{args.max_tokens} output tokens (ignore_eos), model {args.model or args.size + ' llama'}, "
             f"1 torch thread; device KV ceiling ~1/3 of the burst's KV, host room = all of it; "
             f"{args.reps} runs each, order rotated")
    body = report(runs, setup, argv)
    print(body)
    if args.write_docs:
        docs_section.update_section("host-tier", "### Host KV tier: burst preemption\n\n" + body)


if __name__ == "__main__":
    main()
