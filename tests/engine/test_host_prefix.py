"""Prefix-cache blocks the device evicts live on in the host KV tier, on the real engine: a
prompt sharing a prefix that the device lost onloads it (greedy output unchanged, the prefill
shorter by exactly the host hit), a reclaim's drop_cached offloads too, and a small tier stays
within its budget by LRU eviction and gives its pages back asleep."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from elasticserve import LLM, SamplingParams
from tests.helpers import run_until_done, tokens_of

KiB, MiB = 1 << 10, 1 << 20
PAGE, BLOCK = 64 * KiB, 16 * KiB  # the tiny model: 16-token blocks of 16 KiB
MAX_NEW = 8
PARAMS = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
SHARED = [(j * 7 + 5) % 400 + 3 for j in range(64)]  # four full blocks
FIRST, SECOND = SHARED + [11] * 10, SHARED + [23, 29, 31] * 4


def filler(i: int) -> list[int]:
    return [(i * 53 + j * 13) % 450 + 3 for j in range(70)]


def run_phases(llm: LLM, phases: list[list[list[int]]]) -> tuple[list[list[int]], int]:
    """Each phase's prompts run to completion before the next is added; returns the outputs
    and the tokens the runner computed."""
    engine = llm.engine
    engine.step_trace = []
    outs: list[list[int]] = []
    for prompts in phases:
        ids = [engine.add_request({"prompt_token_ids": p}, PARAMS) for p in prompts]
        outs += tokens_of(run_until_done(engine, each_step=engine.check_integrity), ids)
    computed = sum(n for chunks, _ in engine.step_trace for _, n in chunks)
    return outs, computed


def make(host: int | None, **kwargs: Any) -> LLM:
    return LLM(kwargs.pop("model"), page_size=PAGE, kv_reserve_pages=0,
               host_kv_cache_bytes=host, **kwargs)


def test_a_prefix_evicted_from_the_device_is_onloaded_from_host(
        tiny_llama: str, hf_greedy: Callable[..., list[list[int]]]) -> None:
    # a static 8-block device cache: the fillers (5 blocks each) evict FIRST's blocks
    phases = [[FIRST], [filler(1)], [filler(2)], [SECOND]]
    on = make(2 * MiB, model=tiny_llama, kv_cache_mode="static", num_kv_blocks=8)
    off = make(None, model=tiny_llama, kv_cache_mode="static", num_kv_blocks=8)
    try:
        got, computed_on = run_phases(on, phases)
        want, computed_off = run_phases(off, phases)
        assert got == want
        assert got[3:] == hf_greedy(tiny_llama, [SECOND], MAX_NEW)
        s_on, s_off = on.stats(), off.stats()
        assert s_on["host_prefix_hit_tokens"] == len(SHARED)  # all four shared blocks
        assert s_on["host_prefix_onloaded_blocks"] == len(SHARED) // 16
        assert s_on["host_prefix_offloaded_blocks"] > 0
        assert s_off["host_prefix_hit_tokens"] == s_off["host_prefix_offloaded_blocks"] == 0
        hit = s_on["prefix_cache_hit_tokens"] - s_off["prefix_cache_hit_tokens"]
        assert hit == len(SHARED) and computed_off - computed_on == len(SHARED)
        assert s_on["preemptions"] == s_off["preemptions"] == 0  # no swap traffic mixed in
    finally:
        on.engine.close()
        off.engine.close()


def test_drop_cached_offloads_and_the_next_prompt_hits_on_host(tiny_llama: str) -> None:
    llm = make(2 * MiB, model=tiny_llama)
    engine = llm.engine
    try:
        run_phases(llm, [[FIRST]])
        assert llm.memory_stats()["kv_cached_bytes"] > 0
        with engine.kv.lock:  # what the arbiter's reclaim does to a neighbour
            engine.kv.drop_cached(engine.kv.vt.mapped_pages)
        engine.check_integrity()
        assert llm.memory_stats()["kv_cached_bytes"] == 0
        assert llm.stats()["host_prefix_offloaded_blocks"] >= len(SHARED) // 16
        got, _ = run_phases(llm, [[SECOND]])
        assert llm.stats()["host_prefix_hit_tokens"] == len(SHARED)
        plain = LLM(tiny_llama, page_size=PAGE, enable_prefix_caching=False)
        try:
            assert got == run_phases(plain, [[SECOND]])[0]
        finally:
            plain.engine.close()
    finally:
        engine.close()


def test_a_small_tier_evicts_lru_within_its_budget(tiny_llama: str) -> None:
    llm = make(6 * BLOCK, model=tiny_llama, kv_cache_mode="static", num_kv_blocks=8)
    engine = llm.engine
    try:
        for i in range(6):  # each filler evicts the one before: 4 full blocks each to offload
            run_phases(llm, [[filler(i)]])
            mem = llm.memory_stats()
            assert mem["host_kv_used_bytes"] == mem["host_kv_cached_bytes"] <= 6 * BLOCK
        stats = llm.stats()
        assert stats["host_prefix_offloaded_blocks"] > 6  # more than fit: LRU made room
        assert stats["host_prefix_cached_blocks"] == 6
        run_phases(llm, [[filler(0)]])  # the oldest chain was evicted whole: no host hit
        assert llm.stats()["host_prefix_hit_tokens"] == 0
        engine.sleep()
        mem = llm.memory_stats()
        assert mem["host_kv_used_bytes"] == mem["host_kv_mapped_bytes"] == 0
    finally:
        engine.close()
