"""Workload generators: determinism per seed, rates, burstiness, profiles, lengths, mixes."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from elasticserve.workload.generators import (
    ArrivalProcess,
    Choice,
    Fixed,
    LogNormal,
    ModelStream,
    RateProfile,
    Uniform,
    Workload,
    fit_lognormal,
    gamma,
    poisson,
    zipf_mix,
    zipf_weights,
)


def _cv(times: list[float]) -> float:
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return statistics.pstdev(gaps) / statistics.fmean(gaps)


def _mix() -> Workload:
    return zipf_mix(["a", "b", "c"], total_rate=20, duration=50, cv=2.0,
                    input_len=Uniform(10, 100), output_len=LogNormal(50, 0.5))


def test_same_seed_same_requests_other_seed_different() -> None:
    assert _mix().generate(7) == _mix().generate(7)
    assert _mix().generate(7) != _mix().generate(8)
    reqs = _mix().generate(7)
    assert [r.arrival for r in reqs] == sorted(r.arrival for r in reqs)


def test_adding_a_stream_leaves_other_streams_unchanged() -> None:
    base = Workload((ModelStream("a", poisson(5, 20), Fixed(8), Fixed(8)),))
    more = Workload(base.streams + (ModelStream("b", poisson(5, 20), Fixed(8), Fixed(8)),))
    assert [r for r in more.generate(1) if r.model == "a"] == base.generate(1)


def test_poisson_rate_and_cv() -> None:
    times = poisson(50, 400).times(random.Random(0))
    n = len(times)
    assert abs(n - 20000) < 4 * math.sqrt(20000)
    assert 0.95 < _cv(times) < 1.05
    assert all(0 <= t <= 400 for t in times)


def test_gamma_has_the_requested_cv_and_mean_rate() -> None:
    times = gamma(50, 3.0, 2000).times(random.Random(0))
    assert abs(len(times) / 2000 - 50) < 5  # heavy-tailed gaps: looser than Poisson
    assert 2.6 < _cv(times) < 3.4


def test_ramp_profile_integral_and_inverse() -> None:
    prof = RateProfile(((0, 0), (10, 12), (20, 1), (25, 1), (25, 0)))
    assert prof.expected_count == pytest.approx(60 + 65 + 5)
    assert prof.rate(5) == pytest.approx(6) and prof.rate(15) == pytest.approx(6.5)
    assert prof.rate(30) == 0
    for u in (0.0, 1.0, 30.0, 59.9, 60.0, 100.0, 129.0):
        t = prof.inverse(u)
        assert t is not None
        # integrate the rate numerically up to t
        steps = 20000
        area = sum(prof.rate((i + 0.5) * t / steps) for i in range(steps)) * t / steps
        assert area == pytest.approx(u, abs=1e-2)
    assert prof.inverse(131) is None


def test_ramp_arrivals_follow_the_rate() -> None:
    proc = ArrivalProcess(RateProfile(((0, 0), (100, 40))))  # expected 2000 arrivals
    times = proc.times(random.Random(3))
    first, second = sum(t < 50 for t in times), sum(t >= 50 for t in times)
    assert abs(first - 500) < 4 * math.sqrt(500) and abs(second - 1500) < 4 * math.sqrt(1500)


def test_scale_couples_workloads() -> None:
    proc = ArrivalProcess(RateProfile(((0, 0), (10, 12), (20, 1))), cv=2.0)
    lo, hi = proc.times(random.Random(5), 1.0), proc.times(random.Random(5), 3.0)
    assert len(hi) > 2 * len(lo)
    assert all(h <= l_ for h, l_ in zip(hi, lo, strict=False))  # same points, earlier


def test_on_off_bursts_are_silent_when_off() -> None:
    prof = RateProfile.on_off(rate=30, on_s=2, off_s=3, duration=20)
    times = ArrivalProcess(prof).times(random.Random(0))
    assert times and all((t % 5) <= 2 + 1e-9 for t in times)
    assert abs(len(times) - 240) < 4 * math.sqrt(240)


def test_zipf_weights_and_mix_proportions() -> None:
    w = zipf_weights(4, 1.0)
    assert sum(w) == pytest.approx(1) and w[0] / w[3] == pytest.approx(4)
    reqs = zipf_mix(["a", "b"], 60, 100, 1.0, Fixed(1), Fixed(1)).generate(0)
    share = sum(r.model == "a" for r in reqs) / len(reqs)
    assert share == pytest.approx(2 / 3, abs=0.03)


def test_length_distributions() -> None:
    rng = random.Random(0)
    assert {Uniform(3, 5).sample(rng) for _ in range(200)} == {3, 4, 5}
    assert {Choice((256, 400)).sample(rng) for _ in range(50)} == {256, 400}
    ln = LogNormal(200, 0.8, lo=10, hi=1000)
    xs = [ln.sample(rng) for _ in range(20000)]
    assert min(xs) >= 10 and max(xs) <= 1000
    assert statistics.median(xs) == pytest.approx(200, rel=0.05)
    fit = fit_lognormal(LogNormal(300, 0.6).sample(rng) for _ in range(20000))
    assert fit.median == pytest.approx(300, rel=0.03) and fit.sigma == pytest.approx(0.6, rel=0.05)


def test_bad_profiles_are_rejected() -> None:
    with pytest.raises(ValueError):
        RateProfile(((0, 1),))
    with pytest.raises(ValueError):
        RateProfile(((0, 1), (5, 1), (4, 1)))
    with pytest.raises(ValueError):
        RateProfile(((0, -1), (5, 1)))
    with pytest.raises(ValueError):
        poisson(1, 10).times(random.Random(0), scale=0)


def test_on_off_stays_off_until_start() -> None:
    from elasticserve.workload.generators import RateProfile

    profile = RateProfile.on_off(rate=10.0, on_s=1.0, off_s=1.0, duration=6.0, start=2.0)
    assert profile.rate(1.0) == 0.0 and profile.rate(1.99) == 0.0
    assert profile.rate(2.5) == 10.0 and profile.rate(3.5) == 0.0
