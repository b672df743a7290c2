"""Layer-wise onload vs blocking onload: a burst forced through the host KV tier, side by side.

The burst of bench/host_tier.py (every request at once, the device KV ceiling ~ a third of the
burst's KV, a host tier that holds all of it) runs with `layerwise_onload` off (`blocking`: a
step's swap-in is copied for every layer before the forward pass) and on (`layerwise`: copied
layer by layer on a helper thread, layer i waiting only for its own copies). The two run in
ABBA order, `--pairs` times each; per run we record TTFT P50/P99, the makespan and the median
wall time of the engine steps that had a swap-in, the time the step's thread spent on
onload copies (copying or waiting for a layer) and the process's CPU time; the table gives
medians over runs and their spread = (max - min) / median. `--write-docs` puts it in docs/BENCHMARKS.md.

    python -m elasticserve.bench.layerwise --pairs 4 --write-docs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from elasticserve import docs_section
from elasticserve.bench.fairness import abba, diff_pct, noise_pct, spread_pct, verdict
from elasticserve.bench.host_tier import _pct, add_burst_args, budget_for, burst, burst_model

CONFIGS = ("blocking", "layerwise")


def run_once(layerwise: bool, model: str, prompts: list[list[int]], max_tokens: int,
             budget: tuple[int, int, int], warm_up: bool = False) -> dict[str, float]:
    """One burst on a fresh engine: TTFT P50/P99, makespan (s), the median seconds of a step
    with a swap-in, how many such steps and how many went layer-wise (`warm_up`: a burst too
    small to swap, whose numbers are dropped)."""
    from elasticserve import LLM, SamplingParams

    device, host, page = budget
    llm = LLM(model, page_size=page, kv_reserve_pages=0, kv_cache_max_bytes=device,
              num_threads=1, host_kv_cache_bytes=host, layerwise_onload=layerwise)
    engine, stats = llm.engine, llm.engine.scheduler.stats
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start, cpu0 = time.monotonic(), _cpu_s()
        for p in prompts:
            engine.add_request({"prompt_token_ids": p}, params)
        ttft: list[float] = []
        onload_steps: list[float] = []
        while engine.has_unfinished_requests():
            before, t0 = stats.kv_onloaded_blocks, time.perf_counter()
            outs = engine.step()
            if stats.kv_onloaded_blocks > before:  # this step scheduled a swap-in
                onload_steps.append(time.perf_counter() - t0)
            ttft += [o.metrics["first_token_time"] - o.metrics["arrival_time"]
                     for o in outs if o.finished]
        makespan, cpu = time.monotonic() - start, _cpu_s() - cpu0
        engine.check_integrity()
        copier, stall = engine.runner.layerwise, engine.runner.onload_stall_s
    finally:
        engine.close()
    if len(ttft) != len(prompts) or not (onload_steps or warm_up):
        raise RuntimeError(f"layerwise={layerwise}: {len(prompts) - len(ttft)} requests did "
                           f"not finish, {len(onload_steps)} steps had a swap-in")
    return {"ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99), "makespan": makespan,
            "onload_step": statistics.median(onload_steps or [0.0]), "onload_steps": len(onload_steps),
            "layerwise_jobs": copier.jobs if copier is not None else 0,
            "onloaded": stats.kv_onloaded_blocks, "stall": stall, "cpu": cpu}


def _cpu_s() -> float:
    """This process's CPU seconds (every thread): the work done, whatever the machine's load
    did to the wall clock."""
    t = os.times()
    return t.user + t.system


def measure(model: str, count: int, length: int, max_tokens: int, pairs: int
            ) -> dict[str, list[dict[str, float]]]:
    prompts = burst(count, length, seed=0)
    budget = budget_for(model, count, length + max_tokens)
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in CONFIGS}
    run_once(False, model, prompts[:2], 4, budget, warm_up=True)  # warm-up (loads, kernel build): dropped
    for order in abba("blocking", "layerwise", pairs):
        for kind in order:
            runs[kind].append(run_once(kind == "layerwise", model, prompts, max_tokens, budget))
    return runs


def report(runs: dict[str, list[dict[str, float]]], setup: str, argv: list[str]) -> str:
    lines = [f"Command: `{docs_section.command_line('elasticserve.bench.layerwise', argv)}`",
             f"- date: {docs_section.today()}; commit: {docs_section.git_commit()}; "
             f"CPU: {docs_section.cpu_model()}; load: {docs_section.load_average()} "
             f"(a shared machine: other jobs ran beside these runs)",
             f"- {setup}", "",
             "| onload | TTFT P50 ms | spread | TTFT P99 ms | spread | swap-in step ms "
             "| spread | makespan s | swap-in steps | of them layer-wise | blocks onloaded "
             "| onload ms on the step's path (total) | process CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, rs in runs.items():
        def col(key: str, scale: float = 1.0, rs: list[dict[str, float]] = rs) -> list[float]:
            return [r[key] * scale for r in rs]
        cells = []
        for key in ("ttft_p50", "ttft_p99", "onload_step"):
            cells += [f"{statistics.median(col(key, 1000)):.1f}", f"{spread_pct(col(key)):.0f}%"]
        lines.append(f"| {kind} | {' | '.join(cells)} "
                     f"| {statistics.median(col('makespan')):.2f} | "
                     + " | ".join(f"{statistics.median(col(k)):.0f}"
                                  for k in ("onload_steps", "layerwise_jobs", "onloaded"))
                     + f" | {statistics.median(col('stall', 1000)):.2f} "
                     f"| {statistics.median(col('cpu')):.2f} |")
    lines.append("")
    for key, name in (("ttft_p50", "TTFT P50"), ("ttft_p99", "TTFT P99"),
                      ("onload_step", "swap-in step time"),
                      ("stall", "onload time on the step's path"), ("cpu", "process CPU time")):
        a = [r[key] for r in runs["layerwise"]]
        b = [r[key] for r in runs["blocking"]]
        d, noise = diff_pct(a, b), noise_pct(a, b)
        lines.append(f"- {name}: layer-wise {d:+.1f}% vs blocking (noise {noise:.0f}%): "
                     f"{verdict(-d, noise, above='layer-wise faster', below='layer-wise slower')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="elasticserve bench layerwise-onload",
                                description=__doc__.splitlines()[0] if __doc__ else "")
    add_burst_args(p, max_tokens=128)
    p.add_argument("--pairs", type=int, default=4, help="ABBA pairs of runs")
    args = p.parse_args(argv)
    model = burst_model(args)
    runs = measure(model, args.requests, args.prompt_len, args.max_tokens, args.pairs)
    setup = (f"{args.requests} requests at once, {args.prompt_len}-token prompts, "
             f"{args.max_tokens} output tokens (ignore_eos), model "
             f"{args.model or args.size + ' llama'}, 1 torch thread (+ the copier thread); "
             f"device KV ceiling ~1/3 of the burst's KV, host tier = all of it; "
             f"{args.pairs} ABBA pairs")
    body = report(runs, setup, argv)
    print(body)
    if args.write_docs:
        docs_section.update_section(
            "layerwise-onload", "### Layer-wise onload vs blocking onload\n\n" + body)


if __name__ == "__main__":
    main()
