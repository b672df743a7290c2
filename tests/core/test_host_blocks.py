"""HostBlocks (the host pool's accounting) and the scheduler's offload-first policy with a
host KV tier: no torch, a fake runner as in test_scheduler.py."""

from __future__ import annotations

from collections import Counter

import pytest

from elasticserve.config import CacheConfig, SchedulerConfig
from elasticserve.core.block_pool import BlockPool
from elasticserve.core.errors import IntegrityError, NoFreeBlocksError
from elasticserve.core.host_blocks import HostBlocks
from elasticserve.core.kv_cache_manager import KVCacheManager
from elasticserve.core.scheduler import Scheduler
from elasticserve.request import SequenceGroup, SequenceStatus
from elasticserve.sampling_params import SamplingParams

BS = 4


def test_lowest_ids_first_and_high_water_follows_frees() -> None:
    host = HostBlocks(8)
    seen: list[int] = []
    host.on_take = seen.append
    a = host.take([10, 11, 12])
    assert sorted(a.values()) == [0, 1, 2] and seen == [3]
    host.incref(a.values())
    host.decref([a[10]])  # id 0 comes free: the next take reuses it before id 3
    b = host.take([20, 21])
    assert sorted(b.values()) == [0, 3] and seen == [3, 4]
    host.incref(b.values())
    assert host.num_used == 4 and host.high_water() == 4
    host.decref([3, 2])
    assert host.high_water() == 2 and host.high_water(below=2) == 2
    host.check_integrity(Counter({0: 1, 1: 1}))


def test_take_is_all_or_nothing_when_mapping_fails() -> None:
    host = HostBlocks(4)

    def refuse(rows: int) -> None:
        raise MemoryError("no host memory")

    host.on_take = refuse
    with pytest.raises(MemoryError):
        host.take([1, 2])
    assert host.num_free == 4
    with pytest.raises(NoFreeBlocksError):
        host.take([1, 2, 3, 4, 5])
    host.incref([0])
    with pytest.raises(IntegrityError):
        host.check_integrity(Counter())


def make(host_blocks: int, host_tier: bool, num_blocks: int = 12) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks), BS, host_blocks)
    cfg = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64, max_model_len=512)
    # swap_min_tokens far above any context here: without the tier, "auto" recomputes all
    cache = CacheConfig(block_size=BS, swap_min_tokens=10_000,
                        host_kv_cache_bytes=1 if host_tier else None)
    return Scheduler(cfg, cache, kv)


def drive(s: Scheduler, count: int = 4, prompt: int = 9, max_tokens: int = 8) -> None:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for i in range(count):
        s.add(SequenceGroup.create(f"r{i}", None, list(range(1 + i, 1 + i + prompt)), params, 0.0))
    for _ in range(300):
        if not s.has_unfinished():
            return
        out = s.schedule()
        s.on_step_done(out)
        for item in out.scheduled:
            seq = s.seqs[item.seq_id]
            if item.sample_seq_ids:
                seq.token_ids.append(7)
                if seq.num_output_tokens >= max_tokens:
                    s.finish_seq(seq, SequenceStatus.FINISHED_LENGTH)
        s.pop_finished_groups()
        s.kv.check_integrity()
    raise AssertionError("no progress")


def test_tier_offloads_short_contexts_that_auto_would_recompute() -> None:
    without = make(host_blocks=64, host_tier=False)
    drive(without)
    assert without.stats.recomputes > 0 and without.stats.kv_offloaded_blocks == 0
    tier = make(host_blocks=64, host_tier=True)
    drive(tier)
    st = tier.stats
    assert st.recomputes == 0 and st.swap_outs > 0
    assert st.kv_offloaded_blocks == st.kv_onloaded_blocks > 0
    assert tier.kv.host_blocks.num_used == 0


def test_a_full_tier_falls_back_to_recompute() -> None:
    s = make(host_blocks=2, host_tier=True)  # no victim's 3+ blocks fit in 2 host blocks
    drive(s)
    assert s.stats.recomputes > 0 and s.stats.kv_offloaded_blocks == 0
