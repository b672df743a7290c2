"""Per-request priority (lower value first, FCFS within a priority) and failed requests as
records: no torch, no model (the fake runner of test_scheduler)."""

from __future__ import annotations

from collections import deque

import pytest

from elasticserve.config import CacheConfig, SchedulerConfig
from elasticserve.core.block_pool import BlockPool
from elasticserve.core.kv_cache_manager import KVCacheManager
from elasticserve.core.sched_policy import push_back, push_front
from elasticserve.core.scheduler import Scheduler
from elasticserve.outputs import FailedRequest
from elasticserve.request import FinishReason, SequenceGroup
from tests.core.test_scheduler import BS, group, make, run_all, run_step


def prio(rid: str, priority: int, prompt_len: int = 8, max_tokens: int = 4) -> SequenceGroup:
    g = group(rid, prompt_len, max_tokens=max_tokens, first=10 * len(rid) + priority)
    g.priority = priority
    return g


def admission_order(priorities: dict[str, int]) -> list[str]:
    """Request ids in the order they are first scheduled, one running group at a time."""
    s = make(max_seqs=1)
    for rid, p in priorities.items():
        s.add(prio(rid, p))
    order: list[str] = []
    while s.has_unfinished():
        for item in run_step(s).scheduled:
            if item.request_id not in order:
                order.append(item.request_id)
    return order


def test_higher_priority_late_request_is_admitted_first() -> None:
    assert admission_order({"early": 1, "late": 0}) == ["late", "early"]


def test_priorities_admit_in_order_and_fcfs_within_one() -> None:
    assert admission_order({"a": 2, "b": 0, "c": 1, "d": 0, "e": 2}) == ["b", "d", "c", "a", "e"]


def test_equal_priorities_stay_fcfs() -> None:
    assert admission_order({"a": 3, "b": 3, "c": 3}) == ["a", "b", "c"]
    assert admission_order({"a": 0, "b": 0, "c": 0}) == ["a", "b", "c"]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_victim_is_the_low_priority_group(mode: str) -> None:
    s = make(num_blocks=8, mode=mode, caching=False)
    s.add(prio("low", 1, max_tokens=12))
    run_step(s)  # low runs alone first, so it is the earlier of the two
    s.add(prio("high", 0, max_tokens=12))
    victims: list[str] = []
    while s.has_unfinished():
        victims += run_step(s).preempted_request_ids
    assert victims and set(victims) == {"low"}


def test_preempt_to_fit_takes_the_low_priority_group_first() -> None:
    s = make(num_blocks=16, mode="recompute", caching=False)
    s.add(prio("low", 5))
    run_step(s)
    s.add(prio("high", 0))
    run_step(s)
    used = s.kv.pool.num_used
    s.preempt_to_fit(used - 1)
    assert [g.request_id for g in s.running] == ["high"]
    assert [g.request_id for g in s.waiting] == ["low"]
    run_all(s)


def test_queue_order_by_priority_front_and_back() -> None:
    queue: deque[SequenceGroup] = deque()
    for rid, p in [("a", 1), ("b", 0), ("c", 2), ("d", 1)]:
        push_back(queue, prio(rid, p))
    assert [g.request_id for g in queue] == ["b", "a", "d", "c"]
    push_front(queue, prio("back1", 1))  # a preempted group resumes first within its priority
    push_front(queue, prio("back0", 0))
    push_front(queue, prio("back3", 3))
    assert [g.request_id for g in queue] == ["back0", "b", "back1", "a", "d", "c", "back3"]


def test_group_that_outgrows_the_cache_leaves_as_a_failed_record() -> None:
    s = make(num_blocks=4, caching=False)  # 16 token slots
    s.add(big := group("big", 8, max_tokens=20))
    s.add(group("small", 4, max_tokens=2))
    run_all(s)
    failed = s.pop_failed()
    assert [(f.request_id, f.reason) for f in failed] == [("big", FinishReason.ERROR)]
    assert isinstance(failed[0], FailedRequest) and "outgrew" in failed[0].message
    assert big.error == failed[0].message and big.is_finished
    assert all(seq.finish_reason is FinishReason.ERROR for seq in big.seqs)
    assert big not in s.running and big not in s.waiting and big not in s.swapped
    assert s.stats.failed == 1 and s.pop_failed() == []


def test_budget_shortage_is_not_counted_as_memory_shortage() -> None:
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=16,
                          enable_chunked_prefill=False)
    kv = KVCacheManager(BlockPool(64), BS, 0)
    s = Scheduler(cfg, CacheConfig(block_size=BS), kv)
    s.add(group("a", 10))
    s.add(group("b", 10))
    out = run_step(s)  # b's whole prompt does not fit in the 6 tokens a leaves: it waits
    assert [x.request_id for x in out.scheduled] == ["a"]
    assert not s.memory_pressure and s.stats.blocked_on_memory == 0
    run_all(s)
