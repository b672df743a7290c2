"""Streamed residency (core/sched_stream.py): preempted decodes keep decoding from host blocks.
No torch, no model: a fake runner appends token 7 to every sampled sequence."""

from __future__ import annotations

from elasticserve.config import CacheConfig, SchedulerConfig
from elasticserve.core.block_pool import BlockPool
from elasticserve.core.kv_cache_manager import KVCacheManager
from elasticserve.core.scheduler import Scheduler
from elasticserve.outputs import ScheduledSeq, SchedulerOutput
from elasticserve.request import SequenceGroup, SequenceStatus
from elasticserve.sampling_params import SamplingParams
from tests.core.test_scheduler import run_step

BS = 4


def make(num_blocks: int = 8, host_blocks: int = 64, streaming: bool = True) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks), BS, host_blocks)
    cfg = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64, max_model_len=512)
    cache = CacheConfig(block_size=BS, host_kv_cache_bytes=1 << 20,
                        layerwise_residency=streaming)
    return Scheduler(cfg, cache, kv)


def group(rid: str, prompt_len: int = 6, max_tokens: int = 12, n: int = 1) -> SequenceGroup:
    params = SamplingParams(max_tokens=max_tokens, n=n, temperature=0.8 if n > 1 else 0.0)
    return SequenceGroup.create(rid, None, list(range(1, prompt_len + 1)), params, 0.0)


def on_host_means_no_device_block(s: Scheduler, item: ScheduledSeq) -> None:
    # a streamed row names host blocks: the sequence has no device block at all
    assert item.on_host == s.kv.is_swapped(item.seq_id)


def step(s: Scheduler) -> SchedulerOutput:
    return run_step(s, check=on_host_means_no_device_block)


def test_victims_keep_decoding_from_host_and_come_back() -> None:
    s = make()
    # r0 finishes first: its blocks are the room the streamed groups come back to
    groups = [group(f"r{i}", max_tokens=6 if i == 0 else 20) for i in range(3)]
    for g in groups:
        s.add(g)
    streamed_seen = 0
    for _ in range(200):
        if not s.has_unfinished():
            break
        out = step(s)
        streamed_seen = max(streamed_seen, s.num_streamed())
        # a streamed group decodes every step: nobody is left out of a step
        assert not s.swapped
        assert sum(1 for it in out.scheduled if it.on_host) <= s.stats.kv_streamed_steps
    assert not s.has_unfinished()
    assert streamed_seen > 0 and s.stats.kv_streamed_steps > 0
    assert s.stats.recomputes == 0 and s.stats.preemptions == 0
    assert s.stats.swap_ins > 0  # streamed groups came back to the device when room appeared
    assert [g.seqs[0].num_output_tokens for g in groups] == [6, 20, 20]
    assert s.kv.pool.num_used == 0 and s.kv.host_blocks.num_used == 0


def test_without_the_option_victims_stop() -> None:
    s = make(streaming=False)
    for i in range(3):
        s.add(group(f"r{i}"))
    while s.has_unfinished():
        out = step(s)
        assert not any(it.on_host for it in out.scheduled)
    assert s.stats.kv_streamed_steps == 0 and s.stats.preemptions > 0


def _until_streamed(s: Scheduler) -> SequenceGroup:
    for _ in range(50):
        step(s)
        streamed = [g for g in s.running if s.is_streamed(g)]
        if streamed:
            return streamed[0]
    raise AssertionError("nothing was streamed")


def test_waiting_group_is_admitted_while_groups_are_streamed() -> None:
    s = make()
    for i in range(3):
        s.add(group(f"r{i}", max_tokens=30))
    _until_streamed(s)
    s.add(group("late", prompt_len=4, max_tokens=2))
    admitted = False
    for _ in range(10):
        out = step(s)
        if any(it.request_id == "late" for it in out.scheduled):
            admitted = s.num_streamed() > 0
            break
    assert admitted


def test_abort_of_a_streamed_request_frees_its_host_blocks() -> None:
    s = make()
    for i in range(3):
        s.add(group(f"r{i}", max_tokens=30))
    victim = _until_streamed(s)
    held = len(s.kv.block_table(victim.seqs[0].seq_id))
    used = s.kv.host_blocks.num_used
    assert s.abort(victim.request_id) is victim
    assert s.kv.host_blocks.num_used == used - held
    s.kv.check_integrity()


def test_full_tier_stops_the_streamed_group() -> None:
    s = make(host_blocks=3)
    for i in range(3):
        s.add(group(f"r{i}", max_tokens=30))
    _until_streamed(s)
    for _ in range(40):
        step(s)
        if s.swapped:
            break
    assert s.swapped and s.swapped[0].seqs[0].status is SequenceStatus.SWAPPED
    while s.has_unfinished():
        step(s)
    assert s.kv.host_blocks.num_used == 0


def test_groups_of_several_sequences_are_not_streamed() -> None:
    s = make(num_blocks=8)
    s.add(group("multi", prompt_len=4, max_tokens=20, n=2))
    s.add(group("single", prompt_len=4, max_tokens=20))
    while s.has_unfinished():
        out = step(s)
        assert not any(it.on_host and it.request_id == "multi" for it in out.scheduled)
