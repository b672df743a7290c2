"""A step's workspace in worker processes (`runtime_memory_from_budget` under the front's page
broker): a big prefill borrows pages another worker's idle KV gave up, booked under it while the
step runs and back after; greedy tokens as without the option; a sleep and a SIGKILL give them
back."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from elasticserve.engine.args import EngineArgs
from elasticserve.engine.llm import LLM
from elasticserve.engine.multi_model import ModelSpec, checkpoint_bytes
from elasticserve.models.make_model import make_model
from elasticserve.models.tokenizer import Tokenizer
from elasticserve.procs.messages import GrantSpare
from elasticserve.procs.router import ReplicaRouter
from elasticserve.procs.supervisor import Supervisor
from elasticserve.procs.worker_pool import WorkerPool
from elasticserve.sampling_params import SamplingParams

# the three tests run in order on one pool (the budget's state carries over)
PAGE = 64 << 10
KV_PAGES = 46  # the budget beside both models' weights: a step of a can only fit by borrowing
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
ARGS = dict(runtime_memory_from_budget=True, linear_backend="torch", page_size=PAGE,
            max_num_batched_tokens=512, workspace_retain_bytes=2 * PAGE, kv_shrink_after_s=60.0,
            num_threads=1)
CODE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)"


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("wsproc")
    return {"a": make_model("llama", "tiny", str(root / "a"), seed=0),
            "b": make_model("qwen2", "tiny", str(root / "b"), seed=0)}


@pytest.fixture(scope="module")
def pool(paths: dict[str, str]) -> Iterator[WorkerPool]:
    weights = sum(-(-checkpoint_bytes(p) // PAGE) for p in paths.values())
    made = WorkerPool([ModelSpec(n, p) for n, p in paths.items()], (weights + KV_PAGES) * PAGE,
                      EngineArgs(model="", **ARGS),  # type: ignore[arg-type]
                      supervisor=Supervisor(backoff_s=2.0))
    assert made.budget is not None
    made.budget.arbiter.policy.sleep_idle = False  # pages move by reclaim, not by sleeping b
    made.start()
    yield made
    made.close()


def _prompts(path: str) -> dict[str, list[list[int]]]:
    tok = Tokenizer.from_dir(path)
    base = [tok.encode(t) for t in ("import os", CODE, "class Engine:\n    pass", "x = 1")]
    return {"burst": [(base[i % 4] * 8)[: 40 + i] for i in range(16)],
            "long": [(tok.encode(CODE + " + fibonacci(n - 2)\n") * 40)[:480]]}


def _generate(router: ReplicaRouter, prompts: list[list[int]]) -> list[list[int]]:
    async def one(ids: list[int]) -> list[int]:
        outs = [o async for o in router.generate({"prompt_token_ids": ids}, GREEDY)]
        return list(outs[-1].outputs[0].token_ids)

    async def every() -> list[list[int]]:
        return await asyncio.gather(*(one(p) for p in prompts))

    return asyncio.run(every())


def _option_off(path: str, prompts: list[list[int]]) -> list[list[int]]:
    llm = LLM(path, linear_backend="torch")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    llm.engine.close()
    return [o.outputs[0].token_ids for o in outs]


def _books_match(pool: WorkerPool) -> None:
    """Integrity, and every page in use is a weight, a KV or a workspace page of a worker."""
    assert pool.budget is not None
    pool.check_integrity()
    snap = pool.budget.arbiter.snapshot()
    held = sum(w["kv_pages"] + w["workspace_pages"] for w in pool.workers_report())
    assert snap.used_pages == snap.weights_pages + held


def _watch_spare_grants(pool: WorkerPool) -> list[dict[str, int]]:
    """Record the books right after each workspace grant (on the granted worker's pages
    thread, so its release after the step cannot come in between)."""
    assert pool.budget is not None
    broker, seen = pool.budget.broker, []
    handle = broker._pages_message

    def watched(rec: Any, msg: object) -> object:
        reply = handle(rec, msg)
        if isinstance(msg, GrantSpare):
            with broker.arbiter.lock:
                seen.append({"granted": int(reply),  # type: ignore[call-overload]
                             "spare": rec.spare, "a": broker.arbiter.kv_pages("a#0"),
                             "b": broker.arbiter.kv_pages("b#0")})
        return reply

    broker._pages_message = watched  # type: ignore[method-assign]
    return seen


def test_a_big_prefill_borrows_a_neighbours_idle_pages(
        pool: WorkerPool, paths: dict[str, str]) -> None:
    assert pool.budget is not None
    arbiter, broker = pool.budget.arbiter, pool.budget.broker
    b = _prompts(paths["b"])["burst"]
    assert _generate(pool.routers["b"], b) == _option_off(paths["b"], b)
    b_held = arbiter.kv_pages("b#0")
    assert b_held >= 10 and broker.spare("b#0") <= 2  # b keeps its burst's idle KV pages
    long = _prompts(paths["a"])["long"]
    free = arbiter.free_pages
    seen = _watch_spare_grants(pool)
    assert _generate(pool.routers["a"], long) == _option_off(paths["a"], long)
    first = seen[0]
    # booked under a while its step ran, more than was free: taken from b's idle KV pages
    assert first["granted"] > free and first["spare"] >= first["granted"]
    assert first["a"] >= first["spare"] and first["b"] < b_held
    assert arbiter.stats["free"] + arbiter.stats["cached"] >= b_held - first["b"]
    assert arbiter.stats["preempt"] == 0 and arbiter.stats["sleep"] == 0  # nobody preempted
    # and back after the step: a keeps at most its retained floor, as its arena says
    a_stats = pool.routers["a"].memory_stats()
    assert 0 < broker.spare("a#0") <= 2 and a_stats["workspace_fallbacks"] == 0
    assert broker.spare("a#0") * PAGE == a_stats["workspace_mapped_bytes"]
    _books_match(pool)


def test_sleep_gives_the_workspace_back_with_the_kv(
        pool: WorkerPool, paths: dict[str, str]) -> None:
    assert pool.budget is not None
    arbiter, broker = pool.budget.arbiter, pool.budget.broker
    assert broker.spare("a#0") > 0  # the retained floor
    # the arbiter checks that the worker unmapped exactly the pages booked under it
    assert pool.sleep("a") > 0 and not arbiter.is_awake("a#0")
    assert broker.spare("a#0") == 0 and arbiter.kv_pages("a#0") == 0
    _books_match(pool)
    long = _prompts(paths["a"])["long"]
    assert _generate(pool.routers["a"], long) == _option_off(paths["a"], long)  # woken
    assert broker.spare("a#0") > 0
    _books_match(pool)


def test_kill_9_of_a_worker_holding_workspace_pages_gives_them_back(pool: WorkerPool) -> None:
    assert pool.budget is not None
    arbiter, broker = pool.budget.arbiter, pool.budget.broker
    victim = pool.routers["a"].replicas[0]
    spare, held = broker.spare("a#0"), broker.held("a#0")
    assert spare > 0  # its retained floor, kept for 60 s
    free = arbiter.free_pages
    weights = -(-victim.ready_info.weights_bytes // PAGE) if victim.ready_info else 0
    old = victim.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    _wait(lambda: "a#0" in broker.dead)
    with arbiter.lock:  # before the restart (2 s later) registers it again
        assert "a#0" not in broker.workers
        broker.check_integrity()
        assert arbiter.free_pages == free + held + spare + weights
    _wait(lambda: victim.state == "ready" and victim.pid != old)
    _books_match(pool)


def _wait(cond: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
