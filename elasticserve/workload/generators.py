"""Seeded synthetic workloads: arrival processes, length distributions, multi-model mixes.

Arrivals are a renewal process in *operational time* mapped through a rate profile: unit-mean
gaps (exponential for Poisson, Gamma with a chosen CV otherwise) give points ``u_j``, and the
request arrives at ``t_j = L^-1(u_j / scale)`` where ``L(t)`` is the integral of the rate
profile. So one seed gives coupled workloads for every ``scale``: a higher rate scale yields
the same requests earlier plus more of them, which keeps rate bisection well-behaved.

Every stream draws from its own named random streams, so adding a model to a mix does not
change the other models' requests.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request to simulate."""

    arrival: float
    model: str
    input_len: int
    output_len: int


# ---- lengths ----------------------------------------------------------------------------
class LengthDist(Protocol):
    def sample(self, rng: random.Random) -> int: ...


@dataclass(frozen=True, slots=True)
class Fixed:
    n: int

    def sample(self, rng: random.Random) -> int:
        return self.n


@dataclass(frozen=True, slots=True)
class Uniform:
    """Integers in ``[lo, hi]``."""

    lo: int
    hi: int

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.lo, self.hi)


@dataclass(frozen=True, slots=True)
class Choice:
    values: tuple[int, ...]
    weights: tuple[float, ...] | None = None

    def sample(self, rng: random.Random) -> int:
        return rng.choices(self.values, self.weights)[0]


@dataclass(frozen=True, slots=True)
class LogNormal:
    """``exp(N(ln median, sigma))`` rounded and clipped to ``[lo, hi]``."""

    median: float
    sigma: float
    lo: int = 1
    hi: int = 1 << 20

    def sample(self, rng: random.Random) -> int:
        x = int(round(math.exp(rng.gauss(math.log(self.median), self.sigma))))
        return min(max(x, self.lo), self.hi)


def fit_lognormal(lengths: Iterable[int], lo: int = 1, hi: int = 1 << 20) -> LogNormal:
    """Maximum-likelihood log-normal of observed lengths (e.g. a replayed trace's columns)."""
    logs = [math.log(max(x, 1)) for x in lengths]
    if len(logs) < 2:
        raise ValueError("need at least two lengths to fit")
    mu = sum(logs) / len(logs)
    sigma = math.sqrt(sum((v - mu) ** 2 for v in logs) / len(logs))
    return LogNormal(math.exp(mu), sigma, lo, hi)


# Chat lengths fitted (maximum likelihood, `elasticserve simulate fit-lengths`) to the public
# Azure LLM inference trace 2023, conversation service (AzureLLMInferenceTrace_conv.csv in
# github.com/Azure/AzurePublicDataset, CC-BY; 19,366 requests, one hour of 2023-11-16; the
# data of Patel et al., "Splitwise", ISCA 2024), clipped to the observed range. The trace is
# multi-modal (prompt medians ~200 and ~1,000 tokens): the fit keeps its centre and spread, not
# its modes, and has a longer tail (P99 prompt 7.5K vs 4.1K). docs/BENCHMARKS.md has the table.
CHAT_INPUT = LogNormal(median=760.0, sigma=0.985, lo=2, hi=14050)
CHAT_OUTPUT = LogNormal(median=151.3, sigma=0.859, lo=7, hi=1000)


