"""AsyncEngine on its own: streams, cancellation, overload, bad input, a crashing or stopped loop."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from elasticserve.engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError
from elasticserve.engine.step_stats import StepRecorder
from elasticserve.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0)
LONG = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)


def test_stream_grows_token_by_token_and_ends_like_the_offline_engine(engines, run_offline,
                                                                       wait_idle):
    engine = engines["tiny"]

    async def main() -> list:
        return [out async for out in engine.generate("import sys", GREEDY, stream=True)]

    outs = asyncio.run(main())
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == sorted(lengths) and len(set(lengths)) == len(lengths) > 1
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    ref = run_offline("import sys", GREEDY)
    assert outs[-1].outputs[0].token_ids == ref.outputs[0].token_ids
    assert outs[-1].outputs[0].text == ref.outputs[0].text
    wait_idle(engine)


def test_without_stream_only_the_final_output_arrives(engines):
    async def main() -> list:
        return [out async for out in engines["tiny"].generate("import sys", GREEDY)]

    outs = asyncio.run(main())
    assert len(outs) == 1 and outs[0].finished


def test_cancelling_the_consumer_aborts_and_frees_blocks(engines, wait_idle, finished_count):
    engine = engines["tiny"]
    finished = finished_count("tiny")

    async def main() -> None:
        async def consume() -> None:
            async for _ in engine.generate("while 1:", LONG, stream=True):
                pass

        task = asyncio.create_task(consume())
        while engine.engine.stats()["blocks_used"] == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    wait_idle(engine, timeout=10)
    assert finished_count("tiny") == finished  # aborted, not run to its end


def test_overload_is_refused_at_submission(engines, wait_idle):
    engine = engines["small"]  # one running + one queued
    assert engine.max_in_flight == 2

    async def main() -> None:
        first = engine.generate("a", LONG, stream=True)
        second = engine.generate("b", LONG, stream=True)
        with pytest.raises(EngineOverloadedError):
            engine.generate("c", LONG)
        await anext(first)  # type: ignore[arg-type]
        for it in (first, second):
            await it.aclose()  # type: ignore[attr-defined]
        engine.abort("never-started")  # unknown ids are ignored

    asyncio.run(main())
    wait_idle(engine)


def test_bad_input_raises_from_the_iterator_and_the_engine_goes_on(engines, wait_idle):
    engine = engines["tiny"]

    async def main() -> None:
        with pytest.raises(ValueError, match="vocabulary"):
            async for _ in engine.generate({"prompt_token_ids": [10**6]}, GREEDY):
                pass
        with pytest.raises(ValueError, match="prompt must not be empty"):
            engine.validate("", GREEDY)
        outs = [o async for o in engine.generate("ok", GREEDY)]
        assert outs[-1].finished

    asyncio.run(main())
    wait_idle(engine)


def test_what_the_server_reads_comes_from_the_wrapped_engine(engines):
    engine = engines["tiny"]
    engine.start()
    assert engine.health() is None
    assert engine.max_model_len == engine.engine.scheduler_config.max_model_len
    assert engine.tokenizer.encode("x") == engine.engine.tokenizer.encode("x")
    mem = engine.memory_stats()
    assert mem["pages_reclaimed"] == 0  # a private budget: nobody takes pages back
    assert mem["kv_mapped_bytes"] == engine.engine.kv.memory_stats()["kv_mapped_bytes"] > 0
    assert engine.stats()["num_running"] >= 0


class StubEngine:
    """Just enough of LLMEngine to drive the loop: requests never finish; step may raise."""

    scheduler_config = SimpleNamespace(max_num_seqs=2)
    kv = SimpleNamespace(lock=threading.RLock())  # LLMEngine.kv always has its lock

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.requests: set[str] = set()
        self.step_stats = StepRecorder()  # no step is ever recorded: pop() gives None

    def add_request(self, prompt: object, params: object, request_id: str, priority: int,
                    stream: bool) -> str:
        self.requests.add(request_id)
        return request_id

    def abort_request(self, request_id: str) -> None:
        self.requests.discard(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list:
        if self.fail:
            raise RuntimeError("boom")
        time.sleep(0.005)
        return []


def test_a_crashing_step_fails_every_stream_and_new_requests():
    engine = AsyncEngine(StubEngine(fail=True), max_queue=0, name="stub")
    assert engine.health() == "not started"
    engine.start()

    async def main() -> None:
        with pytest.raises(EngineDeadError, match="boom"):
            async for _ in engine.generate("x", GREEDY):
                pass
        with pytest.raises(EngineDeadError):
            engine.generate("y", GREEDY)

    asyncio.run(main())
    assert not engine.is_alive
    assert engine.health() == "crashed: RuntimeError('boom')"
    engine.shutdown()


def test_shutdown_ends_open_streams():
    stub = StubEngine(fail=False)
    engine = AsyncEngine(stub, max_queue=0, name="stub")
    engine.start()

    async def main() -> None:
        outputs = engine.generate("x", GREEDY)
        while not stub.requests:
            await asyncio.sleep(0.005)
        threading.Thread(target=engine.shutdown).start()
        with pytest.raises(EngineDeadError, match="shut down"):
            await anext(outputs)  # type: ignore[arg-type]

    asyncio.run(main())
    assert not engine.is_alive and engine.num_in_flight == 0
    assert engine.health() == "shut down"


def test_max_queue_must_not_be_negative():
    with pytest.raises(ValueError, match="max_queue"):
        AsyncEngine(StubEngine(fail=False), max_queue=-1)
