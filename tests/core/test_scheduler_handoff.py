"""A sequence whose prompt KV arrives from elsewhere (a prefill/decode hand-off) is admitted by
its KV: blocks for the whole context, one token computed, no prefix lookup; a recompute
preemption drops the KV and the prompt is computed again."""

from __future__ import annotations

from elasticserve.config import CacheConfig, SchedulerConfig
from elasticserve.core.block_pool import BlockPool
from elasticserve.core.kv_cache_manager import KVCacheManager
from elasticserve.core.scheduler import Scheduler
from elasticserve.request import SequenceGroup, SequenceStatus
from elasticserve.sampling_params import SamplingParams

BS = 4


def make(num_blocks: int = 64, mode: str = "recompute") -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks), BS, 0)
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=512)
    cache = CacheConfig(block_size=BS, preemption_mode=mode)  # type: ignore[arg-type]
    return Scheduler(cfg, cache, kv)


def handed_over(rid: str, prompt_len: int, max_tokens: int = 4) -> SequenceGroup:
    """Prompt computed elsewhere, first token already sampled there."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    group = SequenceGroup.create(rid, None, list(range(1, prompt_len + 1)), params, 0.0)
    seq = group.seqs[0]
    seq.token_ids.append(7)
    seq.external_kv_tokens = prompt_len
    return group


def test_handed_over_sequence_computes_one_token_over_its_whole_context() -> None:
    s = make()
    s.add(handed_over("a", 10))
    out = s.schedule()
    [item] = out.scheduled
    assert (item.start_pos, item.token_ids) == (10, [7])  # the first token only, at position 10
    assert item.sample_seq_ids == [item.seq_id]
    assert len(item.block_table) == 3  # ceil(11 / 4): the 10 tokens received + the new one
    assert s.kv.pool.num_used == 3
    assert s.stats.prefix_hit_tokens == 0 and s.stats.prefix_query_tokens == 0
    s.kv.check_integrity()


def test_unadmitted_handoff_keeps_stats_and_retries() -> None:
    s = make(num_blocks=2)  # 3 blocks needed: it cannot be admitted
    s.add(handed_over("a", 10))
    out = s.schedule()
    assert not out.scheduled and s.memory_pressure
    assert s.stats.prefix_hit_tokens == 0
    seq = s.waiting[0].seqs[0]
    assert seq.status is SequenceStatus.WAITING and seq.num_computed_tokens == 0
    assert seq.external_kv_tokens == 10 and s.kv.pool.num_used == 0


def test_recompute_preemption_drops_the_received_kv() -> None:
    s = make()
    group = handed_over("a", 10)
    s.add(group)
    s.schedule()
    s.preempt_to_fit(0)  # the only victim, by recompute
    seq = group.seqs[0]
    assert seq.status is SequenceStatus.WAITING
    assert seq.external_kv_tokens == 0 and s.kv.pool.num_used == 0
    out = s.schedule()  # the whole context (10 prompt + 1 output token) is computed again
    [item] = out.scheduled
    assert (item.start_pos, len(item.token_ids)) == (0, 11)
