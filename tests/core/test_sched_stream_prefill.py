"""Streamed prefill (core/sched_stream.py): a prompt whose chunk finds no device blocks is
prefilled from host blocks. No torch, no model: a fake runner appends token 7 when sampled."""

from __future__ import annotations

from elasticserve.config import CacheConfig, SchedulerConfig
from elasticserve.core.block_pool import BlockPool
from elasticserve.core.kv_cache_manager import KVCacheManager
from elasticserve.core.scheduler import Scheduler
from elasticserve.outputs import SchedulerOutput
from elasticserve.request import SequenceGroup
from elasticserve.sampling_params import SamplingParams
from tests.core.test_scheduler import run_step
from tests.core.test_scheduler_stream import on_host_means_no_device_block

BS = 4
BIG = 60  # 16 blocks with its first decode token: twice the 8-block device


def make(budget: int = 64, num_blocks: int = 8, host_blocks: int = 64) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks), BS, host_blocks)
    cfg = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=budget, max_model_len=512)
    cache = CacheConfig(block_size=BS, host_kv_cache_bytes=1 << 20, layerwise_residency=True)
    return Scheduler(cfg, cache, kv)


def group(rid: str, prompt_len: int = BIG, max_tokens: int = 6) -> SequenceGroup:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return SequenceGroup.create(rid, None, list(range(1, prompt_len + 1)), params, 0.0)


def step(s: Scheduler) -> SchedulerOutput:
    out = run_step(s, check=on_host_means_no_device_block)
    assert s.kv.pool.num_used <= s.kv.pool.num_blocks
    return out


def run(s: Scheduler) -> list[SchedulerOutput]:
    outs = []
    for _ in range(100):
        if not s.has_unfinished():
            return outs
        outs.append(step(s))
    raise AssertionError("did not finish")


def test_a_prompt_larger_than_the_device_is_admitted_streamed() -> None:
    s = make(budget=128)
    s.add(group("small", prompt_len=8))
    s.add(group("big"))
    outs = run(s)
    first = {it.request_id: it for it in outs[0].scheduled}
    assert not first["small"].on_host and first["big"].on_host  # both in the first step
    assert len(first["big"].token_ids) == BIG and first["big"].start_pos == 0
    assert s.stats.kv_streamed_prefill_tokens == BIG and s.stats.kv_streamed_steps == 5
    assert s.stats.recomputes == 0 and s.stats.failed == 0 and s.stats.swap_outs == 0
    assert s.kv.pool.num_used == 0 and s.kv.host_blocks.num_used == 0


def test_chunked_prompt_turns_streamed_when_its_next_chunk_does_not_fit() -> None:
    s = make(budget=16)
    s.add(group("big"))
    outs = run(s)
    chunks = [it for o in outs for it in o.scheduled if it.start_pos < BIG]
    assert [len(c.token_ids) for c in chunks] == [16, 16, 16, 12]
    assert [c.on_host for c in chunks] == [False, False, True, True]  # 8 blocks fit, 12 do not
    assert s.stats.swap_outs == 1 and s.stats.kv_offloaded_blocks == 8
    assert s.stats.kv_streamed_prefill_tokens == 28 and s.stats.recomputes == 0


def test_streamed_prefill_takes_host_blocks_for_its_whole_prompt() -> None:
    s = make(budget=16)
    s.add(group("big"))
    for _ in range(3):
        step(s)
    seq = s.running[0].seqs[0]
    assert s.is_streamed(s.running[0]) and seq.num_computed_tokens == 48
    assert len(s.kv.block_table(seq.seq_id)) == 16  # not one block more per chunk


def test_abort_of_a_streamed_prefill_frees_its_host_blocks() -> None:
    s = make(budget=16)
    s.add(group("big"))
    for _ in range(3):
        step(s)
    assert s.is_streamed(s.running[0]) and s.kv.host_blocks.num_used == 16
    s.abort("big")
    assert s.kv.host_blocks.num_used == 0 and s.kv.pool.num_used == 0
    s.kv.check_integrity()


def test_a_prompt_neither_device_nor_tier_holds_fails_and_the_next_runs() -> None:
    s = make(host_blocks=10)
    s.add(group("big"))
    s.add(group("next", prompt_len=8))
    outs = run(s)
    failed = s.pop_failed()
    assert [f.request_id for f in failed] == ["big"]
    assert "16 KV blocks" in failed[0].message and "host KV tier (10 blocks)" in failed[0].message
    assert any(it.request_id == "next" for it in outs[0].scheduled)
    assert s.stats.kv_streamed_prefill_tokens == 0 and s.kv.host_blocks.num_used == 0


def test_a_busy_tier_makes_the_prompt_wait_not_fail() -> None:
    s = make(host_blocks=18)  # one streamed prompt (17 blocks with its outputs) at a time
    groups = [group("big"), group("big2")]
    for g in groups:
        s.add(g)
    run(s)
    assert s.stats.failed == 0 and s.stats.recomputes == 0
    assert [g.seqs[0].num_output_tokens for g in groups] == [6, 6]
    # big2's first 4 tokens ran resident (the budget's rest); it waited for big's host blocks
    assert s.stats.kv_streamed_prefill_tokens == 2 * BIG - 4


def test_a_full_tier_fails_a_streamed_group_the_device_cannot_take_back() -> None:
    s = make(host_blocks=16)  # the prompt fits, its fifth output token's block does not
    s.add(group("big"))
    s.add(group("next", prompt_len=8))
    run(s)
    failed = s.pop_failed()
    assert [f.request_id for f in failed] == ["big"] and "tier is full" in failed[0].message
    assert not s.swapped and s.kv.host_blocks.num_used == 0
