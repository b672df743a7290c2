"""The zero-copy claim of `--kv-handoff pages`, checked on real worker processes: a handed-over
request's KV pages change owner with zero bytes copied, and the decode worker's blocks ARE the
memory the prefill worker wrote: a token the decode worker writes into the shared tail block
shows through the prefill worker's mapping before the prefill worker lets the pages go."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from elasticserve.engine.args import EngineArgs
from elasticserve.engine.multi_model import ModelSpec
from elasticserve.engine.pd import KVHandedOver, KVHandOff
from elasticserve.engine.protocol import RequestTiming
from elasticserve.models.make_model import make_model
from elasticserve.outputs import RequestOutput
from elasticserve.procs.pd_router import PDRouter
from elasticserve.procs.supervisor import Supervisor
from elasticserve.procs.worker_pool import WorkerPool
from elasticserve.sampling_params import SamplingParams

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)"


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerPool]:
    model = make_model("llama", "tiny", str(tmp_path_factory.mktemp("zc") / "tiny"))
    made = WorkerPool([ModelSpec("m", model)], 256 << 20,
                      EngineArgs(model=model, enable_prefix_caching=False),
                      pd={"m": (1, 1)}, supervisor=Supervisor(backoff_s=0.1))
    made.start()
    yield made
    made.close()


def test_pages_change_owner_and_are_the_same_memory(pool: WorkerPool) -> None:
    router = pool.routers["m"]
    assert isinstance(router, PDRouter)
    prefill, decode = router.prefill[0], router.decode[0]
    assert prefill.config_info()["page_size"] == str(16 << 10)  # one tiny-model block a page
    received = threading.Event()
    decode.on_received = lambda _rid: received.set()  # the router would release at once
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    prompt = PROMPT
    while len(prefill.validate(prompt, params)[1]) % 16 == 0:
        prompt += " "  # the last prompt block must be partial: the decode worker fills it

    async def flow() -> None:
        timing = RequestTiming(time.monotonic())
        handoff: KVHandOff | None = None
        try:
            async for _ in prefill.generate(prompt, params, "zc-1", stream=True, timing=timing):
                pass
        except KVHandedOver as over:
            handoff = over.handoff
        assert handoff is not None and handoff.kv.pages and not handoff.kv.data
        lent = len(handoff.kv.pages)
        held = prefill.call("kv_checksums", "zc-1")[0]  # P's mapping, before anything moved
        it = decode.adopt(handoff, timing)
        # decode past the tail block: D has filled it (and stopped writing it) through its mapping
        while len((await it.__anext__()).outputs[0].token_ids) < 20:
            pass
        assert received.is_set()
        seen_by_d = decode.call("kv_checksums", "zc-1")[0]
        seen_by_p = prefill.call("kv_checksums", "zc-1")[0]
        # full blocks: the bytes P wrote, read through D's mapping
        assert seen_by_d[:lent - 1] == held[:lent - 1]
        # the tail block: D wrote its first decode token there, and P's mapping shows it
        assert seen_by_p[lent - 1] == seen_by_d[lent - 1] != held[lent - 1]
        prefill.release_handoff("zc-1")
        await it.aclose()

    try:
        asyncio.run(flow())
    finally:
        decode.on_received = router._release
    deadline = time.monotonic() + 10
    while prefill.stats().get("blocks_used") or decode.stats().get("blocks_used"):
        assert time.monotonic() < deadline, "blocks were not freed"
        time.sleep(0.05)
    stats = router.stats()
    assert stats["kv_handoff_pages"] > 0 and stats["kv_handoff_bytes_copied"] == 0
    pool.check_integrity()


def test_greedy_requests_hand_over_with_zero_bytes_copied(pool: WorkerPool) -> None:
    router = pool.routers["m"]
    before = router.stats()
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

    async def run() -> None:
        await asyncio.gather(*(_drain(router, f"{PROMPT} # {i}", params) for i in range(6)))

    asyncio.run(run())
    deadline = time.monotonic() + 10
    while router.holding:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    after = router.stats()
    assert after["kv_handoff_sequences"] - before["kv_handoff_sequences"] == 6
    assert after["kv_handoff_pages"] > before["kv_handoff_pages"]
    assert after["kv_handoff_bytes_copied"] == before["kv_handoff_bytes_copied"] == 0
    pool.check_integrity()


async def _drain(router: PDRouter, prompt: str, params: SamplingParams) -> None:
    async for _ in router.generate(prompt, params):
        pass


def test_a_prefill_worker_killed_during_the_hand_off(pool: WorkerPool) -> None:
    """Its offer dies with it: the decode worker's take is refused, that request ends with an
    error, everything else goes on; the dead worker's pages are back and it restarts."""
    router = pool.routers["m"]
    assert isinstance(router, PDRouter)
    prefill, decode = router.prefill[0], router.decode[0]
    old = prefill.pid
    assert old is not None
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    async def flow() -> list[RequestOutput]:
        timing = RequestTiming(time.monotonic())
        with pytest.raises(KVHandedOver) as over:
            async for _ in prefill.generate(PROMPT, params, "zc-kill", timing=timing):
                pass
        assert over.value.handoff.kv.pages
        os.kill(old, signal.SIGKILL)
        await asyncio.to_thread(_wait_gone, pool, prefill.worker)
        return [o async for o in decode.adopt(over.value.handoff, timing)]

    outs = asyncio.run(flow())
    assert outs[-1].finished and "KV hand-off" in str(outs[-1].error)
    deadline = time.monotonic() + 30
    while not (prefill.state == "ready" and prefill.pid != old):
        assert time.monotonic() < deadline, "the prefill worker was not restarted"
        time.sleep(0.05)
    pool.check_integrity()
    asyncio.run(_drain(router, PROMPT, params))  # serving goes on
    pool.check_integrity()


def _wait_gone(pool: WorkerPool, worker: str) -> None:
    """Until the broker has seen the worker die (its offers died with it)."""
    assert pool.budget is not None
    broker = pool.budget.broker
    deadline = time.monotonic() + 10
    while worker not in broker.dead:
        assert time.monotonic() < deadline
        time.sleep(0.01)
