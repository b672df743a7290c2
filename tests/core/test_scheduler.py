"""Scheduler tests: no torch, no model. A fake runner appends token 7 to every sampled seq."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest

from elasticserve.config import CacheConfig, SchedulerConfig
from elasticserve.core.block_pool import BlockPool
from elasticserve.core.kv_cache_manager import KVCacheManager
from elasticserve.core.scheduler import Scheduler
from elasticserve.outputs import ScheduledSeq, SchedulerOutput
from elasticserve.request import SequenceGroup, SequenceStatus
from elasticserve.sampling_params import SamplingParams

BS = 4


def make(num_blocks: int = 64, swap_blocks: int = 64, budget: int = 64, max_seqs: int = 16,
         mode: str = "auto", caching: bool = True, grow=None) -> Scheduler:
    pool = BlockPool(num_blocks, enable_caching=caching)
    kv = KVCacheManager(pool, BS, swap_blocks, enable_prefix_caching=caching)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=512)
    cache = CacheConfig(block_size=BS, preemption_mode=mode, swap_min_tokens=8)  # type: ignore[arg-type]
    return Scheduler(cfg, cache, kv, grow=grow)


def group(rid: str, prompt_len: int, max_tokens: int = 4, n: int = 1, first: int = 1) -> SequenceGroup:
    params = SamplingParams(max_tokens=max_tokens, n=n, temperature=0.8 if n > 1 else 0.0)
    return SequenceGroup.create(rid, None, list(range(first, first + prompt_len)), params, 0.0)


def run_step(s: Scheduler, check: Callable[[Scheduler, ScheduledSeq], None] | None = None
             ) -> SchedulerOutput:
    """One engine step with a fake model: every sampled sequence gets token 7. `check` runs
    on each scheduled row before its tokens land."""
    out = s.schedule()
    s.on_step_done(out)
    for item in out.scheduled:
        if check is not None:
            check(s, item)
        parent = s.seqs[item.seq_id]
        grp = next(g for g in s.running if parent in g.seqs)
        seqs = [parent] + [s.fork_seq(grp, parent, cid, i)
                           for i, cid in enumerate(item.sample_seq_ids[1:], start=1)]
        for seq in seqs if item.sample_seq_ids else []:
            seq.token_ids.append(7)
            if seq.num_output_tokens >= grp.params.max_tokens:
                s.finish_seq(seq, SequenceStatus.FINISHED_LENGTH)
    s.pop_finished_groups()
    s.kv.check_integrity()
    return out


def run_all(s: Scheduler, limit: int = 500) -> int:
    steps = 0
    while s.has_unfinished():
        run_step(s)
        steps += 1
        assert steps < limit, "scheduler made no progress"
    assert s.kv.pool.num_used == 0
    return steps


def test_core_imports_no_torch() -> None:
    code = ("import sys, elasticserve.core.scheduler, elasticserve.core.kv_cache_manager; "
            "assert 'torch' not in sys.modules, 'core pulled in torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prefill_then_decode_batches_everyone() -> None:
    s = make()
    for i in range(3):
        s.add(group(f"r{i}", 5 + i))
    out = run_step(s)
    assert [len(x.token_ids) for x in out.scheduled] == [5, 6, 7]
    assert all(x.sample_seq_ids == [x.seq_id] for x in out.scheduled)
    out = run_step(s)
    assert [len(x.token_ids) for x in out.scheduled] == [1, 1, 1]
    assert [x.token_ids for x in out.scheduled] == [[7], [7], [7]]
    run_all(s)


def test_chunked_prefill_respects_budget_and_samples_once() -> None:
    s = make(budget=16)
    s.add(group("long", 40))
    chunks = []
    for _ in range(3):
        out = run_step(s)
        chunks.append((len(out.scheduled[0].token_ids), out.scheduled[0].sample_seq_ids != []))
    assert chunks == [(16, False), (16, False), (8, True)]
    run_all(s)


def test_token_budget_caps_each_step() -> None:
    s = make(budget=10)
    for i in range(5):
        s.add(group(f"r{i}", 6))
    while s.has_unfinished():
        out = run_step(s)
        assert out.num_batched_tokens <= 10


def test_prefix_cache_hit_skips_shared_blocks() -> None:
    s = make()
    s.add(group("a", 13))
    run_all(s)
    s.add(group("b", 13))
    out = run_step(s)
    # 3 full blocks of the 13-token prompt are cached; 12 tokens skipped, 1 computed
    assert out.scheduled[0].start_pos == 12 and len(out.scheduled[0].token_ids) == 1
    assert s.stats.prefix_hit_tokens == 12
    run_all(s)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_frees_and_resumes(mode: str) -> None:
    s = make(num_blocks=8, mode=mode, caching=False)
    s.add(group("a", 8, max_tokens=12))
    s.add(group("b", 8, max_tokens=12))
    seen_preempt = False
    while s.has_unfinished():
        out = run_step(s)
        if out.preempted_request_ids:
            seen_preempt = True
            assert out.preempted_request_ids == ["b"]
            assert bool(out.blocks_to_swap_out) == (mode == "swap")
    assert seen_preempt
    assert s.stats.preemptions >= 1
    assert (s.stats.swap_outs > 0) == (mode == "swap")
    assert s.kv.num_free_swap_blocks == 64


def test_n_children_fork_at_end_of_prompt_and_share_blocks() -> None:
    s = make()
    s.add(group("n3", 6, n=3, max_tokens=3))
    out = run_step(s)
    assert len(out.scheduled) == 1 and len(out.scheduled[0].sample_seq_ids) == 3
    grp = s.running[0]
    assert len(grp.seqs) == 3
    tables = [s.kv.block_table(x.seq_id) for x in grp.seqs]
    assert tables[0] == tables[1] == tables[2]
    out = run_step(s)
    assert len(out.scheduled) == 3
    assert len(out.blocks_to_copy) == 2  # two children copy-on-write the shared last block
    run_all(s)


def test_abort_frees_every_block() -> None:
    s = make()
    s.add(group("a", 9, max_tokens=50))
    s.add(group("b", 9, max_tokens=50))
    run_step(s)
    run_step(s)
    assert s.kv.pool.num_used > 0
    s.abort("a")
    s.abort("b")
    assert not s.has_unfinished()
    assert s.kv.pool.num_used == 0
    s.kv.check_integrity()


def test_grow_callback_is_asked_before_preempting() -> None:
    asks: list[int] = []

    def grow(n: int) -> bool:
        asks.append(n)
        s.kv.pool.resize(s.kv.pool.num_blocks + n)
        return True

    s = make(num_blocks=2, grow=grow)
    s.add(group("a", 20, max_tokens=10))
    run_all(s)
    assert asks and s.stats.preemptions == 0


def test_waiting_head_blocks_when_memory_is_short() -> None:
    s = make(num_blocks=4, caching=False)
    s.add(group("a", 12, max_tokens=2))
    s.add(group("b", 12, max_tokens=2))
    out = run_step(s)
    assert [x.request_id for x in out.scheduled] == ["a"]
    assert s.memory_pressure
    run_all(s)
