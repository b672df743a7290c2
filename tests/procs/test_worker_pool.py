"""Models in real worker processes: replicas answer concurrently with the in-process engine's
greedy tokens, and a worker killed with SIGKILL mid-load is retried around and restarted."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest

from elasticserve.engine.args import EngineArgs
from elasticserve.engine.llm import LLM
from elasticserve.engine.multi_model import ModelSpec
from elasticserve.models.make_model import make_model
from elasticserve.procs.router import ReplicaRouter
from elasticserve.procs.supervisor import Supervisor
from elasticserve.procs.worker_client import WorkerDiedError
from elasticserve.procs.worker_pool import WorkerPool
from elasticserve.sampling_params import SamplingParams

PROMPTS = [f"request {i} says hello to" for i in range(12)]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_model("llama", "tiny", str(tmp_path_factory.mktemp("procs") / "tiny"))


@pytest.fixture(scope="module")
def expected(model_dir: str) -> list[list[int]]:
    llm = LLM(model_dir)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def pool(model_dir: str) -> Iterator[WorkerPool]:
    made = WorkerPool([ModelSpec("m", model_dir)], 256 << 20, EngineArgs(model=model_dir),
                      replicas={"m": 2}, supervisor=Supervisor(backoff_s=0.1))
    made.start()
    yield made
    made.close()


async def _tokens(router: ReplicaRouter, prompt: str) -> list[int]:
    outs = [o async for o in router.generate(prompt, GREEDY)]
    return list(outs[-1].outputs[0].token_ids)


async def _all(router: ReplicaRouter) -> list[list[int]]:
    return await asyncio.gather(*(_tokens(router, p) for p in PROMPTS))


def _wait(cond, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_two_replicas_answer_with_the_in_process_greedy_tokens(
        pool: WorkerPool, expected: list[list[int]]) -> None:
    router = pool.routers["m"]
    assert asyncio.run(_all(router)) == expected
    steps = [r.stats()["steps"] for r in router.replicas]
    assert all(s > 0 for s in steps), f"both replicas must have served: steps {steps}"
    pids = {w["pid"] for w in pool.workers_report()}
    assert len(pids) == 2 and os.getpid() not in pids
    pool.check_integrity()


def test_bad_input_is_refused_by_the_worker_and_serving_goes_on(pool: WorkerPool) -> None:
    router = pool.routers["m"]
    with pytest.raises(ValueError, match="prompt_token_ids"):
        router.validate({"prompt_token_ids": [10**9]}, GREEDY)
    text, ids = router.validate("still serving", GREEDY)
    assert text == "still serving" and ids


def test_sigkill_mid_load_retries_elsewhere_and_restarts(
        pool: WorkerPool, expected: list[list[int]]) -> None:
    router = pool.routers["m"]
    victim = router.replicas[0]
    old_pid = victim.pid
    assert old_pid is not None

    async def load_then_kill() -> list[list[int]]:
        base = victim.stats()["steps"]
        task = asyncio.gather(*(_tokens(router, p) for p in PROMPTS))
        # kill once the victim has stepped its share: it holds requests mid-generation
        while not (len(victim.streams) and victim.stats()["steps"] > base + 2):
            await asyncio.sleep(0.005)
        held = len(victim.streams)
        os.kill(old_pid, signal.SIGKILL)
        assert held > 0
        return await task

    # none of these streams, so every request the dead worker held is retried from the start
    assert asyncio.run(load_then_kill()) == expected
    _wait(lambda: victim.state == "ready" and victim.pid != old_pid)
    assert victim.restarts == 1
    assert router.retries >= 1
    assert asyncio.run(_all(router)) == expected  # the restarted worker serves again
    pool.check_integrity()


def test_a_streamed_request_on_a_dead_worker_ends_with_a_clear_error(pool: WorkerPool) -> None:
    router = pool.routers["m"]
    params = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)

    async def stream_then_kill() -> None:
        it = router.generate("a long stream", params, stream=True)
        first = await it.__anext__()  # the consumer has seen output: no silent retry
        worker = next(r for r in router.replicas if len(r.streams))
        assert first.outputs[0].token_ids
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(WorkerDiedError, match="died while running"):
            async for _ in it:
                pass

    asyncio.run(stream_then_kill())
    _wait(lambda: all(r.state == "ready" for r in router.replicas))


def test_a_stream_closed_early_aborts_and_frees_its_blocks(pool: WorkerPool) -> None:
    router = pool.routers["m"]
    params = SamplingParams(max_tokens=5000, temperature=0.0, ignore_eos=True)

    async def read_two_then_leave() -> None:
        it = router.generate("leave early", params, stream=True)
        await it.__anext__()
        await it.__anext__()
        await it.aclose()  # the client went away: the worker must drop the request

    asyncio.run(read_two_then_leave())
    _wait(lambda: all(r.stats()["num_running"] == 0 and r.stats()["blocks_used"] == 0
                      and not len(r.streams) for r in router.replicas), timeout=10)
    pool.check_integrity()


def test_a_silent_worker_is_killed_and_its_requests_run_elsewhere(
        pool: WorkerPool, expected: list[list[int]]) -> None:
    router = pool.routers["m"]
    victim = router.replicas[0]
    old, restarts = victim.pid, victim.restarts
    assert old is not None
    pool.supervisor.stuck_after_s = 2.0
    try:
        os.kill(old, signal.SIGSTOP)  # alive but silent: nothing would ever answer

        async def load() -> list[list[int]]:
            return await asyncio.gather(*(_tokens(router, p) for p in PROMPTS[:4]))

        # requests sent to the stopped worker are retried elsewhere once the watchdog kills it
        assert asyncio.run(asyncio.wait_for(load(), 30)) == expected[:4]
        _wait(lambda: victim.state == "ready" and victim.pid != old)
        assert pool.supervisor.killed_stuck >= 1 and victim.restarts == restarts + 1
    finally:
        pool.supervisor.stuck_after_s = 60.0
    pool.check_integrity()


def test_closing_while_a_worker_restarts_stops_it_promptly(model_dir: str) -> None:
    made = WorkerPool([ModelSpec("m", model_dir)], 128 << 20, EngineArgs(model=model_dir),
                      supervisor=Supervisor(backoff_s=0.0))
    made.start()
    client = made.routers["m"].replicas[0]
    old = client.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    _wait(lambda: client.state != "ready" or client.pid != old)
    time.sleep(0.2)  # the restart is under way (spawned, loading) when the pool closes
    started = time.monotonic()
    made.close()
    assert time.monotonic() - started < 8.0  # not the 10 s reap timeout of an unstopped worker
    for pid in {old, client.pid} - {None}:
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped: nothing left running
