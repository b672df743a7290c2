"""The host KV tier on the real engine: sequences forced through it keep their greedy outputs,
a burst three times the device budget runs with zero recomputes, an aborted offloaded request
leaks no host block, and the tier's pages come and go."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from elasticserve import LLM, SamplingParams
from elasticserve.errors import InvalidFieldError
from tests.helpers import run_until_done, tokens_of

KiB, MiB = 1 << 10, 1 << 20
PAGE = 64 * KiB  # four 16 KiB tiny-model blocks per page
BLOCK = 16 * KiB
MAX_NEW = 24
PARAMS = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)


def burst(count: int = 12, length: int = 60) -> list[list[int]]:
    """Distinct prompts (no shared prefix), each ~6 blocks once its tokens are generated."""
    return [[(i * 37 + j * 11 + j * j) % 500 + 3 for j in range(length)] for i in range(count)]


def run(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    engine = llm.engine
    ids = [engine.add_request({"prompt_token_ids": p}, PARAMS) for p in prompts]
    return tokens_of(run_until_done(engine, each_step=engine.check_integrity), ids)


def test_parity_and_burst_through_the_tier(
        tiny_llama: str, hf_greedy: Callable[..., list[list[int]]]) -> None:
    prompts = burst()
    # the burst's KV at its end is 12 x 6 = 72 blocks; the device holds 24, the tier the rest
    tier = LLM(tiny_llama, page_size=PAGE, kv_reserve_pages=0, kv_cache_max_bytes=24 * BLOCK,
               host_kv_cache_bytes=2 * MiB)
    off = LLM(tiny_llama, page_size=PAGE)  # tier off, room for everyone: no preemption at all
    try:
        got = run(tier, prompts)
        assert got == run(off, prompts)
        assert got[:2] == hf_greedy(tiny_llama, prompts[:2], MAX_NEW)
        stats = tier.stats()
        assert stats["recomputes"] == 0 and stats["swaps_out"] > 0
        assert stats["kv_offloaded_blocks"] == stats["kv_onloaded_blocks"] > 0
        assert off.stats()["preemptions"] == 0
        mem = tier.memory_stats()
        assert mem["host_kv_reserved_bytes"] == 2 * MiB and mem["host_kv_grow_events"] > 0
        # what stays on host is prefix blocks the device evicted (tests/engine/
        # test_host_prefix.py); asleep, the engine holds none and the tier's pages go
        assert mem["host_kv_used_bytes"] == mem["host_kv_cached_bytes"] > 0
        tier.engine.sleep()
        mem = tier.memory_stats()
        assert mem["host_kv_used_bytes"] == mem["host_kv_mapped_bytes"] == 0
        assert mem["host_kv_shrink_events"] > 0
    finally:
        tier.engine.close()
        off.engine.close()


def test_abort_of_an_offloaded_request_frees_its_host_blocks(tiny_llama: str) -> None:
    llm = LLM(tiny_llama, page_size=PAGE, kv_reserve_pages=0, kv_cache_max_bytes=24 * BLOCK,
              host_kv_cache_bytes=2 * MiB)
    engine = llm.engine
    try:
        ids = [engine.add_request({"prompt_token_ids": p}, PARAMS) for p in burst()]
        for _ in range(60):
            engine.step()
            if engine.scheduler.swapped:
                break
        victim = engine.scheduler.swapped[0].request_id
        assert llm.memory_stats()["host_kv_used_bytes"] > 0
        engine.abort_request(victim)
        engine.check_integrity()
        rest = [i for i in ids if i != victim]
        done = run_until_done(engine, each_step=engine.check_integrity)
        assert set(rest) <= set(done) and llm.stats()["recomputes"] == 0
        mem = llm.memory_stats()  # no host block of the aborted request is left
        assert mem["host_kv_used_bytes"] == mem["host_kv_cached_bytes"]
        engine.sleep()
        mem = llm.memory_stats()
        assert mem["host_kv_used_bytes"] == mem["host_kv_mapped_bytes"] == 0
    finally:
        engine.close()


@pytest.mark.parametrize("nbytes", [0, -1, BLOCK - 1])
def test_bad_host_kv_cache_bytes_names_the_field(tiny_llama: str, nbytes: int) -> None:
    with pytest.raises((ValueError, InvalidFieldError), match="host_kv_cache_bytes"):
        LLM(tiny_llama, host_kv_cache_bytes=nbytes)