# ---- rates ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RateProfile:
    """Piecewise-linear request rate (req/s) through ``points`` ``(t, rate)``; 0 outside.

    Repeat a time to make a step (``(5, 12), (5, 0)``).
    """

    points: tuple[tuple[float, float], ...]
    _cum: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pts = self.points
        if len(pts) < 2:
            raise ValueError("a rate profile needs at least two points")
        if any(b[0] < a[0] for a, b in zip(pts, pts[1:], strict=False)):
            raise ValueError("rate profile times must not decrease")
        if any(r < 0 for _, r in pts):
            raise ValueError("rates must be >= 0")
        cum = [0.0]
        for (t0, r0), (t1, r1) in zip(pts, pts[1:], strict=False):
            cum.append(cum[-1] + (t1 - t0) * (r0 + r1) / 2)
        object.__setattr__(self, "_cum", tuple(cum))

    @staticmethod
    def constant(rate: float, duration: float) -> RateProfile:
        return RateProfile(((0.0, rate), (duration, rate)))

    @staticmethod
    def on_off(rate: float, on_s: float, off_s: float, duration: float,
               off_rate: float = 0.0, start: float = 0.0) -> RateProfile:
        """Bursts: ``rate`` for ``on_s``, then ``off_rate`` for ``off_s``, repeated."""
        # off until `start`: a flat segment, not a ramp from 0 up to the first burst
        pts: list[tuple[float, float]] = [(0.0, off_rate), (start, off_rate)] if start > 0 else []
        t = start
        while t < duration:
            end_on = min(t + on_s, duration)
            pts += [(t, rate), (end_on, rate)]
            end_off = min(end_on + off_s, duration)
            if end_off > end_on:
                pts += [(end_on, off_rate), (end_off, off_rate)]
            t = end_off
        return RateProfile(tuple(pts))

    @property
    def duration(self) -> float:
        return self.points[-1][0]

    @property
    def expected_count(self) -> float:
        """Expected requests at scale 1: the integral of the rate."""
        return self._cum[-1]

    def rate(self, t: float) -> float:
        pts = self.points
        if t < pts[0][0] or t > pts[-1][0]:
            return 0.0
        i = max(bisect.bisect_right([p[0] for p in pts], t) - 1, 0)
        if i >= len(pts) - 1:
            return pts[-1][1]
        (t0, r0), (t1, r1) = pts[i], pts[i + 1]
        return r0 if t1 == t0 else r0 + (r1 - r0) * (t - t0) / (t1 - t0)

    def inverse(self, u: float) -> float | None:
        """The time at which the integrated rate reaches ``u``; None past the end."""
        cum = self._cum
        if u > cum[-1]:
            return None
        i = min(bisect.bisect_left(cum, u), len(cum) - 1)
        i = max(i - 1, 0)
        (t0, r0), (t1, r1) = self.points[i], self.points[i + 1]
        rem = u - cum[i]
        if t1 == t0 or rem <= 0:
            return t0
        a = (r1 - r0) / (2 * (t1 - t0))
        # root of a x^2 + r0 x = rem, written so that it is stable when a ~ 0
        disc = max(r0 * r0 + 4 * a * rem, 0.0)
        x = 2 * rem / (r0 + math.sqrt(disc)) if r0 + math.sqrt(disc) > 0 else 0.0
        return min(t0 + x, t1)


@dataclass(frozen=True, slots=True)
class ArrivalProcess:
    """Arrivals following ``profile``; ``cv`` is the gaps' coefficient of variation
    (1 = Poisson, > 1 bursty Gamma renewal)."""

    profile: RateProfile
    cv: float = 1.0

    def times(self, rng: random.Random, scale: float = 1.0) -> list[float]:
        if scale <= 0 or self.cv <= 0:
            raise ValueError("scale and cv must be > 0")
        shape = 1.0 / (self.cv * self.cv)
        out: list[float] = []
        u = 0.0
        while True:
            # unit-mean gap: Gamma(k, 1/k); k = 1 is exponential
            u += rng.expovariate(1.0) if self.cv == 1.0 else rng.gammavariate(shape, 1.0 / shape)
            t = self.profile.inverse(u / scale)
            if t is None:
                return out
            out.append(t)


def poisson(rate: float, duration: float) -> ArrivalProcess:
    return ArrivalProcess(RateProfile.constant(rate, duration), 1.0)


def gamma(rate: float, cv: float, duration: float) -> ArrivalProcess:
    return ArrivalProcess(RateProfile.constant(rate, duration), cv)


# ---- mixes ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ModelStream:
    """Requests for one model: when they come and how long they are."""

    model: str
    arrivals: ArrivalProcess
    input_len: LengthDist
    output_len: LengthDist


@dataclass(frozen=True, slots=True)
class Workload:
    streams: tuple[ModelStream, ...]

    def generate(self, seed: int, scale: float = 1.0) -> list[RequestSpec]:
        """All requests sorted by arrival; identical for identical (seed, scale)."""
        out: list[RequestSpec] = []
        for i, s in enumerate(self.streams):
            times = s.arrivals.times(random.Random(f"{seed}:{i}:arrivals"), scale)
            lens = random.Random(f"{seed}:{i}:lengths")
            for t in times:
                n_in = s.input_len.sample(lens)
                out.append(RequestSpec(t, s.model, n_in, s.output_len.sample(lens)))
        out.sort(key=lambda r: r.arrival)
        return out


def zipf_weights(n: int, s: float = 1.0) -> list[float]:
    """Popularity of ranks 1..n proportional to ``1 / k**s``, summing to 1."""
    raw = [1.0 / (k ** s) for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def zipf_mix(models: Sequence[str], total_rate: float, duration: float, cv: float,
             input_len: LengthDist, output_len: LengthDist, s: float = 1.0) -> Workload:
    """Each model gets its own renewal process at ``total_rate x zipf weight`` (rank = order
    in ``models``), so every model's stream is bursty with the same CV."""
    streams = tuple(ModelStream(m, gamma(total_rate * w, cv, duration), input_len, output_len)
                    for m, w in zip(models, zipf_weights(len(models), s), strict=True))
    return Workload(streams)
