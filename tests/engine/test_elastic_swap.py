"""Preemption by swap on the elastic path: a run-time resize and an arbiter reclaim move live
KV to host memory and back, and greedy outputs still equal transformers'.

The contexts are longer than `CacheConfig.swap_min_tokens` (256), so even "auto" would swap;
the other elastic tests' prompts are shorter and recompute, which would hide a broken
swap-out copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from elasticserve import LLM, SamplingParams
from elasticserve.engine.args import EngineArgs
from elasticserve.engine.multi_model import ModelPool, ModelSpec, checkpoint_bytes
from tests.helpers import run_until_done, tokens_of

KiB, MiB = 1 << 10, 1 << 20
PAGE = 64 * KiB  # four 16 KiB tiny-model blocks per page
MAX_NEW = 8
PARAMS = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)


def long_prompts(count: int, length: int, salt: int) -> list[list[int]]:
    """Distinct prompts (no shared prefix: every block is the request's own) of `length`."""
    return [[(salt * 131 + i * 37 + j * 11 + j * j) % 500 + 3 for j in range(length)]
            for i in range(count)]


@pytest.mark.parametrize("mode", ["swap", "auto"])  # auto: 300 tokens >= swap_min_tokens
def test_resize_below_use_swaps_out_and_back(
        mode: str, tiny_llama: str, hf_greedy: Callable[..., list[list[int]]]) -> None:
    prompts = long_prompts(4, 300, salt=1)
    expected = hf_greedy(tiny_llama, prompts, MAX_NEW)
    llm = LLM(tiny_llama, page_size=PAGE, kv_reserve_pages=0, preemption_mode=mode)
    engine = llm.engine
    ids = [engine.add_request({"prompt_token_ids": p}, PARAMS) for p in prompts]
    for _ in range(2):  # prefill, then a decode step: every request holds ~19 blocks
        engine.step()
    used = llm.memory_stats()["kv_used_bytes"]
    llm.resize_kv_cache(used // 2)  # below what is in use: half the requests must go
    assert llm.stats()["swaps_out"] > 0 and llm.stats()["recomputes"] == 0
    assert llm.memory_stats()["kv_mapped_bytes"] <= used // 2
    engine.check_integrity()
    llm.resize_kv_cache(64 * MiB)
    assert tokens_of(run_until_done(engine, max_steps=200), ids) == expected
    assert llm.stats()["swaps_in"] > 0


@pytest.fixture
def shared_pool(model_dirs: dict[str, str]) -> Iterator[ModelPool]:
    """Two tiny models on 2 MiB of KV (32 pages); closed after the test."""
    dirs = {"a": model_dirs["llama"], "b": model_dirs["qwen2"]}
    weights = sum(checkpoint_bytes(d) for d in dirs.values())
    base = EngineArgs(model="", preemption_mode="swap", kv_shrink_after_s=60.0,
                      kv_reserve_pages=0)
    pool = ModelPool([ModelSpec(n, d) for n, d in dirs.items()], weights + 2 * MiB, base,
                     page_size=PAGE)
    yield pool
    pool.close()
    for engine in pool.engines.values():
        engine.close()


def test_arbiter_reclaim_swaps_a_busy_model_out_and_back(
        shared_pool: ModelPool, model_dirs: dict[str, str],
        hf_greedy: Callable[..., list[list[int]]]) -> None:
    pool = shared_pool
    a, b = pool.engines["a"], pool.engines["b"]
    # a: 6 x 300 tokens ~ 29 of the 32 pages; b then asks for its fair half (16 pages), and the
    # arbiter can only get them by preempting busy a down to its share
    a_prompts, b_prompts = long_prompts(6, 300, salt=2), long_prompts(4, 240, salt=3)
    a_ids = [a.add_request({"prompt_token_ids": p}, PARAMS) for p in a_prompts]
    for _ in range(2):
        pool.note_request("a")
        a.step()
    assert a.stats()["blocks_used"] >= 100
    b_ids = [b.add_request({"prompt_token_ids": p}, PARAMS) for p in b_prompts]
    pool.note_request("b")
    b_out = tokens_of(run_until_done(b, max_steps=200, each_step=pool.check_integrity), b_ids)
    assert a.stats()["swaps_out"] > 0 and a.stats()["recomputes"] == 0
    a_out = tokens_of(run_until_done(a, max_steps=200, each_step=pool.check_integrity), a_ids)
    assert a.stats()["swaps_in"] > 0
    assert a_out == hf_greedy(model_dirs["llama"], a_prompts, MAX_NEW)
    assert b_out == hf_greedy(model_dirs["qwen2"], b_prompts, MAX_NEW)
