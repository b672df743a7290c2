"""Workspace pages on a shared budget: granted by the arbiter, borrowed from a neighbour's
idle KV pages for a big prefill, back after the step; refused grants fall back."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from elasticserve import LLM, SamplingParams
from elasticserve.core.arbiter import Arbiter, ArbiterPolicy
from elasticserve.engine.args import EngineArgs
from elasticserve.engine.multi_model import ModelHost, ModelPool, ModelSpec
from elasticserve.engine.workspace import WorkspaceArena
from tests.engine.conftest import mixed_prompts
from tests.helpers import run_until_done, tokens_of

KiB = 1 << 10
PAGE = 64 * KiB
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
BASE = dict(runtime_memory_from_budget=True, linear_backend="torch", page_size=PAGE,
            max_num_batched_tokens=512, workspace_retain_bytes=2 * PAGE)


@pytest.fixture
def make_pool(model_dirs: dict[str, str]) -> Iterator[Callable[..., ModelPool]]:
    pools: list[ModelPool] = []

    def make(kv_pages: int, **kw: Any) -> ModelPool:
        """A pool whose budget leaves exactly `kv_pages` pages beside both models' weights."""
        paths = {"a": model_dirs["llama"], "b": model_dirs["qwen2"]}
        specs = [ModelSpec(n, p) for n, p in paths.items()]
        args = EngineArgs(model="", kv_shrink_after_s=60.0, **{**BASE, **kw})
        probe = ModelPool(specs, 64 << 20, args, page_size=PAGE)
        assert probe.arbiter is not None
        weights = sum(m.weights_pages for m in probe.arbiter.snapshot().models.values())
        probe.close()
        pool = ModelPool(specs, (weights + kv_pages) * PAGE, args, page_size=PAGE)
        assert pool.arbiter is not None
        pool.arbiter.policy.sleep_idle = False  # pages move by reclaim, not by sleeping a model
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def _arena(pool: ModelPool, name: str) -> WorkspaceArena:
    arena = pool.engines[name].kv.workspace
    assert arena is not None
    return arena


def _books_agree(pool: ModelPool) -> None:
    """Integrity, and the arbiter's pages per model = its KV pages + its workspace pages."""
    pool.check_integrity()
    assert pool.arbiter is not None
    for name, engine in pool.engines.items():
        mapped = engine.kv.pages.mapped_pages + _arena(pool, name).mapped_pages
        assert pool.arbiter.kv_pages(name) == mapped, name


def _run(pool: ModelPool, name: str, prompts: list[list[int]]) -> list[list[int]]:
    engine = pool.engines[name]
    ids = [engine.add_request({"prompt_token_ids": p}, PARAMS) for p in prompts]
    pool.note_request(name)
    return tokens_of(run_until_done(engine, max_steps=400,
                                    each_step=lambda: _books_agree(pool)), ids)


def _alone(path: str, prompts: list[list[int]]) -> list[list[int]]:
    llm = LLM(path, kv_cache_mode="static", linear_backend="torch")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS)
    llm.engine.close()
    return [o.outputs[0].token_ids for o in outs]


def _burst(path: str) -> list[list[int]]:
    base = mixed_prompts(path, 6)
    return [(base[i % 6] * 4)[: 40 + i] for i in range(16)]


