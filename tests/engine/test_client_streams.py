"""StreamTable: a step's outputs reach their streams in order, with one loop wake-up per step."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from elasticserve.engine.client_streams import StreamTable
from elasticserve.engine.protocol import RequestTiming
from elasticserve.outputs import RequestOutput


def _out(rid: str, finished: bool = False) -> RequestOutput:
    return RequestOutput(request_id=rid, prompt=None, prompt_token_ids=[1], prompt_logprobs=None,
                         outputs=[], finished=finished)


class _CountingLoop:
    """Stands in for a stream's loop: counts thread-safe wake-ups, runs each callback at once
    (or refuses, as a closed loop does)."""

    def __init__(self, closed: bool = False) -> None:
        self.calls = 0
        self.closed = closed

    def call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.closed:
            raise RuntimeError("Event loop is closed")
        self.calls += 1
        fn(*args)


def test_a_step_wakes_each_loop_once_and_keeps_order() -> None:
    async def run() -> None:
        table = StreamTable("m", 8, lambda rid: None)
        queues = {rid: table.open(rid, RequestTiming(time.monotonic())) for rid in "abc"}
        fake = _CountingLoop()
        for rid in "abc":
            table.get(rid).loop = fake  # type: ignore[union-attr]
        table.deliver([_out("a"), _out("b"), _out("c", finished=True)], None)
        table.deliver([_out("a"), _out("zz")], None)  # an unknown id is skipped
        assert fake.calls == 2  # one per step, not one per output
        assert [queues["a"].get_nowait().request_id for _ in range(2)] == ["a", "a"]
        assert queues["c"].get_nowait().finished and table.get("c") is None
        assert table.get("a").delivered == 2  # type: ignore[union-attr]
        assert queues["b"].qsize() == 1 and queues["c"].empty()

    asyncio.run(run())


def test_a_closed_loop_loses_every_request_of_the_step() -> None:
    async def run() -> None:
        lost: list[str] = []
        table = StreamTable("m", 8, lost.append)
        for rid in "ab":
            table.open(rid, RequestTiming(time.monotonic()))
            table.get(rid).loop = _CountingLoop(closed=True)  # type: ignore[union-attr,assignment]
        table.deliver([_out("a"), _out("b")], None)
        assert sorted(lost) == ["a", "b"]

    asyncio.run(run())
