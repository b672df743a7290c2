"""`--pd m=1:1` in real worker processes: a prefill worker and a decode worker on one page
budget. Outputs equal the colocated engine's (greedy, prefix caching, seeded n=2, streaming),
an abort at any point frees both sides, and a decode worker killed with SIGKILL ends its
requests with a clear error, gives its pages back and is restarted."""

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
from elasticserve.engine.multi_model import ModelSpec
from elasticserve.models.make_model import make_model
from elasticserve.procs.pd_router import PDRouter
from elasticserve.procs.supervisor import Supervisor
from elasticserve.procs.worker_client import WorkerDiedError
from elasticserve.procs.worker_pool import WorkerPool
from elasticserve.sampling_params import SamplingParams

BASE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)"
PROMPTS = ["import os", BASE, BASE + " + fibonacci(n - 2)\n", "class Engine:\n    pass",
           "for i in range(10):\n    print(i * i)\n" * 3, "x = 1"]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, n=2, seed=11, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_model("llama", "tiny", str(tmp_path_factory.mktemp("pd") / "tiny"))


@pytest.fixture(scope="module")
def expected(model_dir: str) -> dict[str, list[list[tuple[int, ...]]]]:
    llm = LLM(model_dir)
    return {name: [[tuple(c.token_ids) for c in o.outputs] for o in llm.generate(PROMPTS, p)]
            for name, p in (("greedy", GREEDY), ("seeded", SEEDED))}


@pytest.fixture(scope="module", params=["pages", "copy"])
def pool(request: pytest.FixtureRequest, model_dir: str) -> Iterator[WorkerPool]:
    made = WorkerPool([ModelSpec("m", model_dir)], 256 << 20, EngineArgs(model=model_dir),
                      pd={"m": (1, 1)}, kv_handoff=request.param,
                      supervisor=Supervisor(backoff_s=0.1))
    made.start()
    yield made
    made.close()


def router_of(pool: WorkerPool) -> PDRouter:
    router = pool.routers["m"]
    assert isinstance(router, PDRouter)
    return router


async def _run(router: PDRouter, prompt: str, params: SamplingParams,
               stream: bool = False) -> list[Any]:
    return [o async for o in router.generate(prompt, params, stream=stream)]


def _completions(outs: list[Any]) -> list[tuple[int, ...]]:
    return [tuple(c.token_ids) for c in outs[-1].outputs]


def _wait(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _settled(router: PDRouter) -> bool:
    """Nothing held anywhere: no hand-off pending, no block used on either worker."""
    return router.holding == 0 and all(
        w.stats().get("blocks_used") == 0 and not len(w.streams) for w in router.replicas)


@pytest.mark.parametrize("name", ["greedy", "seeded"])
def test_pd_outputs_equal_colocated(pool: WorkerPool, name: str,
                                    expected: dict[str, list[list[tuple[int, ...]]]]) -> None:
    router = router_of(pool)
    params = GREEDY if name == "greedy" else SEEDED
    start = router.stats()
    before = start["kv_handoff_sequences"]

    async def both_waves() -> list[list[list[tuple[int, ...]]]]:
        waves = []
        for _ in range(2):  # the second wave hits the prefill worker's prefix cache
            outs = await asyncio.gather(*(_run(router, p, params) for p in PROMPTS))
            waves.append([_completions(o) for o in outs])
        return waves

    for got in asyncio.run(both_waves()):
        assert got == expected[name]
    _wait(lambda: _settled(router) and router.stats()["kv_handoff_sequences"]
          == before + 2 * len(PROMPTS) * params.n)
    end = router.stats()
    assert end["kv_handoff_sent_sequences"] == end["kv_handoff_sequences"]
    # this test's own hand-offs, whatever ran before it on the same pool
    stats = {k: end[k] - start[k] for k in ("kv_handoff_pages", "kv_handoff_bytes_copied")}
    if pool.kv_handoff == "copy":  # the prefill worker's prefix cache keeps every block
        assert router.prefill[0].stats()["prefix_cache_hit_tokens"] > 0
        assert stats["kv_handoff_pages"] == 0
    elif name == "greedy":  # one sequence per request: every block goes by page
        assert stats["kv_handoff_pages"] > 0 and stats["kv_handoff_bytes_copied"] == 0
    else:  # n=2 shares the prompt's blocks: those are copied
        assert stats["kv_handoff_bytes_copied"] > 0
    roles = {w["worker"]: w["role"] for w in pool.workers_report()}
    assert sorted(roles.values()) == ["decode", "prefill"]
    pool.check_integrity()


def test_streaming_first_token_comes_from_the_prefill_worker(
        pool: WorkerPool, expected: dict[str, list[list[tuple[int, ...]]]]) -> None:
    router = router_of(pool)
    outs = asyncio.run(_run(router, PROMPTS[1], GREEDY, stream=True))
    assert len(outs[0].outputs[0].token_ids) == 1  # sampled by the prefill worker, sent at once
    assert _completions(outs) == expected["greedy"][1]
    assert [len(o.outputs[0].token_ids) for o in outs] == list(range(1, GREEDY.max_tokens + 1))


def test_abort_while_decoding_frees_both_sides(pool: WorkerPool) -> None:
    router = router_of(pool)
    params = SamplingParams(max_tokens=5000, temperature=0.0, ignore_eos=True)

    async def read_three_then_leave() -> None:
        it = router.generate("leave early", params, stream=True)
        for _ in range(3):
            await it.__anext__()
        await it.aclose()

    asyncio.run(read_three_then_leave())
    _wait(lambda: _settled(router), timeout=10)
    pool.check_integrity()


def test_a_killed_decode_worker_fails_its_requests_and_restarts(
        pool: WorkerPool, expected: dict[str, list[list[tuple[int, ...]]]]) -> None:
    router = router_of(pool)
    victim = router.decode[0]
    old = victim.pid
    assert old is not None
    params = SamplingParams(max_tokens=3000, temperature=0.0, ignore_eos=True)

    async def kill_mid_decode() -> None:
        it = router.generate("a long decode", params, stream=True)
        await it.__anext__()  # the prefill worker's token
        await it.__anext__()  # the decode worker's
        os.kill(old, signal.SIGKILL)
        with pytest.raises(WorkerDiedError, match="died while running"):
            async for _ in it:
                pass

    asyncio.run(kill_mid_decode())
    _wait(lambda: victim.state == "ready" and victim.pid != old)
    _wait(lambda: _settled(router), timeout=10)
    pool.check_integrity()  # the dead worker's pages are back in the budget
    outs = asyncio.run(_run(router, PROMPTS[0], GREEDY))  # and the new one serves
    assert _completions(outs) == expected["greedy"][0]