def test_a_big_prefill_borrows_the_neighbours_idle_pages(
        model_dirs: dict[str, str], make_pool: Callable[..., ModelPool]) -> None:
    pool = make_pool(kv_pages=48)
    arbiter = pool.arbiter
    assert isinstance(arbiter, Arbiter)
    b_burst = _burst(model_dirs["qwen2"])
    assert _run(pool, "b", b_burst) == _alone(model_dirs["qwen2"], b_burst)
    b_held = arbiter.kv_pages("b")
    assert b_held >= 10  # b keeps its burst's pages (shrink after 60 s), none of them live
    long = (mixed_prompts(model_dirs["llama"], 2)[1] * 40)[:480]
    arena = _arena(pool, "a")
    need = -(-arena.view.need_bytes(480, 1) // PAGE)
    assert need > arbiter.free_pages  # the prefill's workspace does not fit in what is free
    during: list[dict[str, int]] = []
    begin = arena.begin

    def watch(tokens: int, rows: int) -> Any:
        ws = begin(tokens, rows)
        during.append({"a": arbiter.kv_pages("a"), "b": arbiter.kv_pages("b"),
                       "ws": arena.mapped_pages, "placed": ws is not None})
        return ws

    arena.begin = watch  # type: ignore[method-assign]
    assert _run(pool, "a", [long]) == _alone(model_dirs["llama"], [long])
    first = during[0]
    # the arbiter's books show the workspace under a, taken from b's idle KV pages
    assert first["placed"] and first["ws"] >= need and first["a"] >= first["ws"]
    assert first["b"] < b_held
    # b's pages held no live block: they came by the free and cached tiers, nobody preempted
    assert arbiter.stats["free"] + arbiter.stats["cached"] >= b_held - first["b"]
    assert arbiter.stats["preempt"] == 0 and arbiter.stats["sleep"] == 0
    # and after the step they are back: a holds its KV and at most the retained floor
    assert arena.mapped_pages <= 2 and arena.fallbacks == 0
    assert arbiter.kv_pages("a") == pool.engines["a"].kv.pages.mapped_pages + arena.mapped_pages
    held = arbiter.kv_pages("a")
    assert arena.mapped_pages > 0  # the retained floor (decode steps used it)
    # sleep gives every page back, the workspace's included (the arbiter checks that the
    # engine unmapped exactly the pages it booked, and returns them with the weights' pages)
    assert pool.sleep("a") > held
    assert arena.mapped_pages == 0 and arbiter.kv_pages("a") == 0
    _books_agree(pool)


def test_a_refused_grant_falls_back_and_is_counted(
        model_dirs: dict[str, str], make_pool: Callable[..., ModelPool]) -> None:
    pool = make_pool(kv_pages=12)  # room for the KV of the prompt, not for its workspace
    long = (mixed_prompts(model_dirs["llama"], 2)[1] * 40)[:300]
    assert _run(pool, "a", [long]) == _alone(model_dirs["llama"], [long])
    stats = pool.engines["a"].kv.memory_stats()
    assert stats["workspace_fallbacks"] >= 1  # the 300-token chunk ran on ordinary memory
    assert stats["workspace_steps"] >= 1  # the decode steps fit and used the arena


class _BusyNeighbour:
    """A model whose every page holds live KV: only preemption (or sleep) frees any."""

    def __init__(self) -> None:
        self.preempted = 0

    def reclaimable(self) -> tuple[int, int]:
        return 0, 0

    def free_pages(self, n: int) -> int:
        return 0

    def drop_cached(self, n: int) -> int:
        return 0

    def preempt(self, n: int) -> int:
        self.preempted += n
        return n

    def sleep(self) -> int | None:
        return None

    def is_idle(self) -> bool:
        return False

    def is_starved(self) -> bool:
        return False


def test_a_workspace_grant_never_preempts_a_neighbour() -> None:
    arbiter = Arbiter(20 * PAGE, PAGE, ArbiterPolicy())
    busy = _BusyNeighbour()
    arbiter.register("b", 0, reclaimer=busy)
    host = ModelHost(arbiter, ModelSpec("a", ""))
    host.attach_model(0)
    assert arbiter.request("b", 18) == 18 and host.grant(1, 1) == 1
    # a's workspace needs 4 pages; only a preemption of b's live requests could give them
    assert host.grant_spare(4) == 0
    assert busy.preempted == 0 and arbiter.stats["preempt"] == 0
    assert arbiter.policy.preempt and arbiter.policy.sleep_idle  # the policy is back as it was
    assert host.grant(4, 4) == 4 and busy.preempted >= 3  # a KV grant may preempt
    host.release(4)
    assert host.grant_spare(4) == 4  # free pages are granted whole
    arbiter.check_integrity()


def test_a_worker_broker_is_refused(tiny_llama: str) -> None:
    class SlotBroker:  # neither grant_spare nor spare_broker (procs: RemotePageBroker has one)
        pages_reclaimed = 0

        def attach_model(self, weights_bytes: int) -> None: ...
        def grant(self, pages: int, at_least: int) -> int: return pages
        def release(self, pages: int) -> None: ...
        def wake(self) -> bool: return True
        def cancel_wake(self) -> None: ...

    from elasticserve.engine.llm_engine import LLMEngine

    with pytest.raises(ValueError, match="runtime_memory_from_budget"):
        LLMEngine(EngineArgs(model=tiny_llama, runtime_memory_from_budget=True),
                  broker=SlotBroker())
