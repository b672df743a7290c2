"""FCFS vs SLO policy on the simulated short-behind-long workload (seeded, no timings)."""

from __future__ import annotations

from elasticserve.sim.slo_sim import SloWorkload, simulate


def test_slo_policy_keeps_short_requests_within_target_where_fcfs_misses() -> None:
    w = SloWorkload(seed=0, duration_s=30.0)
    fcfs = simulate(w, "fcfs")
    slo = simulate(w, "slo")
    assert fcfs.attainment("short") < 0.95
    assert slo.attainment("short") >= 0.99
    assert slo.attainment("long") >= fcfs.attainment("long") - 0.05  # longs still make it
    assert len(slo.ttft_s["short"]) == len(fcfs.ttft_s["short"]) and slo.refused("short") == 0


def test_admission_control_refuses_instead_of_missing() -> None:
    w = SloWorkload(seed=0, duration_s=30.0)
    gated = simulate(w, "fcfs", admission="slo")
    assert gated.refused("short") > 0
    assert gated.attainment("short") > simulate(w, "fcfs").attainment("short")
