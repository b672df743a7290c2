"""FCFS vs SLO-aware scheduling: TTFT attainment of short requests stuck behind long prompts.

Runs the seeded workload of ``sim/slo_sim.py`` (Poisson short chats with a 1 s TTFT target,
bursts of 3-4K-token prompts with an 8 s target) through the real scheduler under each policy,
plus FCFS with admission control, and prints the attainment side by side; ``--write-docs``
puts the table in docs/BENCHMARKS.md. The engine's step times come from the SLO policy's own
linear cost model (default: the demo model on this CPU), so this is a simulation, not a
measurement of the engine.

    python -m elasticserve.bench.slo --seeds 0 1 2 --write-docs
"""

from __future__ import annotations

import argparse
import sys

from elasticserve import docs_section
from elasticserve.sim.slo_sim import SloResult, SloWorkload, simulate

RUNS = (("fcfs", "none"), ("slo", "none"), ("fcfs", "slo"), ("slo", "slo"))


def _row(seed: int, r: SloResult) -> str:
    n = len(r.ttft_s["short"])
    return (f"| {seed} | {r.policy} | {r.admission} | {r.attainment('short'):.1%} "
            f"| {r.p99('short') * 1000:.0f} | {r.refused('short')}/{n} "
            f"| {r.attainment('long'):.1%} | {r.p99('long') * 1000:.0f} |")


def report(seeds: list[int], duration_s: float, argv: list[str]) -> str:
    """The markdown section: one row per (seed, policy, admission)."""
    w = SloWorkload(duration_s=duration_s)
    lines = [
        f"Command: `{docs_section.command_line('elasticserve.bench.slo', argv)}`",
        f"- date: {docs_section.today()}; commit: {docs_section.git_commit()}; simulated "
        f"(`sim/slo_sim.py`: the real Scheduler, step time a + b*tokens + c*context with the "
        f"default (a, b, c)); engine defaults: 2048-token budget, no prefill chunk cap",
        f"- workload per seed: {duration_s:.0f} s, short requests at {w.short_rate}/s, "
        f"prompts {w.short_prompt[0]}-{w.short_prompt[1]} tokens, TTFT target "
        f"{w.short_ttft_ms:.0f} ms; every {w.long_every_s:.0f} s a burst of {w.long_burst} "
        f"prompts of {w.long_prompt[0]}-{w.long_prompt[1]} tokens, target "
        f"{w.long_ttft_ms:.0f} ms; {w.output_len} output tokens each",
        "",
        "| seed | policy | admission | short within TTFT target | short P99 TTFT ms "
        "| short refused | long within target | long P99 TTFT ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for seed in seeds:
        work = SloWorkload(seed=seed, duration_s=duration_s)
        lines += [_row(seed, simulate(work, policy, adm)) for policy, adm in RUNS]
    lines += ["", "Attainment counts admitted requests only (a refused one got 503 at once)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--duration-s", type=float, default=60.0)
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args(argv)
    body = report(args.seeds, args.duration_s, argv)
    print(body)
    if args.write_docs:
        docs_section.update_section("slo", "### SLO-aware scheduling (simulated)\n\n" + body)


if __name__ == "__main__":
    main()
