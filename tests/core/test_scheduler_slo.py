"""The "slo" scheduling policy and admission control (core/slo.py): no torch, no model (the
fake runner of test_scheduler), a fake clock."""

from __future__ import annotations

import pickle

import pytest

from elasticserve.config import CacheConfig, SchedulerConfig
from elasticserve.core.block_pool import BlockPool
from elasticserve.core.kv_cache_manager import KVCacheManager
from elasticserve.core.scheduler import Scheduler
from elasticserve.errors import InvalidFieldError, SLOUnattainableError
from elasticserve.request import SequenceGroup
from elasticserve.sampling_params import SamplingParams
from tests.core.test_scheduler import BS, run_all, run_step


def make_slo(policy: str = "slo", admission: str = "none", num_blocks: int = 256,
             budget: int = 64, mode: str = "auto") -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks, enable_caching=False), BS, 64,
                        enable_prefix_caching=False)
    cfg = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=budget, max_model_len=512,
                          policy=policy, admission=admission, step_cost=(0.01, 1e-3, 0.0))
    cache = CacheConfig(block_size=BS, preemption_mode=mode, swap_min_tokens=8,  # type: ignore[arg-type]
                        enable_prefix_caching=False)
    s = Scheduler(cfg, cache, kv)
    s.clock = lambda: 0.0
    return s


def req(rid: str, prompt_len: int, ttft_ms: float | None, max_tokens: int = 4,
        priority: int = 0, arrival: float = 0.0, tpot_ms: float | None = None) -> SequenceGroup:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, slo_ttft_ms=ttft_ms,
                            slo_tpot_ms=tpot_ms)
    g = SequenceGroup.create(rid, None, list(range(1, prompt_len + 1)), params, arrival)
    g.priority = priority
    return g


def first_scheduled(s: Scheduler, groups: list[SequenceGroup]) -> list[str]:
    for g in groups:
        s.add(g)
    return [item.request_id for item in run_step(s).scheduled]


def test_fcfs_admits_the_long_prompt_first_slo_the_short_one() -> None:
    # a 200-token prompt takes every step's 64-token budget; the short one waits behind it
    def groups() -> list[SequenceGroup]:
        return [req("long", 200, 5000), req("short", 8, 100)]
    assert first_scheduled(make_slo("fcfs"), groups()) == ["long"]
    assert first_scheduled(make_slo("slo"), groups()) == ["short", "long"]


def test_hopeless_requests_go_after_those_that_can_make_it() -> None:
    # "late" arrived long ago: its deadline has passed, so it yields to "ok" (more slack)
    s = make_slo()
    assert first_scheduled(s, [req("late", 60, 50, arrival=-1.0), req("ok", 60, 1000)]) \
        == ["ok", "late"]


def test_requests_without_target_go_after_those_with_one() -> None:
    assert first_scheduled(make_slo(), [req("none", 60, None), req("t", 60, 1000)]) \
        == ["t", "none"]


def test_priority_wins_over_slack() -> None:
    s = make_slo()
    got = first_scheduled(s, [req("tight", 60, 20, priority=1), req("loose", 60, 9000)])
    assert got == ["loose", "tight"]


def test_victim_is_the_running_group_with_the_most_slack() -> None:
    s = make_slo(num_blocks=12, mode="recompute", budget=64)
    s.add(req("tight", 16, 200, max_tokens=40, tpot_ms=10))
    s.add(req("loose", 16, 60_000, max_tokens=40, tpot_ms=10_000))
    victims: list[str] = []
    while s.has_unfinished():
        victims += run_step(s).preempted_request_ids
    assert victims and set(victims) == {"loose"}


def test_fcfs_victim_stays_the_latest_group() -> None:
    s = make_slo("fcfs", num_blocks=12, mode="recompute", budget=64)
    s.add(req("loose", 16, 60_000, max_tokens=40))
    s.add(req("tight", 16, 200, max_tokens=40))
    victims: list[str] = []
    while s.has_unfinished():
        victims += run_step(s).preempted_request_ids
    assert victims and set(victims) == {"tight"}


def test_admission_refuses_a_request_the_queue_makes_late() -> None:
    s = make_slo(policy="fcfs", admission="slo")
    s.add(req("big", 400, None))  # 400 tokens ahead: ~7 steps of 74 ms
    s.add(req("patient", 8, 5000))
    with pytest.raises(SLOUnattainableError) as info:
        s.add(req("hurried", 8, 100))
    assert info.value.retry_after_s >= 1 and "slo_ttft_ms" in str(info.value)
    assert [g.request_id for g in s.waiting] == ["big", "patient"]  # nothing was queued
    run_all(s)
    s.add(req("hurried", 8, 100))  # the queue is empty now: admitted


def test_admission_off_queues_everything() -> None:
    s = make_slo(policy="fcfs")
    s.add(req("big", 400, None))
    s.add(req("hurried", 8, 1))
    assert len(s.waiting) == 2


def test_unattainable_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(SLOUnattainableError("late", retry_after_s=7)))
    assert isinstance(err, SLOUnattainableError) and err.retry_after_s == 7
    assert str(err) == "late" and not isinstance(err, ValueError)


def test_fcfs_builds_no_slo_policy() -> None:
    assert make_slo("fcfs").slo is None
    assert make_slo("slo").slo is not None


@pytest.mark.parametrize("field,value", [("policy", "edf"), ("admission", "yes"),
                                         ("slo_ttft_ms", 0), ("slo_tpot_ms", -1.0),
                                         ("step_cost", (1.0, -1.0, 0.0))])
def test_bad_slo_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("field,value", [("slo_ttft_ms", 0), ("slo_tpot_ms", "fast"),
                                         ("slo_ttft_ms", float("inf"))])
def test_bad_request_targets_name_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidFieldError) as info:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    assert info.value.param == field
