"""Latency and SLO metrics over simulated request records.

TTFT = first token - arrival; TPOT = (finish - first token) / (output tokens - 1); e2e = finish -
arrival. A request that failed or never produced its first token counts as missing every SLO.
Percentiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from elasticserve.sim.runtime import RequestRecord


@dataclass(frozen=True, slots=True)
class Dist:
    n: int
    mean: float
    p50: float
    p90: float
    p99: float


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """``q`` in [0, 100] of already sorted values; NaN when empty."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def dist(values: Iterable[float]) -> Dist:
    v = sorted(values)
    mean = sum(v) / len(v) if v else math.nan
    return Dist(len(v), mean, percentile(v, 50), percentile(v, 90), percentile(v, 99))


@dataclass(frozen=True, slots=True)
class Summary:
    requests: int
    finished: int
    failed: int
    ttft: Dist
    tpot: Dist
    e2e: Dist
    throughput_tok_s: float  # output tokens of finished requests per second of the run
    ttft_attainment: float
    tpot_attainment: float
    slo_attainment: float  # both TTFT and TPOT met

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Slo:
    """Latency targets. A request's TTFT target grows with its prompt when
    ``ttft_per_token_s`` > 0 (long prefills cannot be fast whatever the memory policy)."""

    ttft_s: float
    tpot_s: float
    ttft_per_token_s: float = 0.0

    def ttft_target(self, r: RequestRecord) -> float:
        return self.ttft_s + self.ttft_per_token_s * r.input_len

    def meets_ttft(self, r: RequestRecord) -> bool:
        return (r.error is None and r.first_token is not None
                and r.first_token - r.arrival <= self.ttft_target(r))

    def meets_tpot(self, r: RequestRecord) -> bool:
        t = r.tpot
        return r.finish is not None and r.error is None and (t is None or t <= self.tpot_s)


def ttft_attainment(records: Sequence[RequestRecord], slo: Slo) -> float:
    """Fraction of requests whose first token met the TTFT target (1.0 when empty)."""
    if not records:
        return 1.0
    return sum(map(slo.meets_ttft, records)) / len(records)


def summarize(records: Sequence[RequestRecord], slo: Slo) -> Summary:
    """Latency distributions, throughput and SLO attainment of ``records``."""
    done = [r for r in records if r.finish is not None and r.error is None]
    ttfts = [r.first_token - r.arrival for r in records if r.first_token is not None]
    tpots = [t for r in done if (t := r.tpot) is not None]
    e2es = [r.finish - r.arrival for r in done if r.finish is not None]
    last = max((r.finish for r in done if r.finish is not None), default=0.0)
    span = last - min(r.arrival for r in records) if done else 0.0
    n = len(records)
    return Summary(
        requests=n, finished=len(done), failed=sum(1 for r in records if r.error is not None),
        ttft=dist(ttfts), tpot=dist(tpots), e2e=dist(e2es),
        throughput_tok_s=sum(r.output_len for r in done) / span if span > 0 else 0.0,
        ttft_attainment=ttft_attainment(records, slo),
        tpot_attainment=sum(map(slo.meets_tpot, records)) / n if n else 1.0,
        slo_attainment=sum(1 for r in records if slo.meets_ttft(r) and slo.meets_tpot(r)) / n
        if n else 1.0,
    )


def summarize_by_model(records: Sequence[RequestRecord], slo: Slo) -> dict[str, Summary]:
    """Per-model summaries, models in order of first appearance."""
    groups: dict[str, list[RequestRecord]] = {}
    for r in records:
        groups.setdefault(r.model, []).append(r)
    return {m: summarize(rs, slo) for m, rs in groups.items()}
