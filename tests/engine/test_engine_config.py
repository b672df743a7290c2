"""The engine reads one EngineConfig: LLM arguments reach the part that uses them, and a
static cache is exactly as big as asked."""

from __future__ import annotations

import pytest

from elasticserve import LLM, SamplingParams
from elasticserve.core.kv_pages import ModelBroker
from elasticserve.engine.args import EngineArgs
from elasticserve.engine.llm_engine import LLMEngine
from tests.engine.conftest import mixed_prompts


def _preemptions(model_dir: str, swap_min_tokens: int) -> dict[str, int]:
    llm = LLM(model_dir, kv_cache_mode="static", num_kv_blocks=20, block_size=4,
              swap_min_tokens=swap_min_tokens)
    assert llm.engine.scheduler.cache.swap_min_tokens == swap_min_tokens
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(model_dir)]
    llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0))  # type: ignore[arg-type]
    return llm.stats()


def test_swap_min_tokens_reaches_the_scheduler(tiny_llama: str) -> None:
    # auto preemption swaps a victim whose context is at least swap_min_tokens long
    always = _preemptions(tiny_llama, 0)
    never = _preemptions(tiny_llama, 10**6)
    assert always["preemptions"] > 0 and never["preemptions"] > 0
    assert always["swaps_out"] > 0 and always["recomputes"] == 0
    assert never["swaps_out"] == 0 and never["recomputes"] > 0


def test_bad_config_fails_before_the_model_loads(tiny_llama: str) -> None:
    with pytest.raises(ValueError, match="kv_reserve_pages must be >= 0"):
        LLM(tiny_llama, kv_reserve_pages=-1)
    with pytest.raises(ValueError, match="memory_backend must be one of"):
        LLM(tiny_llama, memory_backend="floppy")


def test_static_cache_has_exactly_the_blocks_asked_and_never_moves(tiny_llama: str) -> None:
    # 20 blocks of 4 KiB on 64 KiB pages: two whole pages mapped, 20 blocks offered
    llm = LLM(tiny_llama, kv_cache_mode="static", num_kv_blocks=20, block_size=4,
              page_size=64 * 1024)
    engine = llm.engine
    assert llm.stats()["blocks_total"] == 20
    before = llm.memory_stats()
    assert before["kv_mapped_bytes"] == 2 * 64 * 1024
    llm.generate([{"prompt_token_ids": p} for p in mixed_prompts(tiny_llama)],  # type: ignore[misc]
                 SamplingParams(max_tokens=8, temperature=0.0))
    engine.kv.maybe_shrink()
    engine.check_integrity()
    after = llm.memory_stats()
    assert after["kv_mapped_bytes"] == before["kv_mapped_bytes"]
    assert after["shrink_events"] == 0 and llm.stats()["blocks_total"] == 20
    assert not engine.kv.grow(1)  # already at its ceiling


class _Budget:
    """A ModelBroker that grants everything and records what the engine told it."""

    def __init__(self) -> None:
        self.weights = 0
        self.granted = 0

    def grant(self, pages: int, at_least: int) -> int:
        self.granted += pages
        return pages

    def release(self, pages: int) -> None:
        self.granted -= pages

    def attach_model(self, weights_bytes: int) -> None:
        self.weights = weights_bytes

    def wake(self) -> bool:
        return True

    def cancel_wake(self) -> None:
        pass


def test_a_broker_books_weights_and_pages(tiny_llama: str) -> None:
    budget: ModelBroker = _Budget()
    engine = LLMEngine(EngineArgs(model=tiny_llama, page_size=64 * 1024), broker=budget)
    assert isinstance(budget, _Budget)
    assert budget.weights == engine.weights_bytes > 0
    assert budget.granted == engine.kv.memory_stats()["pages_mapped"] > 0
    with pytest.raises(ValueError, match="kv_cache_mode='elastic'"):
        LLMEngine(EngineArgs(model=tiny_llama, kv_cache_mode="static"), broker=_Budget())
