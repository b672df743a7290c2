"""The TPOT guard of layer-wise residency (core/stream_guard.py, `stream_tpot_ms`): fed fake step
and stage-copy costs, it stops admission streaming at the target and allows it below. No model."""

from __future__ import annotations

import pytest

from elasticserve.config import CacheConfig
from elasticserve.core.scheduler import Scheduler
from elasticserve.core.stream_guard import StreamGuard
from tests.core.test_scheduler_stream import group, make, step


def test_prediction_is_resident_step_plus_blocks_times_block_cost() -> None:
    g = StreamGuard(target_ms=10.0, alpha=0.5)
    assert g.predict_s(100) is None and g.allows(10**6)  # cold: anything goes
    g.observe(0.004, 0.0, 0)  # a step with nothing streamed: 4 ms, block cost still unknown
    assert g.predict_s(50) == pytest.approx(0.004)  # unknown block cost counts as 0
    g.observe(0.008, 0.002, 10)  # 8 ms of which 2 ms copied 10 blocks: resident 6 ms
    assert g.step_s == pytest.approx(0.005) and g.block_s == pytest.approx(0.0002)
    assert g.predict_s(25) == pytest.approx(0.010)
    assert g.allows(25) and not g.allows(26)
    assert StreamGuard(None).allows(10**9) and not StreamGuard(None).enabled


def _streaming_run(s: Scheduler, step_s: float, block_s: float) -> None:
    """Three long decodes then a late prompt that only fits if some are streamed; after each
    step the engine's numbers: `step_s` resident, `block_s` per streamed block copied."""
    for i in range(3):
        s.add(group(f"r{i}", max_tokens=30))
    for i in range(60):
        if i == 4:
            s.add(group("late", prompt_len=12, max_tokens=2))
        out = step(s)
        blocks = sum(len(it.block_table) for it in out.scheduled if it.on_host)
        s.observe_stream_cost(step_s + blocks * block_s, blocks * block_s, blocks)
        if not s.has_unfinished():
            break
    assert not s.has_unfinished()
    s.kv.check_integrity()


def _guarded(target_ms: float | None) -> Scheduler:
    s = make(num_blocks=8)
    s.cache = CacheConfig(block_size=4, host_kv_cache_bytes=1 << 20, layerwise_residency=True,
                          stream_tpot_ms=target_ms)
    s.stream_guard = StreamGuard(target_ms)
    return s


def test_guard_stops_admission_streaming_at_the_target() -> None:
    # resident 5 ms + 1 ms per streamed block: a 2 ms target is under the resident step alone
    s = _guarded(2.0)
    _streaming_run(s, 0.005, 0.001)
    assert s.stats.streamed_admissions == 0 and s.stats.kv_stream_guarded > 0


def test_guard_allows_streaming_below_the_target() -> None:
    unguarded = _guarded(None)
    _streaming_run(unguarded, 0.005, 0.001)
    assert unguarded.stats.streamed_admissions > 0  # the case the guard is about
    roomy = _guarded(1000.0)  # 1 s: far above 5 ms + a few blocks x 1 ms
    _streaming_run(roomy, 0.005, 0.001)
    assert roomy.stats.streamed_admissions > 0 and roomy.stats.kv_stream_guarded == 0


def _first_decision(target_ms: float) -> tuple[Scheduler, list[int]]:
    """Warm guard (5 ms resident, 1 ms per block); run until the first admission streaming is
    decided. Returns the scheduler and the block counts the guard was asked about."""
    s = _guarded(target_ms)
    s.observe_stream_cost(0.005, 0.0, 0)
    s.stream_guard.block_s = 0.001
    asked: list[int] = []
    allows = s.stream_guard.allows
    s.stream_guard.allows = lambda blocks: asked.append(blocks) or allows(blocks)  # type: ignore
    for i in range(3):
        s.add(group(f"r{i}", max_tokens=30))
    while not asked:
        if len(s.running) == 3 and not s.waiting:
            s.add(group("late", prompt_len=12, max_tokens=2))
        step(s)
    return s, asked


def test_guard_refuses_only_past_the_target() -> None:
    _, asked = _first_decision(1000.0)
    blocks = asked[0]  # what streaming the victims for "late" would stream in all
    assert blocks > 0
    # predicted = 5 ms + blocks x 1 ms: a target at it allows, one just below refuses
    for target, allowed in ((5.05 + blocks, True), (4.95 + blocks, False)):
        s, asked = _first_decision(target)
        assert asked[0] == blocks
        assert (s.stats.streamed_admissions > 0) is allowed, target
        assert s.stats.kv_stream_guarded == (0 if allowed else 1)
