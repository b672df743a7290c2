"""Layer-wise residency on the real engine: preempted decodes keep decoding with their KV in the
host tier (one layer staged at a time), with the same greedy outputs as a roomy device."""

from __future__ import annotations

import pytest

from elasticserve import LLM, SamplingParams
from tests.helpers import run_until_done, tokens_of

KiB, MiB = 1 << 10, 1 << 20
PAGE, BLOCK = 64 * KiB, 16 * KiB  # four 16 KiB tiny-model blocks per page
PARAMS = SamplingParams(max_tokens=24, temperature=0.0)


def burst(count: int = 12, length: int = 60) -> list[list[int]]:
    """Distinct prompts, 12 x ~6 blocks at the end: three times the 24-block device budget."""
    return [[(i * 37 + j * 11 + j * j) % 500 + 3 for j in range(length)] for i in range(count)]


def streaming(model: str, **kw: object) -> LLM:
    return LLM(model, page_size=PAGE, kv_reserve_pages=0, kv_cache_max_bytes=24 * BLOCK,
               host_kv_cache_bytes=2 * MiB, layerwise_residency=True,
               attention_backend="native", **kw)


def _check(llm: LLM) -> None:
    engine = llm.engine
    engine.check_integrity()
    stage = llm.memory_stats().get("kv_stage_bytes", 0)
    llm.most_stage_bytes = max(getattr(llm, "most_stage_bytes", 0), stage)  # type: ignore[attr-defined]
    if engine.scheduler.num_streamed() == 0:
        assert stage == 0  # nobody streams: the stage's memory went back
    for group in engine.scheduler.running:
        if engine.scheduler.is_streamed(group):  # host blocks only, none on the device
            seq = group.seqs[0]
            assert engine.kv_manager.is_swapped(seq.seq_id)
            assert len(engine.kv_manager.block_table(seq.seq_id)) * 16 >= seq.num_computed_tokens


def run(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    engine = llm.engine
    # staggered lengths: early finishers leave room for streamed groups to come back (a burst
    # of equal lengths is admitted at once, partly streamed, and finishes together)
    ids = [engine.add_request({"prompt_token_ids": p}, SamplingParams(
        max_tokens=6 + 6 * (i % 4), temperature=0.0)) for i, p in enumerate(prompts)]
    return tokens_of(run_until_done(engine, each_step=lambda: _check(llm)), ids)


def test_greedy_parity_streamed_vs_roomy_device(tiny_llama: str) -> None:
    on = streaming(tiny_llama)
    roomy = LLM(tiny_llama, page_size=PAGE, attention_backend="native")
    try:
        prompts = burst()
        assert run(on, prompts) == run(roomy, prompts)
        stats = on.stats()
        assert stats["recomputes"] == 0 and stats["kv_streamed_steps"] > 0
        assert stats["kv_offloaded_blocks"] > 0 and stats["kv_onloaded_blocks"] > 0
        assert stats["kv_streamed_layer_bytes"] > 0 and stats["kv_streamed_sequences"] == 0
        assert on.most_stage_bytes > 0 == on.memory_stats()["kv_stage_bytes"]  # type: ignore[attr-defined]
        # every block came back: the tier holds only the host prefix cache's blocks
        cached = stats["host_prefix_cached_blocks"] * BLOCK
        assert on.memory_stats()["host_kv_used_bytes"] == cached
        assert roomy.stats()["kv_streamed_steps"] == 0
        assert on.engine.scheduler.stats.streamed_admissions > 0  # what the guard would stop
        assert stats["kv_stream_guarded"] == 0  # no stream_tpot_ms: no guard
    finally:
        on.engine.close()
        roomy.engine.close()


def test_abort_of_a_streamed_request_frees_its_host_blocks(tiny_llama: str) -> None:
    llm = streaming(tiny_llama)
    engine = llm.engine
    try:
        ids = [engine.add_request({"prompt_token_ids": p}, PARAMS) for p in burst()]
        streamed = None
        for _ in range(200):
            engine.step()
            streamed = next((g for g in engine.scheduler.running
                             if engine.scheduler.is_streamed(g)), None)
            if streamed is not None:
                break
        assert streamed is not None and streamed.request_id in ids
        blocks = len(engine.kv_manager.block_table(streamed.seqs[0].seq_id))
        used = engine.kv_manager.host_blocks.num_used
        engine.abort_request(streamed.request_id)
        assert engine.kv_manager.host_blocks.num_used == used - blocks
        _check(llm)
        run_until_done(engine, each_step=lambda: _check(llm))
        cached = llm.stats()["host_prefix_cached_blocks"]
        assert engine.kv_manager.host_blocks.num_used == cached
    finally:
        engine.close()


def test_tpot_guard_stops_admission_streaming(tiny_llama: str) -> None:
    guarded = streaming(tiny_llama, stream_tpot_ms=1e-3)  # 1 us: every step is over it
    roomy = LLM(tiny_llama, page_size=PAGE, attention_backend="native")
    try:
        # one request first: the guard has measured steps (cold, it allows anything)
        guarded.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=3))
        prompts = burst()
        assert run(guarded, prompts) == run(roomy, prompts)
        stats = guarded.stats()
        assert guarded.engine.scheduler.stats.streamed_admissions == 0
        assert stats["kv_stream_guarded"] > 0 and stats["kv_streamed_prefill_tokens"] == 0
        assert guarded.engine.scheduler.stream_guard.step_s is not None
        guarded.engine.check_integrity()
    finally:
        guarded.engine.close()
        roomy.engine.close()


@pytest.mark.parametrize("kw, match", [({"stream_tpot_ms": 0}, "stream_tpot_ms must be"),
                                       ({"stream_tpot_ms": -5.0}, "stream_tpot_ms must be"),
                                       ({"stream_tpot_ms": "fast"}, "stream_tpot_ms must be"),
                                       ({"stream_tpot_ms": 20.0, "layerwise_residency": False},
                                        "stream_tpot_ms needs layerwise_residency")])
def test_stream_tpot_ms_is_validated(tiny_llama: str, kw: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"host_kv_cache_bytes": MiB, "layerwise_residency": True, **kw}
    with pytest.raises(ValueError, match=match):
        LLM(tiny_llama, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("kw, field", [({"host_kv_cache_bytes": None}, "host_kv_cache_bytes"),
                                       ({"attention_backend": "torch"}, "native")])
def test_needs_the_tier_and_the_native_backend(tiny_llama: str, kw: dict[str, object],
                                               field: str) -> None:
    args: dict[str, object] = {"host_kv_cache_bytes": MiB, "layerwise_residency": True, **kw}
    with pytest.raises(ValueError, match=f"layerwise_residency.*{field}"):
        LLM(tiny_llama, **args)  # type: ignore[arg-type]
