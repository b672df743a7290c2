"""Policy comparison: the highest rate scale each policy serves at a TTFT-SLO attainment target.

For each policy, the rate scale is bracketed by doubling or halving from the scenario's start,
then narrowed by geometric bisection. Probes that are certain to fail are cut short (the
simulator stops once more than ``(1 - target) x requests`` have missed the TTFT target).
The comparison then re-runs every policy at one common *reference* scale - the highest scale
``static`` sustains - so latency percentiles are compared under identical load.

Optionally a *ceiling* is searched too: the arbiter with ``CEILING_MEMORY_FACTOR`` times the
device memory, so KV never runs out and only compute and bandwidth limit the rate. No memory
policy can serve more than that on the same cost model.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from elasticserve.sim.metrics import Summary, summarize, summarize_by_model, ttft_attainment
from elasticserve.sim.scenarios import Scenario
from elasticserve.sim.simulator import Policy, SimResult, simulate


@dataclass(frozen=True, slots=True)
class Probe:
    scale: float
    rate: float
    requests: int
    attainment: float
    passed: bool
    stopped_early: bool
    wall_s: float


@dataclass(slots=True)
class PolicyOutcome:
    policy: str
    max_scale: float
    max_rate: float
    probes: list[Probe] = field(default_factory=list)
    reference: SimResult | None = None  # the run at the common reference scale
    at_max: SimResult | None = None  # the run at this policy's own max scale
    summary: Summary | None = None
    by_model: dict[str, Summary] = field(default_factory=dict)


CEILING_MEMORY_FACTOR = 100


@dataclass(slots=True)
class Comparison:
    scenario: Scenario
    seed: int
    target: float
    ref_scale: float
    outcomes: dict[str, PolicyOutcome]
    wall_s: float
    ceiling: PolicyOutcome | None = None  # the arbiter with unbounded memory, when asked for

    def ratio(self, num: str = "arbiter", den: str = "static") -> float:
        """Max-rate ratio of two policies (inf when ``den`` sustains no load at all)."""
        a, b = self.outcomes[num].max_rate, self.outcomes[den].max_rate
        return a / b if b > 0 else math.inf


def run_probe(scn: Scenario, policy: Policy, seed: int, scale: float,
              target: float) -> tuple[Probe, SimResult]:
    """Simulate one rate scale; passed = TTFT attainment >= ``target``."""
    t0 = time.perf_counter()
    reqs = scn.requests(seed, scale)
    limit = int(math.floor((1.0 - target) * len(reqs) + 1e-9))
    cfg = dataclasses.replace(scn.config, max_ttft_violations=limit)
    res = simulate(scn.models, reqs, cfg, policy)
    att = ttft_attainment(res.records, cfg.slo)
    probe = Probe(scale, scn.rate_at(scale), len(reqs), att, att >= target and not res.stopped_early,
                  res.stopped_early, time.perf_counter() - t0)
    return probe, res


def max_scale(scn: Scenario, policy: Policy, seed: int, target: float = 0.99,
              max_steps: int = 6) -> tuple[float, list[Probe], dict[float, SimResult]]:
    """Highest passing scale found, every probe, and the results of passing probes."""
    probes: list[Probe] = []
    passed: dict[float, SimResult] = {}

    def ok(scale: float) -> bool:
        probe, res = run_probe(scn, policy, seed, scale, target)
        probes.append(probe)
        if probe.passed:
            passed[scale] = res
        return probe.passed

    s = scn.start_scale
    if ok(s):
        lo, hi = s, s * 2
        for _ in range(max_steps):
            if not ok(hi):
                break
            lo, hi = hi, hi * 2
        else:
            return lo, probes, passed  # never failed within the search range
    else:
        lo, hi = s / 2, s
        for _ in range(max_steps):
            if ok(lo):
                break
            lo, hi = lo / 2, lo
        else:
            return 0.0, probes, passed
    for _ in range(scn.bisect_iters):
        mid = math.sqrt(lo * hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, probes, passed


def unbounded_memory(scn: Scenario, factor: int = CEILING_MEMORY_FACTOR) -> Scenario:
    """The same scenario on a device with ``factor`` times the memory."""
    dev = scn.config.device
    big = dataclasses.replace(dev, memory_bytes=dev.memory_bytes * factor)
    return dataclasses.replace(scn, config=dataclasses.replace(scn.config, device=big))


def memory_ceiling(scn: Scenario, seed: int = 0, target: float = 0.99) -> PolicyOutcome:
    """The arbiter's max rate when KV memory never runs out: a bound on every memory policy."""
    best, probes, passed = max_scale(unbounded_memory(scn), "arbiter", seed, target)
    return PolicyOutcome(f"arbiter, {CEILING_MEMORY_FACTOR}x memory", best, scn.rate_at(best),
                         probes, at_max=passed.get(best))


def compare(scn: Scenario, seed: int = 0, policies: Sequence[Policy] | None = None,
            target: float = 0.99, ceiling: bool = False) -> Comparison:
    """Max rate per policy (default: the scenario's) at the attainment target, plus every
    policy at the reference scale; with ``ceiling``, also :func:`memory_ceiling`."""
    t0 = time.perf_counter()
    policies = scn.policies if policies is None else policies
    outcomes: dict[str, PolicyOutcome] = {}
    cache: dict[tuple[str, float], SimResult] = {}
    for policy in policies:
        best, probes, passed = max_scale(scn, policy, seed, target)
        cache.update({(policy, s): r for s, r in passed.items()})
        outcomes[policy] = PolicyOutcome(policy, best, scn.rate_at(best), probes,
                                         at_max=passed.get(best))
    bests = [o.max_scale for o in outcomes.values() if o.max_scale > 0]
    ref = outcomes["static"].max_scale if "static" in outcomes else min(bests, default=0.0)
    ref = ref if ref > 0 else min(bests, default=scn.start_scale)
    slo = scn.config.slo
    for policy in policies:
        out = outcomes[policy]
        res = cache.get((policy, ref))
        if res is None:
            res = simulate(scn.models, scn.requests(seed, ref), scn.config, policy)
        out.reference = res
        out.summary = summarize(res.records, slo)
        out.by_model = summarize_by_model(res.records, slo)
    top = memory_ceiling(scn, seed, target) if ceiling else None
    return Comparison(scn, seed, target, ref, outcomes, time.perf_counter() - t0, top)
