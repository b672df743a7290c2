"""Per-request output streams of an engine client, shared by the in-process `AsyncEngine` and
the worker-process client (`procs/worker_client.py`).

The step side (a step thread, or the thread reading a worker's socket) hands each step's stats
and outputs to `StreamTable`; the event loop side reads one asyncio queue per request. Every
method is thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from elasticserve.engine.protocol import EngineOverloadedError, OutputObserver, RequestTiming
from elasticserve.outputs import RequestOutput, StepStats

logger = logging.getLogger(__name__)

Item = RequestOutput | BaseException


@dataclass(slots=True)
class Stream:
    """Where one request's outputs go: a queue owned by the caller's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Item]
    timing: RequestTiming
    delivered: int = 0  # outputs handed to the consumer so far


class StreamTable:
    """The open requests of one engine client, at most `max_in_flight` at once.

    `on_lost(request_id)` is called when a consumer's event loop has closed, so that the
    client aborts the request and its blocks are freed."""

    def __init__(self, name: str, max_in_flight: int,
                 on_lost: Callable[[str], None]) -> None:
        self.name = name
        self.max_in_flight = max_in_flight
        self.on_lost = on_lost
        self._lock = threading.Lock()
        self._streams: dict[str, Stream] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._streams)

    def open(self, request_id: str, timing: RequestTiming) -> asyncio.Queue[Item]:
        """Register a request (on the caller's event loop); raises when full or a duplicate."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Item] = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            if len(self._streams) >= self.max_in_flight:
                raise EngineOverloadedError(
                    f"engine {self.name!r} has {len(self._streams)} requests in flight "
                    f"(limit {self.max_in_flight}); retry later")
            self._streams[request_id] = Stream(loop, queue, timing)
        return queue

    def close(self, request_id: str) -> Stream | None:
        """Forget a request (aborted or done); its stream if it was open."""
        with self._lock:
            return self._streams.pop(request_id, None)

    def get(self, request_id: str) -> Stream | None:
        with self._lock:
            return self._streams.get(request_id)

    def observe_step(self, stats: StepStats | None, observer: OutputObserver | None) -> None:
        """Hand a step's stats to the observer before its outputs go out, so the metrics
        already count every token a client has been handed."""
        if stats is None or observer is None:
            return
        with self._lock:
            timings = {rid: stream.timing for rid in stats.new_tokens
                       if (stream := self._streams.get(rid)) is not None}
        try:
            observer.on_step(stats, timings)
        except Exception:  # noqa: BLE001 - metrics must never stop serving
            logger.exception("step observer failed")

    def deliver(self, outputs: list[RequestOutput], observer: OutputObserver | None) -> None:
        """A step's outputs to their streams: ONE wake-up of each consumer loop per step (a
        `call_soon_threadsafe` per output woke the loop and wrote its self-pipe B times)."""
        now = time.monotonic()
        batches: dict[asyncio.AbstractEventLoop, list[tuple[str, asyncio.Queue[Item], Item]]] = {}
        for out in outputs:
            stream = self.get(out.request_id)
            if stream is None:
                continue  # aborted meanwhile: its consumer is gone
            # record first, so metrics already count whatever a client has been handed
            if observer is not None:
                try:
                    observer.on_output(out, stream.timing, now)
                except Exception:  # noqa: BLE001 - metrics must never stop serving
                    logger.exception("output observer failed")
            stream = self._book(out.request_id, out, final=out.finished)
            if stream is not None:
                batches.setdefault(stream.loop, []).append((out.request_id, stream.queue, out))
        for loop, items in batches.items():
            if not call_soon(loop, _put_all, items):
                for request_id, _, _ in items:
                    self.on_lost(request_id)  # the caller's loop is closed; free the blocks

    def send(self, request_id: str, item: Item, final: bool) -> None:
        stream = self._book(request_id, item, final)
        if stream is None:
            return  # aborted meanwhile: its consumer is gone
        if not call_soon(stream.loop, stream.queue.put_nowait, item):
            self.on_lost(request_id)  # the caller's loop is closed; free the blocks

    def _book(self, request_id: str, item: Item, final: bool) -> Stream | None:
        """The open stream of `request_id` with `item` counted (forgotten if `final`)."""
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is not None and final:
                del self._streams[request_id]
            if stream is not None and not isinstance(item, BaseException):
                stream.delivered += 1
        return stream

    def fail_all(self, exc: BaseException) -> list[str]:
        """End every open request with `exc`; returns their ids."""
        return self.fail_each(lambda _stream: exc)

    def fail_each(self, error: Callable[[Stream], BaseException]) -> list[str]:
        """End every open request with the error `error(stream)` makes; returns their ids."""
        with self._lock:
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            call_soon(stream.loop, stream.queue.put_nowait, error(stream))
        return list(streams)


async def iterate(queue: asyncio.Queue[Item], on_abort: Callable[[], None]
                  ) -> AsyncIterator[RequestOutput]:
    """A request's outputs until the final one; leaving early calls `on_abort`."""
    finished = False
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                finished = True  # the engine already forgot it (add failed, or engine died)
                raise item
            finished = item.finished
            yield item
            if finished:
                return
    finally:
        if not finished:
            on_abort()


def _put_all(items: list[tuple[str, asyncio.Queue[Item], Item]]) -> None:
    for _, queue, item in items:
        queue.put_nowait(item)


def call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> bool:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed
        return False
    return True
