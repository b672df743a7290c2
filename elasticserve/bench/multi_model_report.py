"""Comparison and Markdown section of the multi-model benchmark (arbiter vs static split)."""

from __future__ import annotations

import math
from typing import Any

from elasticserve.bench.serve_report import MIB

THRESHOLDS_S = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0)  # TTFT limits the section also counts against
IDLE_TEXT = {  # what budget_for builds each case for; the numbers beside it are measured
    "awake": "sized so the idle model can stay awake: the burst fits the budget minus both "
             "models' weights",
    "sleep": "sized so the burst fits only if the arbiter puts the idle model to sleep (weights "
             "and KV released)",
}


def within(summary: dict[str, Any], limit_s: float) -> int:
    """Requests of a run (``summary["requests"]``) that got their first token within limit."""
    return sum(r["ttft_s"] is not None and r["failure"] is None and r["ttft_s"] <= limit_s
               for r in summary["requests"])


def compare(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Requests within the TTFT SLO and P99 TTFT of both policies, their ratios, and the
    counts within each of ``THRESHOLDS_S``."""
    a, s = summaries["arbiter"]["overall"], summaries["static"]["overall"]
    a99, s99 = a["ttft_ms"]["p99"], s["ttft_ms"]["p99"]
    return {
        "arbiter_within_slo": a["slo_met"], "static_within_slo": s["slo_met"],
        "within_slo_ratio": a["slo_met"] / s["slo_met"] if s["slo_met"] else math.inf,
        "arbiter_ttft_p99_ms": a99, "static_ttft_p99_ms": s99,
        "ttft_p99_ratio": s99 / a99 if a99 and s99 else None,
        "within_s": {f"{t:g}": {p: within(summaries[p], t) for p in ("arbiter", "static")}
                     for t in THRESHOLDS_S},
    }


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _peak_mapped(summary: dict[str, Any]) -> float:
    models = summary["memory"]["models"].values()
    return max((f.get("kv_mapped_bytes", {}).get("peak", 0.0) for f in models), default=0.0)


def _rows(idle: str, budget: dict[str, Any], summaries: dict[str, dict[str, Any]]) -> list[str]:
    rows = []
    for policy in ("arbiter", "static"):
        o = summaries[policy]["overall"]
        att = o["slo_attainment"] or 0.0
        rows.append(f"| {budget['memory_bytes'] / MIB:.0f} MiB, idle {idle} | {policy} | "
                    f"{o['completed']}/{o['requests']} | {o['slo_met']} ({att:.0%}) | "
                    f"{_ms(o['ttft_ms']['p50'])} | {_ms(o['ttft_ms']['p99'])} | "
                    f"{_ms(o['tpot_ms']['p50'])} | {_peak_mapped(summaries[policy]) / MIB:.0f} |")
    return rows


def _within_table(cases: dict[str, dict[str, Any]]) -> list[str]:
    head = "| budget | policy | " + " | ".join(f"<= {t:g} s" for t in THRESHOLDS_S) + " |"
    lines = [head, "|---|---|" + "---|" * len(THRESHOLDS_S)]
    for idle, case in cases.items():
        for policy in ("arbiter", "static"):
            counts = [str(case["compare"]["within_s"][f"{t:g}"][policy]) for t in THRESHOLDS_S]
            lines.append(f"| idle {idle} | {policy} | " + " | ".join(counts) + " |")
    return lines


def markdown_section(scenario: dict[str, Any], peak: dict[str, Any],
                     cases: dict[str, dict[str, Any]], footer: list[str] | None = None,
                     threads: int = 1, calibration_order: list[str] | None = None) -> str:
    """The docs section: setup, one table row per (budget, policy), ratios, the command.
    Every sentence is either computed from the runs or describes what the code did."""
    sc = scenario
    lines = [
        f"Two copies of `{sc.get('model', 'small-llama')}` ({peak['weights_bytes'] / MIB:.0f} "
        "MiB of fp32 weights each, "
        f"{peak['kv_bytes_per_token'] // 1024} KiB of KV per token). Bursts take turns: about "
        f"{sc['burst_rate'] * sc['burst_s']:g} requests within {sc['burst_s']:g} s at the start "
        f"of each model's {sc['slot_s']:g} s turn, {sc['rounds']} rounds (A, B, A, B, ...); "
        f"prompts {sc['input_len']} tokens, outputs {sc['output_len']} tokens. One burst's KV "
        f"peak is {peak['burst_peak_bytes'] / MIB:.0f} MiB ({peak['peak_source']}). TTFT SLO "
        f"{sc['ttft_slo_s']:g} s ({sc.get('ttft_slo_note', 'given')}).", ""]
    for idle, case in cases.items():
        b = case["budget"]
        share = (f" ({b['static_kv_bytes'] / b['burst_peak_bytes']:.0%} of the burst peak)"
                 if b["burst_peak_bytes"] > 0 else "")  # no KV sampled: a run too short
        lines.append(f"- {b['memory_bytes'] / MIB:.0f} MiB budget: {IDLE_TEXT.get(idle, idle)}. "
                     f"Static: {b['static_kv_bytes'] / MIB:.0f} MiB of KV per model{share}; "
                     f"arbiter: up to {b['arbiter_room_bytes'] / MIB:.0f} MiB for the bursting "
                     "model.")
    lines += ["", "| budget | memory policy | completed | within TTFT SLO | TTFT P50 ms "
              "| TTFT P99 ms | TPOT P50 ms | peak KV mapped, one model (MiB) |",
              "|---|---|---|---|---|---|---|---|"]
    for idle, case in cases.items():
        lines += _rows(idle, case["budget"], case["summaries"])
    lines.append("")
    for idle, case in cases.items():
        c = case["compare"]
        lines.append(f"- idle {idle}: **arbiter / static = {c['within_slo_ratio']:.2f}x the "
                     f"requests within the TTFT SLO**; P99 TTFT {_ms(c['arbiter_ttft_p99_ms'])} "
                     f"ms vs {_ms(c['static_ttft_p99_ms'])} ms.")
    lines += ["", "Requests with their first token within each limit:", "",
              *_within_table(cases), "", _method_line(cases, threads, calibration_order),
              *(footer or [])]
    return "\n".join(lines) + "\n"


def _method_line(cases: dict[str, dict[str, Any]], threads: int,
                 calibration_order: list[str] | None) -> str:
    """How the runs were made: servers, threads, and the order the policies ran in."""
    runs = [f"calibration {p}" for p in calibration_order or []]
    runs += [f"{idle} {p}" for idle, case in cases.items()
             for p in case.get("order", ("arbiter", "static"))]
    return (f"Each server is a child process on a free loopback port with `--threads {threads}`, "
            f"one at a time; runs in order: {', '.join(runs)} (which policy goes first "
            "alternates). Each policy ran once per case: no run-to-run spread was measured, so "
            "differences of a few percent (TPOT, say) are not resolved by this run.")
