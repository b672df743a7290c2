"""Per-request prefill cap (long_prefill_token_threshold): no torch, no model."""

from __future__ import annotations

import pytest

from elasticserve.config import CacheConfig, SchedulerConfig
from elasticserve.core.block_pool import BlockPool
from elasticserve.core.kv_cache_manager import KVCacheManager
from elasticserve.core.scheduler import Scheduler
from elasticserve.engine.args import EngineArgs
from elasticserve.request import SequenceGroup
from elasticserve.sampling_params import SamplingParams
from tests.core.test_scheduler import run_step

BS = 16
BUDGET = 8192
LONG = 100_000


def make(threshold: int) -> Scheduler:
    pool = BlockPool(LONG // BS + 256, enable_caching=True)
    kv = KVCacheManager(pool, BS, 64, enable_prefix_caching=True)
    cfg = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=BUDGET,
                          max_model_len=LONG + 1024, long_prefill_token_threshold=threshold)
    return Scheduler(cfg, CacheConfig(block_size=BS), kv)


def prompt(rid: str, n: int, first: int, max_tokens: int = 8) -> SequenceGroup:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return SequenceGroup.create(rid, None, list(range(first, first + n)), params, 0.0)


def run_long_then_short(threshold: int) -> tuple[dict[str, int], list[int]]:
    """Step at which each request's prefill ends (it first samples); tokens per step."""
    s = make(threshold)
    s.add(prompt("long", LONG, first=1))
    # distinct tokens: the short prompt must not hit the long one's prefix cache
    s.add(prompt("short", 100, first=1_000_000))
    prefilled: dict[str, int] = {}
    tokens: list[int] = []
    step = 0
    while s.has_unfinished():
        step += 1
        assert step < 500, "scheduler made no progress"
        out = run_step(s)
        tokens.append(out.num_batched_tokens)
        for item in out.scheduled:
            if item.sample_seq_ids:
                prefilled.setdefault(item.request_id, step)
    assert s.kv.pool.num_used == 0
    s.kv.check_integrity()
    s.kv.pool.check_integrity()
    return prefilled, tokens


def test_threshold_lets_a_short_request_past_a_long_prefill() -> None:
    prefilled, tokens = run_long_then_short(2048)
    assert prefilled["short"] == 1  # its whole prompt shares the very first step
    assert prefilled["long"] == -(-LONG // 2048)  # 49 chunks of at most 2048 tokens
    assert tokens[0] == 2048 + 100
    # the short one decodes alongside the long prefill: 2048 + 1 tokens while both run
    assert tokens[1:7] == [2048 + 1] * 6 and max(tokens) <= BUDGET


def test_without_threshold_the_short_request_waits_for_the_whole_prefill() -> None:
    prefilled, tokens = run_long_then_short(0)
    chunks = -(-LONG // BUDGET)  # 13 steps of the full budget
    assert prefilled == {"long": chunks, "short": chunks}
    assert tokens[: chunks - 1] == [BUDGET] * (chunks - 1)


def test_threshold_larger_than_the_prompt_changes_nothing() -> None:
    s = make(4096)
    s.add(prompt("a", 300, first=1))
    s.add(prompt("b", 200, first=10_000))
    out = run_step(s)
    assert [len(x.token_ids) for x in out.scheduled] == [300, 200]


@pytest.mark.parametrize("bad", [-1, 1.5, "2048", True, None])
def test_threshold_validation_names_the_field(bad: object) -> None:
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        SchedulerConfig(long_prefill_token_threshold=bad)  # type: ignore[arg-type]


def test_engine_args_pass_the_threshold_on() -> None:
    args = EngineArgs(model="m", long_prefill_token_threshold=512)
    assert args.scheduler_config(4096).long_prefill_token_threshold == 512
    assert EngineArgs(model="m").scheduler_config(4096).long_prefill_token_threshold == 0
