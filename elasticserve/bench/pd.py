"""``elasticserve bench pd``: prefill/decode disaggregation vs colocated serving, side by side.

Each side is a real ``elasticserve serve`` child process driven over HTTP by the same client
with the same arrivals, runs alternated (ABBA), medians reported with their spread:

* **colocated**: one worker process of the model with ``--threads T``;
* **P/D**: ``--pd m=1:1``, a prefill and a decode worker with ``T / 2`` threads each (the same
  total CPU threads), KV handed over by page ownership (or ``--kv-handoff copy``).

The load mixes short chat requests that decode for a while (Poisson arrivals) with long
prompts arriving among them: colocated, a long prefill shares the decodes' steps and stalls
them; disaggregated, decodes never wait behind a prefill, but each phase has half the cores.
Reported per class: TTFT P50/P99, TPOT P50/P99 (short requests), output tokens/s.

Run: ``python -m elasticserve.bench.pd --pairs 2 --write-docs``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import urllib.request

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

METRICS = (("short_ttft_p50", "short TTFT P50 ms"), ("short_ttft_p99", "short TTFT P99 ms"),
           ("short_tpot_p50", "short TPOT P50 ms"), ("short_tpot_p99", "short TPOT P99 ms"),
           ("long_ttft_p50", "long TTFT P50 ms"), ("long_ttft_p99", "long TTFT P99 ms"),
           ("tok_s", "output tok/s"))


def run_side(side: Side, model: str, load: Load, seed: int) -> dict[str, float]:
    """One server of `side` under the load; latency percentiles per request class."""
    run, result = serve_load(side, model, load, seed, after=handoff_metrics)
    summary = class_summaries(run, load)
    for cls, _ in load.classes():
        s = summary[cls]
        for metric in ("ttft", "tpot"):
            for p in ("p50", "p99"):
                result[f"{cls}_{metric}_{p}"] = s[f"{metric}_ms"][p]
    result["tok_s"] = summary["all"]["output_token_throughput"]
    return result


def handoff_metrics(url: str) -> dict[str, float]:
    """The P/D counters from the server's /metrics (none for a colocated server)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        for key in ("kv_handoff_latency_seconds_sum", "kv_handoff_latency_seconds_count",
                    "kv_handoff_pages_total", "kv_handoff_bytes_copied_total",
                    "kv_handoff_sequences_total"):
            if name.startswith(f"elasticserve:{key}{{"):
                values[key] = values.get(key, 0.0) + float(value)
    count = values.get("kv_handoff_latency_seconds_count", 0.0)
    if not count:
        return {}
    return {"handoff_ms": 1000 * values["kv_handoff_latency_seconds_sum"] / count,
            "handoff_pages": values.get("kv_handoff_pages_total", 0.0) / count,
            "handoff_bytes_copied": values.get("kv_handoff_bytes_copied_total", 0.0)}


def handoff_line(runs: list[dict[str, float]]) -> str:
    if not all("handoff_ms" in r for r in runs):
        return ""
    return (f"P/D hand-offs: mean {statistics.median(r['handoff_ms'] for r in runs):.2f} ms "
            "from the prefill worker handing a request over to its KV in the decode worker's "
            f"blocks (median of runs); {statistics.median(r['handoff_pages'] for r in runs):.1f} "
            f"pages changed owner per request; bytes copied "
            f"{max(r['handoff_bytes_copied'] for r in runs):.0f}.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="elasticserve bench pd", description=__doc__)
    add_load_args(p, short_len="48:96", short_rate=2.0, long_len="1536:8", long_rate=0.25)
    p.add_argument("--threads", type=int, default=2, help="total torch threads per side")
    p.add_argument("--kv-handoff", choices=["pages", "copy"], default="pages",
                   help="how the P/D side hands KV over")
    p.add_argument("--memory", default="2GiB", help="each server's --memory")
    args = p.parse_args(argv)
    from elasticserve.models.make_model import ensure_model

    model = ensure_model(size=args.model_size)
    load = load_from_args(args)
    half = str(max(1, args.threads // 2))
    a = Side("colocated", ("--threads", str(args.threads), "--memory", args.memory))
    b = Side("P/D 1:1", ("--pd", "m=1:1", "--kv-handoff", args.kv_handoff, "--threads", half,
                         "--memory", args.memory))
    runs = run_abba(a, b, args.pairs, lambda side, seed: run_side(side, model, load, seed))
    lines = [f"Command: `{docs_section.command_line('elasticserve.bench.pd', argv or sys.argv[1:])}`",
             f"- date: {docs_section.today()}; commit: {docs_section.git_commit()}; CPU: "
             f"{docs_section.cpu_model()} x {os.cpu_count()}; load before: "
             f"{docs_section.load_average()}; model: {args.model_size}; {describe(load)}; "
             f"colocated {args.threads} threads, P/D {half} + {half}; {args.pairs} ABBA pairs; "
             "spread = (max - min) / median of either side", "",
             *median_rows(runs, a.label, b.label, METRICS),
             "", handoff_line(runs[b.label])]
    body = "\n".join(lines)
    print(body)
    if args.write_docs:
        docs_section.update_section("pd", "## Prefill/decode disaggregation (issue 12)\n\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
