"""Streamed prefill on the real engine: a prompt whose KV is twice the device's ceiling is
prefilled from the host tier (one layer staged at a time), with the greedy outputs of a roomy
device; abort frees its host blocks; a prompt neither can hold is refused, the engine serves on."""

from __future__ import annotations

import pytest

from elasticserve import LLM, SamplingParams
from elasticserve.errors import PromptTooLargeError
from tests.helpers import run_until_done, tokens_of

KiB, MiB = 1 << 10, 1 << 20
PAGE, BLOCK = 64 * KiB, 16 * KiB  # four 16 KiB tiny-model blocks per page; 16 tokens a block
DEVICE_BLOCKS = 24
PARAMS = SamplingParams(max_tokens=12, temperature=0.0)


def prompt(length: int, seed: int = 0) -> list[int]:
    return [(seed * 37 + j * 11 + j * j) % 500 + 3 for j in range(length)]


BIG = prompt(2 * DEVICE_BLOCKS * 16 - 8)  # ~2x the device ceiling in KV


def streaming(model: str, **kw: object) -> LLM:
    return LLM(model, page_size=PAGE, kv_reserve_pages=0,
               kv_cache_max_bytes=DEVICE_BLOCKS * BLOCK, host_kv_cache_bytes=2 * MiB,
               layerwise_residency=True, attention_backend="native", **kw)


def _check(llm: LLM) -> None:
    engine = llm.engine
    engine.check_integrity()
    stage = llm.memory_stats().get("kv_stage_bytes", 0)
    llm.most_stage_bytes = max(getattr(llm, "most_stage_bytes", 0), stage)  # type: ignore[attr-defined]
    if llm.engine.cache_config.layerwise_residency:
        assert engine.kv_manager.pool.num_used <= DEVICE_BLOCKS
    for group in engine.scheduler.running:
        if engine.scheduler.is_streamed(group):  # host blocks only, none on the device
            seq = group.seqs[0]
            assert len(engine.kv_manager.block_table(seq.seq_id)) * 16 >= seq.num_computed_tokens


def run(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    engine = llm.engine
    ids = [engine.add_request({"prompt_token_ids": p}, PARAMS) for p in prompts]
    return tokens_of(run_until_done(engine, each_step=lambda: _check(llm)), ids)


@pytest.fixture(scope="module")
def roomy_outputs(tiny_llama: str) -> list[list[int]]:
    roomy = LLM(tiny_llama, page_size=PAGE, attention_backend="native")
    try:
        return run(roomy, [BIG, prompt(40, 1), prompt(50, 2)])
    finally:
        roomy.engine.close()


@pytest.mark.parametrize("budget", [2048, 256])  # one streamed chunk; >= 3 chunks
def test_over_device_prompt_matches_a_roomy_device(tiny_llama: str, budget: int,
                                                   roomy_outputs: list[list[int]]) -> None:
    on = streaming(tiny_llama, max_num_batched_tokens=budget)
    try:
        chunks = 0
        engine = on.engine
        ids = [engine.add_request({"prompt_token_ids": p}, PARAMS)
               for p in (BIG, prompt(40, 1), prompt(50, 2))]
        done: dict[str, object] = {}
        while engine.has_unfinished_requests():
            before = on.stats()["kv_streamed_prefill_tokens"]
            for out in engine.step():
                done[out.request_id] = out
            chunks += on.stats()["kv_streamed_prefill_tokens"] > before
            _check(on)
        assert tokens_of(done, ids) == roomy_outputs
        stats = on.stats()
        assert stats["recomputes"] == 0
        # one chunk: admitted streamed; 256: the first chunk runs resident, the rest streamed
        assert stats["kv_streamed_prefill_tokens"] == (len(BIG) if budget > len(BIG)
                                                       else len(BIG) - budget)
        assert chunks == (1 if budget > len(BIG) else 2)
        assert stats["kv_streamed_layer_bytes"] > 0
        assert on.most_stage_bytes > 0 == on.memory_stats()["kv_stage_bytes"]  # type: ignore[attr-defined]
    finally:
        on.engine.close()


def test_abort_of_a_streamed_prefill_frees_its_host_blocks(tiny_llama: str) -> None:
    llm = streaming(tiny_llama, max_num_batched_tokens=128)
    engine = llm.engine
    try:
        rid = engine.add_request({"prompt_token_ids": BIG}, PARAMS)
        group = None
        for _ in range(20):
            engine.step()
            _check(llm)
            group = engine.scheduler.running[0] if engine.scheduler.running else None
            if group is not None and engine.scheduler.is_streamed(group):
                break
        assert group is not None and engine.scheduler.is_streamed(group)
        seq = group.seqs[0]
        assert 0 < seq.num_computed_tokens < len(BIG)  # mid-prefill
        held = len(engine.kv_manager.block_table(seq.seq_id))
        assert held == -(-(len(BIG) + 1) // 16)  # the whole prompt's host blocks, taken at once
        used = engine.kv_manager.host_blocks.num_used
        engine.abort_request(rid)
        assert engine.kv_manager.host_blocks.num_used == used - held
        _check(llm)
        assert run(llm, [prompt(40, 1)]) and not engine.has_unfinished_requests()
    finally:
        engine.close()


def test_a_prompt_neither_device_nor_tier_holds_is_refused(tiny_llama: str) -> None:
    llm = LLM(tiny_llama, page_size=PAGE, kv_reserve_pages=0,
              kv_cache_max_bytes=DEVICE_BLOCKS * BLOCK, host_kv_cache_bytes=MiB,
              layerwise_residency=True, attention_backend="native")
    try:
        with pytest.raises(PromptTooLargeError, match="KV blocks"):
            llm.engine.add_request({"prompt_token_ids": prompt(70 * 16)}, PARAMS)
        # a prompt the tier holds (2x the device) still runs, and so does the next one
        assert len(run(llm, [prompt(40 * 16), prompt(40, 1)])[0]) == PARAMS.max_tokens
        assert llm.stats()["kv_streamed_prefill_tokens"] > 0
    finally:
        llm.engine.close()
