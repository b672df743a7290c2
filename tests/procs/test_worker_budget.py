"""Worker processes on one page budget: one copy of the weights however many replicas (in
memory and in the books), pages back after a SIGKILL, sleep and wake through the broker."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from elasticserve.engine.args import EngineArgs
from elasticserve.engine.multi_model import ModelSpec
from elasticserve.memory.procfs import shmem_usage
from elasticserve.models.make_model import make_model
from elasticserve.procs.router import ReplicaRouter
from elasticserve.procs.supervisor import Supervisor
from elasticserve.procs.worker_pool import WorkerPool
from elasticserve.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerPool]:
    # `small`: ~100 MiB of fp32 weights, so the weights dominate every worker's shared memory
    model = make_model("llama", "small", str(tmp_path_factory.mktemp("budget") / "small"))
    made = WorkerPool([ModelSpec("m", model)], 1 << 30, EngineArgs(model=model, num_threads=1),
                      replicas={"m": 2}, supervisor=Supervisor(backoff_s=0.1))
    made.start()
    yield made
    made.close()


def _generate(router: ReplicaRouter, n: int = 6) -> list[list[int]]:
    async def one(i: int) -> list[int]:
        outs = [o async for o in router.generate(f"prompt {i}", GREEDY)]
        return list(outs[-1].outputs[0].token_ids)

    async def everything() -> list[list[int]]:
        return await asyncio.gather(*(one(i) for i in range(n)))

    return asyncio.run(everything())


def _wait(cond: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _books_match_holdings(pool: WorkerPool) -> None:
    assert pool.budget is not None
    pool.check_integrity()  # arbiter books, grants == held pages, memfds hold no more
    snap = pool.budget.arbiter.snapshot()
    held = sum(pool.budget.worker_pages(w["worker"]) for w in pool.workers_report())
    assert snap.used_pages == snap.weights_pages + held


def test_replicas_map_one_copy_of_the_weights(pool: WorkerPool) -> None:
    router = pool.routers["m"]
    _generate(router)
    report = pool.workers_report()
    weights = report[0]["weights_bytes"]
    assert weights > 90 << 20 and all(w["weights_shared"] for w in report)
    usage = [shmem_usage(w["pid"]) for w in report]
    kv = sum(r.memory_stats()["kv_mapped_bytes"] for r in router.replicas)
    # each worker maps all of the weights; together they hold about one copy (plus their KV)
    assert all(u.rss_shmem >= 0.9 * weights for u in usage), usage
    assert sum(u.pss_shmem for u in usage) <= 1.2 * weights + kv, (usage, weights, kv)
    # and the budget charges them once
    assert pool.budget is not None
    snap = pool.budget.arbiter.snapshot()
    assert snap.weights_pages == -(-weights // pool.page_size)
    _books_match_holdings(pool)


def test_sigkill_gives_every_page_back_and_the_worker_returns(pool: WorkerPool) -> None:
    router = pool.routers["m"]
    expected = _generate(router)
    victim = router.replicas[1]
    old = victim.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    _wait(lambda: victim.state == "ready" and victim.pid != old)
    _books_match_holdings(pool)  # the dead worker's pages went back; nothing leaked
    assert _generate(router) == expected
    _books_match_holdings(pool)


def test_sleep_frees_weights_and_a_request_wakes_the_model(pool: WorkerPool) -> None:
    assert pool.budget is not None
    router = pool.routers["m"]
    expected = _generate(router, 2)
    pool.sleep("m")
    snap = pool.budget.arbiter.snapshot()
    assert snap.used_pages == 0 and snap.weights_pages == 0  # weights and KV all back
    _wait(lambda: pool.budget is not None and pool.budget.registry.report() == [])
    assert _generate(router, 2) == expected  # the first request woke it
    _books_match_holdings(pool)
