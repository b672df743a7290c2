"""Records of a serving benchmark run and the metrics computed from them.

Latencies are kept in seconds in the records and reported in milliseconds. TTFT is measured
from the moment the request was sent (after any client-side concurrency wait, which is
reported separately as ``client_wait``), TPOT as ``(e2e - ttft) / (output_tokens - 1)``, and
inter-token latency (ITL) as the gaps between streamed chunks that carried tokens.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
MIB = float(1 << 20)
MEMORY_WORDS = ("mapped", "used", "cached", "weights")  # fields the memory table shows


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request."""

    model: str
    input_len: int
    max_tokens: int
    scheduled_s: float  # planned send time, relative to the run start
    sent_s: float | None = None  # actual send time (None: never sent)
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    output_tokens: int = 0  # counted from the stream
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    status: int = 0  # HTTP status; 0 when no response came
    error: str | None = None
    failure: str | None = None  # short kind: "503", "timeout", "connect", "stream_error", ...

    @property
    def ok(self) -> bool:
        return self.failure is None and self.status == 200 and self.e2e_s is not None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None without at least two tokens."""
        if not self.ok or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def fail(self, kind: str, message: str) -> None:
        """Mark the request failed (the first failure wins)."""
        if self.failure is None:
            self.failure, self.error = kind, message


@dataclass(slots=True)
class MemorySample:
    """One poll of ``/admin/memory``: per model, every numeric field it reported."""

    t_s: float
    budget_bytes: float | None
    models: dict[str, dict[str, float]]
    states: dict[str, str]


@dataclass(slots=True)
class RunResult:
    """One benchmark run at one request rate."""

    label: str
    rate: float | None
    duration_s: float
    records: list[RequestRecord]
    memory: list[MemorySample] = field(default_factory=list)
    memory_note: str | None = None  # why memory was not (fully) sampled


@dataclass(frozen=True, slots=True)
class SLO:
    """Per-request targets; None means not checked."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    def met(self, rec: RequestRecord) -> bool:
        if not rec.ok:
            return False
        if self.ttft_s is not None and (rec.ttft_s is None or rec.ttft_s > self.ttft_s):
            return False
        tpot = rec.tpot_s
        return self.tpot_s is None or tpot is None or tpot <= self.tpot_s


def distribution(values_s: list[float]) -> dict[str, float | None]:
    """mean and percentiles in milliseconds (None for an empty list)."""
    if not values_s:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values_s, dtype=float) * 1e3
    out: dict[str, float | None] = {"mean": float(arr.mean())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(arr, p))
    return out


