"""An LLMEngine driven by a background thread, with per-request asyncio output streams.

Steps are synchronous CPU work (tens of ms), so they run on a dedicated thread and never on the
event loop. The event loop talks to that thread only through a command queue (adds and aborts,
applied between steps) and gets outputs back with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from elasticserve.engine.client_streams import Item, StreamTable, iterate
from elasticserve.engine.protocol import (
    EngineDeadError,
    EngineOverloadedError,
    EnginePrompt,
    OutputObserver,
    RequestTiming,
    TokenizerLike,
)
from elasticserve.outputs import RequestOutput
from elasticserve.sampling_params import SamplingParams

if TYPE_CHECKING:  # only for types: the server imports this module, and needs no torch for it
    import asyncio

    from elasticserve.engine.llm_engine import LLMEngine

# the errors and observer types are the protocol's; re-exported for this module's callers
__all__ = ["AsyncEngine", "EngineDeadError", "EngineOverloadedError", "OutputObserver",
           "RequestTiming"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt: EnginePrompt
    params: SamplingParams
    priority: int
    stream: bool


@dataclass(slots=True)
class _Abort:
    request_id: str


class AsyncEngine:
    """Wraps one LLMEngine in-process: the `EngineClient` the server uses today.

    At most `engine.scheduler_config.max_num_seqs + max_queue` requests are in flight at once;
    beyond that `generate` raises EngineOverloadedError, so a burst is refused quickly instead of
    queueing without bound.
    """

    def __init__(self, engine: LLMEngine, max_queue: int = 256, name: str = "engine",
                 observer: OutputObserver | None = None) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine = engine
        self.name = name
        self.max_queue = max_queue
        self.observer = observer
        self.max_in_flight = int(engine.scheduler_config.max_num_seqs) + max_queue
        self._cv = threading.Condition()
        # commands from any thread, taken in one batch by the step thread between steps
        self._commands: list[_Add | _Abort] = []  # guarded by _cv
        self.streams = StreamTable(name, self.max_in_flight, self.abort)
        self._stopping = False
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the step thread (idempotent; the first request starts it too)."""
        with self._cv:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name=f"step-{self.name}",
                                                daemon=True)
                self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the step thread after the current step; open streams get EngineDeadError."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cv:  # aborts the step thread did not apply
            pending = [c.request_id for c in self._commands if isinstance(c, _Abort)]
        # requests still open
        open_ids = pending + self.streams.fail_all(
            EngineDeadError(f"engine {self.name!r} was shut down"))
        if self._thread is None or not self._thread.is_alive():
            # nobody steps it any more: free what the unfinished requests hold (their streams
            # just got the error), so the engine's pages and blocks all come back
            for request_id in open_ids:
                self.engine.abort_request(request_id)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def health(self) -> str | None:
        """None while the step loop runs; otherwise why not."""
        if self.error is not None:
            return f"crashed: {self.error!r}"
        if self._stopping:
            return "shut down"
        return None if self.is_alive else "not started"

    @property
    def num_in_flight(self) -> int:
        """Requests accepted and not yet finished or aborted."""
        return len(self.streams)

    # ---- what the server reads (any thread) -----------------------------------------------
    @property
    def max_model_len(self) -> int:
        return int(self.engine.scheduler_config.max_model_len)

    @property
    def tokenizer(self) -> TokenizerLike:
        return self.engine.tokenizer

    def stats(self) -> dict[str, Any]:
        # plain reads of counters owned by the step thread: a reader may see a value one step
        # old, which is fine for monitoring and needs no lock on the hot path
        return self.engine.stats()

    def memory_stats(self) -> dict[str, int]:
        broker = self.engine.broker  # the shared budget's ModelHost; None on a private budget
        return {**self.engine.kv.memory_stats(),
                "pages_reclaimed": broker.pages_reclaimed if broker is not None else 0}

    def config_info(self) -> dict[str, str]:
        cache, kv = self.engine.cache_config, self.engine.kv
        return {"block_size": str(cache.block_size), "kv_cache_mode": cache.kv_cache_mode,
                "cache_dtype": str(kv.vt.dtype).removeprefix("torch."),
                "enable_prefix_caching": str(cache.enable_prefix_caching),
                "preemption_mode": cache.preemption_mode, "swap_space_bytes": str(cache.swap_space),
                "kv_cache_min_bytes": str(cache.kv_cache_min_bytes),
                "page_size": str(kv.page_size)}

    # ---- requests (any thread / the event loop) -------------------------------------------
    def validate(self, prompt: EnginePrompt, params: SamplingParams
                 ) -> tuple[str | None, list[int]]:
        """Tokenize and check a request without queueing it (raises ValueError naming the field).

        Only reads the tokenizer and fixed limits, so it is safe off the step thread."""
        text, token_ids = self.engine.validate(prompt, params)
        return text, list(token_ids)

    def generate(self, prompt: EnginePrompt, params: SamplingParams,
                 request_id: str | None = None, priority: int = 0,
                 stream: bool = False, arrival_time: float | None = None
                 ) -> AsyncIterator[RequestOutput]:
        """Submit now and return the request's outputs: with `stream`, progress every step that
        adds tokens, always the final one last. Must be called on the event loop.

        Raises EngineOverloadedError / EngineDeadError right away, so a server can answer 503
        before it starts a response; an error from the engine's add_request (ValueError) comes
        from the iterator. Closing or cancelling the iterator early aborts the request, which
        frees its KV blocks; the iterator must therefore be consumed or closed. Latency metrics
        count from `arrival_time` (time.monotonic(); default now)."""
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        timing = RequestTiming(time.monotonic() if arrival_time is None else arrival_time)
        queue = self._submit(request_id, prompt, params, priority, stream, timing)
        return iterate(queue, lambda: self.abort(request_id))

    def _submit(self, request_id: str, prompt: EnginePrompt, params: SamplingParams,
                priority: int, stream: bool, timing: RequestTiming
                ) -> asyncio.Queue[Item]:
        self.start()
        with self._cv:
            if self.error is not None or self._stopping:
                raise EngineDeadError(f"engine {self.name!r} is not running") from self.error
            queue = self.streams.open(request_id, timing)
            self._commands.append(_Add(request_id, prompt, params, priority, stream))
            self._cv.notify()
        return queue

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; unknown or finished ids are ignored."""
        if self.streams.close(request_id) is None:
            return
        with self._cv:
            self._commands.append(_Abort(request_id))
            self._cv.notify()

    # ---- the step thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                commands = self._wait_for_work()
                if commands is None:
                    return
                self._apply(commands)
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    self.streams.observe_step(self.engine.step_stats.pop(), self.observer)
                    self.streams.deliver(outputs, self.observer)
        except BaseException as exc:  # noqa: BLE001 - a dead loop must fail every waiter
            logger.exception("step loop of engine %r crashed", self.name)
            with self._cv:
                self.error = exc
            self.streams.fail_all(EngineDeadError(f"engine {self.name!r} crashed: {exc!r}"))

    def _wait_for_work(self) -> list[_Add | _Abort] | None:
        """Sleep while there is nothing to step; return the pending commands (None: stop)."""
        with self._cv:
            while not (self._stopping or self._commands or self.engine.has_unfinished_requests()):
                self._cv.wait()
            if self._stopping:
                return None
            commands, self._commands = self._commands, []
            return commands

    def _apply(self, commands: list[_Add | _Abort]) -> None:
        # The elastic KV reclaimer compacts blocks under this lock; freeing blocks must not race it.
        lock = self.engine.kv.lock
        for cmd in commands:
            if isinstance(cmd, _Abort):
                with lock:
                    self.engine.abort_request(cmd.request_id)
                continue
            try:
                self.engine.add_request(cmd.prompt, cmd.params, request_id=cmd.request_id,
                                        priority=cmd.priority, stream=cmd.stream)
            except Exception as exc:  # noqa: BLE001 - bad input goes back to its caller
                self.streams.send(cmd.request_id, exc, final=True)
