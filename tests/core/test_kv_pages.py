"""ElasticPages: the page accounting the engine and the simulator share (no torch)."""

from __future__ import annotations

import pytest

from elasticserve.core.block_pool import BlockPool
from elasticserve.core.kv_cache_manager import KVCacheManager
from elasticserve.core.kv_pages import ElasticPages, PagePolicy

BS = 4  # tokens per block; 4 blocks per page below


class Actions:
    def __init__(self) -> None:
        self.mapped = 0
        self.copies: list[tuple[int, int]] = []
        self.swapped: list[tuple[int, int]] = []

    def map_pages(self, n: int) -> None:
        self.mapped += n

    def unmap_pages(self, n: int) -> None:
        self.mapped -= n

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self.copies += pairs

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        self.swapped += pairs


class Broker:
    def __init__(self, free: int) -> None:
        self.free = free

    def grant(self, pages: int, at_least: int) -> int:
        got = min(pages, self.free)
        if got < at_least:
            return 0
        self.free -= got
        return got

    def release(self, pages: int) -> None:
        self.free += pages


def make(max_pages: int = 8, reserve: int = 0, shrink_after: float = 0.0,
         broker: Broker | None = None, min_pages: int = 0, keep_peak: float = 0.0):
    now = [0.0]
    actions = Actions()
    pages = ElasticPages(PagePolicy(page_size=4096, block_bytes=1024, min_pages=min_pages,
                                    max_pages=max_pages, reserve_pages=reserve,
                                    shrink_after_s=shrink_after, keep_peak_s=keep_peak),
                         actions, broker, clock=lambda: now[0])
    pool = BlockPool(pages.start(), enable_caching=False)
    kv = KVCacheManager(pool, BS, 16, enable_prefix_caching=False)
    pages.attach(pool, kv, lambda rows: [])
    return pages, pool, kv, actions, now


def add(pages: ElasticPages, kv: KVCacheManager, seq: int, tokens: int) -> None:
    kv.allocate_prompt(seq, [])
    need = kv.num_blocks_needed(seq, tokens, 0)
    if need > kv.num_free_blocks:
        assert pages.grow(need - kv.num_free_blocks)
    kv.append_slots(seq, 0, tokens)


def test_grow_maps_pages_and_the_pool_follows() -> None:
    pages, pool, kv, actions, _ = make(reserve=1)
    assert pages.mapped_pages == actions.mapped == 1 and pool.num_blocks == 4
    add(pages, kv, 1, 4 * BS * 3)  # 12 blocks: 3 pages + 1 reserve
    assert pages.mapped_pages == actions.mapped == 4 and pool.num_blocks == 16
    pages.check_integrity()


def test_shrink_waits_for_hysteresis_then_compacts() -> None:
    pages, pool, kv, actions, now = make(shrink_after=1.0)
    add(pages, kv, 1, 4 * BS * 2)  # blocks 0-7
    add(pages, kv, 2, 4 * BS * 2)  # blocks 8-15
    kv.free(1)  # a hole below seq 2's blocks
    pages.after_step(memory_pressure=False)
    assert pages.mapped_pages == 4  # not yet: the quiet period has just begun
    now[0] = 2.0
    pages.after_step(memory_pressure=False)
    assert pages.mapped_pages == 2 and pages.compactions == 1
    assert sorted(d for _, d in actions.copies) == list(range(8))
    assert all(b < 8 for b in kv.block_table(2))
    pages.check_integrity()
    kv.check_integrity()


def test_a_busy_cache_keeps_its_recent_peak_and_an_idle_one_keeps_nothing() -> None:
    pages, _, kv, actions, now = make(keep_peak=5.0)
    add(pages, kv, 1, 4 * BS * 3)  # 3 pages
    add(pages, kv, 2, 4 * BS)  # 1 page
    pages.after_step(memory_pressure=False)  # peak: 4 live pages
    kv.free(1)
    for t in (1.0, 2.0, 4.9):  # churn: new arrivals would map these again, so keep them
        now[0] = t
        pages.after_step(memory_pressure=False)
        assert pages.mapped_pages == actions.mapped == 4
    now[0] = 5.0  # the peak is 5 s old: drop to what is live now
    pages.after_step(memory_pressure=False)
    assert pages.mapped_pages == 1 and pages.shrink_events == 1
    kv.free(2)
    now[0] = 5.1  # idle: nothing live, nothing kept, however recent the peak
    pages.after_step(memory_pressure=False)
    assert pages.mapped_pages == actions.mapped == 0
    pages.check_integrity()


def test_broker_grants_limit_growth_and_shrink_releases() -> None:
    broker = Broker(free=3)
    pages, pool, kv, _, _ = make(broker=broker)
    kv.allocate_prompt(1, [])
    assert not pages.grow(16)  # needs 4 pages, only 3 free: nothing granted
    assert pages.grow(12) and broker.free == 0
    kv.append_slots(1, 0, 12 * BS)
    kv.free(1)
    pages.maybe_shrink()
    assert pages.mapped_pages == 0 and broker.free == 3


def test_reclaim_tiers_do_not_release_to_the_broker() -> None:
    broker = Broker(free=8)
    pages, pool, kv, _, _ = make(broker=broker)
    add(pages, kv, 1, 4 * BS * 2)
    assert pages.grow(12)
    assert pages.reclaimable()[0] == 3
    assert pages.free_pages(10) == 3  # never below live blocks
    assert broker.free == 8 - 5  # the reclaimer's caller books those 3 pages itself
    with pytest.raises(AssertionError):
        pages.broker = None
        pages.mapped_pages += 1
        pages.check_integrity()


def test_limit_below_use_preempts_first() -> None:
    pages, pool, kv, actions, _ = make()
    add(pages, kv, 1, 4 * BS * 3)
    preempted: list[int] = []

    def preempt(rows: int) -> list[tuple[int, int]]:
        preempted.append(rows)
        kv.free(1)
        return [(0, 0)]

    pages.preempt_to_fit = preempt
    pages.set_limit(1)
    assert preempted == [4] and actions.swapped == [(0, 0)]
    assert pages.mapped_pages == 1 and pages.limit_pages == 1
    assert not pages.grow(8)  # the ceiling holds


def test_static_pages_offer_exactly_max_blocks_and_never_move() -> None:
    # 10 blocks of 1 KiB on 4 KiB pages: 3 pages mapped, the last one only half used
    policy = PagePolicy(page_size=4096, block_bytes=1024, min_pages=3, max_pages=3,
                        reserve_pages=0, shrink_after_s=0.0, keep_peak_s=0.0, max_blocks=10)
    actions = Actions()
    pages = ElasticPages(policy, actions)
    pool = BlockPool(pages.start(), enable_caching=False)
    kv = KVCacheManager(pool, BS, 0, enable_prefix_caching=False)
    pages.attach(pool, kv)
    assert pool.num_blocks == 10 and actions.mapped == 3
    assert not pages.grow(1)
    pages.after_step(memory_pressure=False)
    assert pool.num_blocks == 10 and actions.mapped == 3
    pages.check_integrity()