def summarize_records(records: list[RequestRecord], duration_s: float, slo: SLO) -> dict[str, Any]:
    """Counts, latency distributions, throughput and SLO attainment of a set of requests."""
    ok = [r for r in records if r.ok]
    duration = max(duration_s, 1e-9)
    out_tokens = sum(r.usage_completion_tokens or r.output_tokens for r in ok)
    in_tokens = sum(r.usage_prompt_tokens or r.input_len for r in ok)
    met = sum(slo.met(r) for r in records)
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "failures": dict(Counter(r.failure or "unknown" for r in records if not r.ok)),
        "output_tokens": out_tokens,
        "input_tokens": in_tokens,
        "token_count_mismatches": sum(r.usage_completion_tokens is not None
                                      and r.usage_completion_tokens != r.output_tokens
                                      for r in ok),
        "request_throughput": len(ok) / duration,
        "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": distribution([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_ms": distribution([gap for r in ok for gap in r.itl_s]),
        "e2e_ms": distribution([r.e2e_s for r in ok if r.e2e_s is not None]),
        "client_wait_ms": distribution([r.sent_s - r.scheduled_s for r in records
                                        if r.sent_s is not None]),
        "slo_met": met,
        "slo_attainment": met / len(records) if records else None,
        "goodput": met / duration,
    }


def memory_summary(samples: list[MemorySample]) -> dict[str, Any]:
    """Peak and mean of each numeric per-model field, plus the budget."""
    per_model: dict[str, dict[str, list[float]]] = {}
    for s in samples:
        for name, fields in s.models.items():
            for key, value in fields.items():
                per_model.setdefault(name, {}).setdefault(key, []).append(value)
    budgets = [s.budget_bytes for s in samples if s.budget_bytes is not None]
    return {
        "samples": len(samples),
        "budget_bytes": budgets[-1] if budgets else None,
        "models": {name: {key: {"peak": max(v), "mean": sum(v) / len(v)}
                          for key, v in fields.items()}
                   for name, fields in per_model.items()},
    }


def summarize(run: RunResult, slo: SLO) -> dict[str, Any]:
    """The whole report of one run (JSON-ready)."""
    models = sorted({r.model for r in run.records})
    return {
        "label": run.label,
        "rate": run.rate,
        "duration_s": run.duration_s,
        "slo": {"ttft_ms": None if slo.ttft_s is None else slo.ttft_s * 1e3,
                "tpot_ms": None if slo.tpot_s is None else slo.tpot_s * 1e3},
        "overall": summarize_records(run.records, run.duration_s, slo),
        "models": {m: summarize_records([r for r in run.records if r.model == m],
                                        run.duration_s, slo) for m in models},
        "memory": memory_summary(run.memory),
        "memory_note": run.memory_note,
        "memory_series": [{"t_s": s.t_s, "models": s.models, "states": s.states}
                          for s in run.memory],
    }


def records_json(run: RunResult) -> list[dict[str, Any]]:
    """Every request of a run, for offline analysis (ITL gaps left out)."""
    keys = ("model", "input_len", "max_tokens", "scheduled_s", "sent_s", "ttft_s", "e2e_s",
            "output_tokens", "status", "failure")
    return [{k: getattr(r, k) for k in keys} for r in run.records]


def goodput_rates(summaries: list[dict[str, Any]]) -> dict[str, float | None]:
    """The highest swept rate whose attainment reaches 90% and 99%."""
    out: dict[str, float | None] = {}
    for target in (0.90, 0.99):
        good = [s["rate"] for s in summaries
                if s["rate"] is not None and (s["overall"]["slo_attainment"] or 0.0) >= target]
        out[f"max_rate_at_{round(target * 100)}pct"] = max(good) if good else None
    return out


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_run(summary: dict[str, Any]) -> str:
    """Markdown tables of one run: throughput and SLO, latencies, memory."""
    rows = [("all", summary["overall"])] + list(summary["models"].items())
    lines = [f"### {summary['label']}" + (f" @ {summary['rate']:g} req/s" if summary["rate"] else ""),
             "", "| model | ok/sent | failed | req/s | out tok/s | total tok/s | SLO attain. "
             "| goodput req/s |", "|---|---|---|---|---|---|---|---|"]
    for name, s in rows:
        att = s["slo_attainment"]
        fails = ", ".join(f"{k}: {v}" for k, v in s["failures"].items()) or "0"
        lines.append(f"| {name} | {s['completed']}/{s['requests']} | {fails} | "
                     f"{s['request_throughput']:.2f} | {s['output_token_throughput']:.1f} | "
                     f"{s['total_token_throughput']:.1f} | "
                     f"{'-' if att is None else f'{att:.1%}'} | {s['goodput']:.2f} |")
    lines += ["", "| model | metric (ms) | mean | P50 | P90 | P99 |", "|---|---|---|---|---|---|"]
    for name, s in rows:
        for metric in ("ttft", "tpot", "itl", "e2e"):
            d = s[f"{metric}_ms"]
            lines.append(f"| {name} | {metric.upper()} | {_fmt(d['mean'])} | {_fmt(d['p50'])} | "
                         f"{_fmt(d['p90'])} | {_fmt(d['p99'])} |")
    lines += ["", *markdown_memory(summary)]
    return "\n".join(lines).rstrip() + "\n"


def markdown_memory(summary: dict[str, Any]) -> list[str]:
    """Peak/mean KV mapped and used per model, or the reason there is none."""
    mem = summary["memory"]
    if not mem["samples"]:
        return [f"KV memory: not sampled ({summary['memory_note'] or 'no samples'})."]
    lines = [f"KV memory ({mem['samples']} samples"
             + (f", budget {mem['budget_bytes'] / MIB:.0f} MiB" if mem["budget_bytes"] else "")
             + "):", "", "| model | field | peak MiB | mean MiB |", "|---|---|---|---|"]
    for name, fields in mem["models"].items():
        for key, v in fields.items():
            if key.endswith("bytes") and any(w in key for w in MEMORY_WORDS):
                lines.append(f"| {name} | {key} | {v['peak'] / MIB:.1f} | {v['mean'] / MIB:.1f} |")
    return lines


def markdown_sweep(summaries: list[dict[str, Any]]) -> str:
    """One row per swept rate, and the goodput rates."""
    lines = ["| rate req/s | ok/sent | SLO attain. | goodput req/s | TTFT P99 ms | TPOT P99 ms |",
             "|---|---|---|---|---|---|"]
    for s in summaries:
        o = s["overall"]
        att = o["slo_attainment"]
        lines.append(f"| {s['rate']:g} | {o['completed']}/{o['requests']} | "
                     f"{'-' if att is None else f'{att:.1%}'} | {o['goodput']:.2f} | "
                     f"{_fmt(o['ttft_ms']['p99'])} | {_fmt(o['tpot_ms']['p99'])} |")
    good = goodput_rates(summaries)
    lines += ["", "Highest rate with >= 90% attainment: "
              f"{_fmt(good['max_rate_at_90pct'], 2)} req/s; with >= 99%: "
              f"{_fmt(good['max_rate_at_99pct'], 2)} req/s."]
    return "\n".join(lines) + "\n"
