"""The slo policy's step-time model fitted to the steps as they run, and the step token cap it
sets so that a request arriving during a long prefill waits one short step."""

from __future__ import annotations

import random

import pytest

from elasticserve.config import CacheConfig, SchedulerConfig
from elasticserve.core.block_pool import BlockPool
from elasticserve.core.kv_cache_manager import KVCacheManager
from elasticserve.core.scheduler import Scheduler
from elasticserve.core.slo import MIN_STEP_TOKENS, STEP_SHARE, StepCost, StepCostFit
from elasticserve.request import SequenceGroup
from elasticserve.sampling_params import SamplingParams


def test_the_fit_recovers_the_step_time_model() -> None:
    true = StepCost(0.004, 2e-4, 3e-6)
    fit = StepCostFit(StepCost(0.01, 1e-5, 0.0), every=8)
    rng = random.Random(0)
    for _ in range(64):
        tokens, context = rng.randint(1, 2048), rng.randint(0, 50_000)
        fit.observe(tokens, context, true.step_s(tokens, context) * rng.uniform(0.99, 1.01))
    assert fit.cost.a == pytest.approx(true.a, rel=0.2)
    assert fit.cost.b == pytest.approx(true.b, rel=0.05)
    assert fit.cost.c == pytest.approx(true.c, rel=0.05)


def test_a_coefficient_the_steps_cannot_show_keeps_its_prior() -> None:
    fit = StepCostFit(StepCost(0.01, 1e-5, 7e-6), every=4)
    for tokens in (16, 64, 256, 1024, 32, 512, 128, 8):  # no context read yet
        fit.observe(tokens, 0, 0.002 + 1e-4 * tokens)
    assert fit.cost.c == 7e-6
    assert fit.cost.b == pytest.approx(1e-4) and fit.cost.a == pytest.approx(0.002)


def _scheduler(policy: str, online: bool = True) -> Scheduler:
    config = SchedulerConfig(max_num_batched_tokens=2048, max_model_len=4096, policy=policy,
                             slo_ttft_ms=1000, step_cost=(0.01, 1e-3, 0.0),
                             step_cost_online=online)
    kv = KVCacheManager(BlockPool(1024), 16, 0, False)
    return Scheduler(config, CacheConfig(block_size=16), kv)


def test_the_slo_policy_caps_a_long_prefill_step() -> None:
    params = SamplingParams(max_tokens=4)
    for policy, first_chunk in (("fcfs", 2048), ("slo", int((STEP_SHARE * 1.0 - 0.01) / 1e-3))):
        sched = _scheduler(policy, online=False)
        sched.add(SequenceGroup.create("long", None, list(range(3000)), params, 0.0))
        out = sched.schedule()
        assert [len(s.token_ids) for s in out.scheduled] == [first_chunk]
    assert first_chunk >= MIN_STEP_TOKENS


def test_the_scheduler_times_its_steps_into_the_fit() -> None:
    sched = _scheduler("slo")
    times = iter(float(i) * 0.05 for i in range(10_000))
    sched.clock = lambda: next(times)
    sched.add(SequenceGroup.create("r", None, list(range(100)), SamplingParams(max_tokens=64),
                                   0.0))
    for _ in range(40):
        out = sched.schedule()
        sched.on_step_done(out)
        for item in out.scheduled:  # the engine's sampler: one more token to decode
            sched.seqs[item.seq_id].token_ids.append(1)
    assert sched.cost_fit is not None and len(sched.cost_fit.samples) == 40
    assert sched.slo is not None and sched.slo.cost == sched.cost_fit.cost


def test_a_running_long_prefill_leaves_room_for_a_short_request_under_slo() -> None:
    """FCFS: the running prefill takes the step and the short prompt gets only what is left
    (no first token this step). slo: the step keeps the short prompt's tokens for it."""
    params = SamplingParams(max_tokens=4)
    for policy, short_runs in (("fcfs", False), ("slo", True)):
        sched = _scheduler(policy, online=False)
        sched.clock = lambda: 0.0
        sched.add(SequenceGroup.create("long", None, list(range(4000)), params, 0.0))
        sched.on_step_done(sched.schedule())  # the long prompt is running, mid-prefill
        sched.add(SequenceGroup.create("short", None, list(range(100)), params, 0.0))
        out = sched.schedule()
        done = {s.request_id for s in out.scheduled if s.sample_seq_ids}  # whole prompt in
        assert ("short" in done) == short_runs, policy
        assert out.num_batched_tokens <= 2048
