"""The front's handle on one replica's worker process: an `EngineClient` over its data channel.

A `WorkerClient` outlives the processes behind it: the supervisor `attach`es each incarnation
(after its `Ready`) and the client `detach`es when the channel closes. Requests the dead worker
held end with `WorkerDiedError`; `retryable` tells the router whether the consumer has seen
nothing of the request yet, so another replica may run it from the start.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from elasticserve.engine.client_streams import Stream, StreamTable, iterate
from elasticserve.engine.pd import KVHandedOver, KVHandOff
from elasticserve.engine.protocol import (
    EngineDeadError,
    EnginePrompt,
    OutputObserver,
    RequestTiming,
    TokenizerLike,
)
from elasticserve.outputs import RequestOutput
from elasticserve.procs.transport import Channel, ChannelClosed
from elasticserve.procs.worker_messages import (
    AbortRequest,
    AddRequest,
    AdoptRequest,
    Call,
    Ready,
    ReleaseHandOff,
    Reply,
    Status,
    StepResult,
    Stop,
)
from elasticserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class WorkerDiedError(EngineDeadError):
    """The worker running a request died. `retryable`: nothing of it reached the consumer."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class WorkerClient:
    """One replica slot: the current worker process (if any) and its open requests."""

    def __init__(self, worker: str, model: str, tokenizer: TokenizerLike, max_queue: int,
                 max_num_seqs: int, call_timeout_s: float = 60.0,
                 role: str = "colocated") -> None:
        self.worker = worker
        self.model = model
        self.role = role  # colocated | prefill | decode
        # decode role: called with a request id once its handed-over KV is in place
        self.on_received: Callable[[str], None] | None = None
        self._tokenizer = tokenizer
        self.observer: OutputObserver | None = None
        self.call_timeout_s = call_timeout_s
        self.streams = StreamTable(worker, max_num_seqs + max_queue, self.abort)
        self.state = "starting"  # starting | ready | dead | stopped
        self.pid: int | None = None
        self.restarts = 0
        self.ready_info: Ready | None = None
        self.last_stats: dict[str, Any] = {}
        self.last_memory: dict[str, int] = {}
        self.last_busy = time.monotonic()  # a request was open (for idle sleep)
        self.last_heard = time.monotonic()  # the worker's last message (for the watchdog)
        self.on_death: Callable[[WorkerClient], None] | None = None
        self._channel: Channel | None = None
        self._lock = threading.Lock()
        self._calls: dict[int, tuple[threading.Event, list[Reply]]] = {}
        self._call_ids = itertools.count(1)

    # ---- incarnations -----------------------------------------------------------------------
    def attach(self, channel: Channel, ready: Ready) -> None:
        """A new worker process answered Ready on `channel`: serve through it."""
        with self._lock:
            self._channel, self.ready_info, self.pid = channel, ready, ready.pid
            self.last_stats, self.last_memory = ready.stats, ready.memory_stats
            self.last_heard = time.monotonic()
            self.state = "ready"
        threading.Thread(target=self._read, args=(channel,), name=f"read-{self.worker}",
                         daemon=True).start()

    def _read(self, channel: Channel) -> None:
        try:
            while True:
                msg, _ = channel.recv()
                self._dispatch(msg)
        except ChannelClosed:
            pass
        except Exception:  # noqa: BLE001 - a bad message: treat the worker as dead
            logger.exception("reading from worker %s failed", self.worker)
        self._detach(channel)

    def _dispatch(self, msg: object) -> None:
        self.last_heard = time.monotonic()
        if isinstance(msg, StepResult):
            self.last_stats, self.last_memory = msg.stats, msg.memory_stats
            self.last_busy = time.monotonic()
            for request_id, exc in msg.errors:
                self.streams.send(request_id, exc, final=True)
            self.streams.observe_step(msg.step_stats, self.observer)
            self.streams.deliver(msg.outputs, self.observer)
            for handoff in msg.handoffs:  # the request goes on elsewhere: its stream ends here
                self.streams.send(handoff.request_id, KVHandedOver(handoff), final=True)
            if self.on_received is not None:
                for request_id in msg.received:
                    self.on_received(request_id)
        elif isinstance(msg, Status):
            self.last_stats, self.last_memory = msg.stats, msg.memory_stats
        elif isinstance(msg, Reply):
            with self._lock:
                waiter = self._calls.pop(msg.call_id, None)
            if waiter is not None:
                waiter[1].append(msg)
                waiter[0].set()

    def _detach(self, channel: Channel) -> None:
        with self._lock:
            if self._channel is not channel:
                return
            self._channel = None
            stopped = self.state == "stopped"
            self.state = "stopped" if stopped else "dead"
            calls, self._calls = self._calls, {}
        channel.close()
        for event, _ in calls.values():
            event.set()  # their callers see no reply: the worker is gone
        why = "was shut down" if stopped else "died"

        def error(stream: Stream) -> BaseException:
            return WorkerDiedError(f"the worker of model {self.model!r} {why} while running "
                                   "this request", retryable=stream.delivered == 0)

        self.streams.fail_each(error)
        if not stopped and self.on_death is not None:
            self.on_death(self)

    # ---- EngineClient ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.model

    @property
    def max_model_len(self) -> int:
        assert self.ready_info is not None, "the worker has not started yet"
        return self.ready_info.max_model_len

    @property
    def tokenizer(self) -> TokenizerLike:
        return self._tokenizer

    def start(self) -> None:
        """Workers are started by the supervisor."""

    def health(self) -> str | None:
        return None if self.state == "ready" else f"worker {self.worker} is {self.state}"

    def validate(self, prompt: EnginePrompt, params: SamplingParams
                 ) -> tuple[str | None, list[int]]:
        text, ids = self.call("validate", prompt, params)
        return text, list(ids)

    def generate(self, prompt: EnginePrompt, params: SamplingParams,
                 request_id: str | None = None, priority: int = 0,
                 stream: bool = False, arrival_time: float | None = None,
                 timing: RequestTiming | None = None) -> AsyncIterator[RequestOutput]:
        """`timing`: share one with the stream that continues this request elsewhere (P/D),
        so that its metrics see one request; by default a new one from `arrival_time`."""
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        timing = timing or RequestTiming(time.monotonic() if arrival_time is None
                                         else arrival_time)
        return self._submit(request_id, timing,
                            AddRequest(request_id, prompt, params, priority, stream))

    def adopt(self, handoff: KVHandOff, timing: RequestTiming) -> AsyncIterator[RequestOutput]:
        """Decode role: continue a request a prefill worker handed over."""
        return self._submit(handoff.request_id, timing, AdoptRequest(handoff))

    def release_handoff(self, request_id: str) -> None:
        """Prefill role: the hand-off of `request_id` is over; its blocks may go."""
        self._tell(ReleaseHandOff(request_id))

    def _tell(self, message: AbortRequest | ReleaseHandOff) -> None:
        """Send if a worker is attached: a dead worker holds nothing any more."""
        channel = self._channel
        if channel is not None:
            try:
                channel.send(message)
            except ChannelClosed:
                pass

    def _submit(self, request_id: str, timing: RequestTiming,
                message: AddRequest | AdoptRequest) -> AsyncIterator[RequestOutput]:
        channel = self._live_channel()
        queue = self.streams.open(request_id, timing)
        self.last_busy = time.monotonic()
        try:
            channel.send(message)
        except ChannelClosed:
            pass  # the reader sees the close and fails the stream (retryable)
        return iterate(queue, lambda: self.abort(request_id))

    def abort(self, request_id: str) -> None:
        if self.streams.close(request_id) is not None:
            self._tell(AbortRequest(request_id))

    def stats(self) -> dict[str, Any]:
        return dict(self.last_stats)

    def memory_stats(self) -> dict[str, int]:
        return dict(self.last_memory)

    def config_info(self) -> dict[str, str]:
        return dict(self.ready_info.config_info) if self.ready_info is not None else {}

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the worker to stop (the supervisor reaps the process)."""
        with self._lock:
            self.state = "stopped"
            channel = self._channel
        if channel is not None:
            try:
                channel.send(Stop())
            except ChannelClosed:
                pass

    # ---- calls ------------------------------------------------------------------------------
    def call(self, op: str, *args: Any, timeout: float | None = None) -> Any:
        """Run `op` on the worker and wait for its answer (blocking; not on the event loop).
        Raises the worker's error, or EngineDeadError if it dies or misses the deadline."""
        channel = self._live_channel()
        call_id = next(self._call_ids)
        event, box = threading.Event(), list[Reply]()
        with self._lock:
            self._calls[call_id] = (event, box)
        try:
            channel.send(Call(call_id, op, args))
        except ChannelClosed:
            pass
        if not event.wait(self.call_timeout_s if timeout is None else timeout):
            with self._lock:
                self._calls.pop(call_id, None)
            raise EngineDeadError(f"worker {self.worker} did not answer {op!r} in time")
        if not box:
            raise EngineDeadError(f"worker {self.worker} died during {op!r}")
        reply = box[0]
        if reply.error is not None:
            raise reply.error
        return reply.value

    def _live_channel(self) -> Channel:
        channel = self._channel
        if channel is None or self.state != "ready":
            raise EngineDeadError(f"model {self.model!r}: worker {self.worker} is {self.state}")
        return channel

    @property
    def load(self) -> tuple[int, int]:
        """What the router balances on: requests in flight, then KV bytes in use."""
        return len(self.streams), int(self.last_memory.get("kv_used_bytes", 0))

    def report(self) -> dict[str, Any]:
        """This worker for /admin/workers (pages and weights are added by the pool)."""
        mem = self.last_memory
        return {"worker": self.worker, "model": self.model, "role": self.role,
                "pid": self.pid, "state": self.state, "device": "cpu",
                "restarts": self.restarts, "in_flight": len(self.streams),
                "kv_pages": mem.get("pages_mapped", 0),
                "kv_mapped_bytes": mem.get("kv_mapped_bytes", 0),
                "asleep": bool(self.last_stats.get("asleep", False))}
