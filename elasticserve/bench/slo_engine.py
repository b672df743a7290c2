"""``elasticserve bench slo-engine``: FCFS vs SLO-aware scheduling on the real engine, side by side.

``bench slo`` runs the scheduler in simulated time; this runs two real ``elasticserve serve``
servers (one worker process each, same threads) with the same model-level TTFT target
(``--slo-ttft-ms``) and the same seeded arrivals: short chat requests (Poisson) with long
prompts arriving among them. Under FCFS a short request that arrives behind a long prompt waits
for the long prompt's prefill steps; under ``--scheduling-policy slo`` the request with the least
slack goes first (a long prompt that cannot make the target anyway goes after the ones that
can). Reported: the share of short requests within the target (attainment), TTFT P50/P99 per
class, output tokens/s; runs alternated (ABBA), medians with their spread.

Run: ``python -m elasticserve.bench.slo_engine --pairs 2 --write-docs``.
"""

from __future__ import annotations

import argparse
import os
import sys

from elasticserve import docs_section
from elasticserve.bench.mixed_load import (
    Load,
    Side,
    add_load_args,
    class_summaries,
    describe,
    load_from_args,
    median_rows,
    run_abba,
    serve_load,
)
from elasticserve.bench.serve_report import SLO

METRICS = (("short_attain", "short TTFT attainment %"), ("short_ttft_p50", "short TTFT P50 ms"),
           ("short_ttft_p99", "short TTFT P99 ms"), ("long_ttft_p50", "long TTFT P50 ms"),
           ("long_ttft_p99", "long TTFT P99 ms"), ("tok_s", "output tok/s"))


def run_side(side: Side, model: str, load: Load, seed: int, target_s: float) -> dict[str, float]:
    run, _ = serve_load(side, model, load, seed)
    summary = class_summaries(run, load, SLO(ttft_s=target_s))
    result = {"short_attain": 100 * float(summary["short"]["slo_attainment"] or 0.0),
              "tok_s": summary["all"]["output_token_throughput"]}
    for cls, _ in load.classes():
        for p in ("p50", "p99"):
            result[f"{cls}_ttft_{p}"] = summary[cls]["ttft_ms"][p]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="elasticserve bench slo-engine", description=__doc__)
    add_load_args(p, short_len="64:16", short_rate=2.0, long_len="3000:8", long_rate=0.1,
                  long_burst=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    p.add_argument("--ttft-ms", type=float, default=1000.0, help="the model's TTFT target")
    args = p.parse_args(argv)
    from elasticserve.models.make_model import ensure_model

    model = ensure_model(size=args.model_size)
    load = load_from_args(args)
    common = ("--threads", str(args.threads), "--slo-ttft-ms", str(args.ttft_ms))
    a = Side("fcfs", ("--scheduling-policy", "fcfs", *common))
    b = Side("slo", ("--scheduling-policy", "slo", *common))
    runs = run_abba(a, b, args.pairs,
                    lambda side, seed: run_side(side, model, load, seed, args.ttft_ms / 1000))
    cmd = docs_section.command_line("elasticserve.bench.slo_engine", argv or sys.argv[1:])
    lines = [f"Command: `{cmd}`",
             f"- date: {docs_section.today()}; commit: {docs_section.git_commit()}; CPU: "
             f"{docs_section.cpu_model()} x {os.cpu_count()}; load before: "
             f"{docs_section.load_average()}; model: {args.model_size}, {args.threads} threads, "
             f"one worker; TTFT target {args.ttft_ms:.0f} ms for every request "
             f"(`--slo-ttft-ms`); {describe(load)}; {args.pairs} ABBA pairs; "
             "spread = (max - min) / median of either side", "",
             *median_rows(runs, a.label, b.label, METRICS)]
    body = "\n".join(lines)
    print(body)
    if args.write_docs:
        docs_section.update_section(
            "slo-engine", "## SLO-aware scheduling on the engine (issue 13)\n\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
