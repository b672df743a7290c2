"""Graceful shutdown of `elasticserve serve`: drain on SIGTERM / SIGINT with a deadline, exit 0.

What uvicorn alone does on SIGTERM: it closes the listening sockets and waits for open
connections to finish, for `timeout_graceful_shutdown` (default: forever), and then re-raises
the signal it captured, so the process dies of it (exit status -15) and no `finally` after
`Server.run` runs. A stream that never ends by itself (a long generation, a client that reads
slowly) therefore held shutdown for as long as the client cared to stay.

`GracefulServer` changes three things:

1. at `shutdown_timeout_s` after the signal, every engine is shut down: requests still
   generating end at once (a stream gets an error event and `[DONE]`, a plain request a 503),
   so their HTTP tasks finish by themselves;
2. uvicorn's own deadline, `ABORT_GRACE_S` later, cancels whatever is still stuck, e.g. a
   response blocked on a client that stopped reading;
3. the captured signal is not re-raised: the process returns from `run()` and exits 0 after
   `close()` has stopped the engines and released the memory budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import threading
from collections.abc import Callable, Generator, Mapping
from socket import socket

import uvicorn

from elasticserve.engine.protocol import EngineClient

logger = logging.getLogger(__name__)

# after the engines are shut down, uvicorn waits this much longer before cancelling the HTTP
# tasks that still have not finished (a send blocked on a client that stopped reading)
ABORT_GRACE_S = 1.0
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulServer(uvicorn.Server):
    """A uvicorn server that drains on a signal, aborts what is left at a deadline, and
    returns from `run()` instead of re-raising the signal."""

    def __init__(self, config: uvicorn.Config, engines: Mapping[str, EngineClient],
                 shutdown_timeout_s: float, on_close: Callable[[], None] | None = None) -> None:
        if shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {shutdown_timeout_s}")
        # uvicorn's own deadline is the backstop behind ours
        config.timeout_graceful_shutdown = math.ceil(shutdown_timeout_s + ABORT_GRACE_S)
        super().__init__(config)
        self.engines = engines
        self.shutdown_timeout_s = shutdown_timeout_s
        self._on_close = on_close
        self._closed = False

    async def shutdown(self, sockets: list[socket] | None = None) -> None:
        """Stop accepting, let in-flight requests finish until the deadline, abort the rest."""
        logger.info("shutting down: in-flight requests have %.1f s to finish",
                    self.shutdown_timeout_s)
        deadline = asyncio.create_task(self._abort_at_deadline())
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    async def _abort_at_deadline(self) -> None:
        await asyncio.sleep(self.shutdown_timeout_s)
        busy = [name for name, e in self.engines.items() if e.health() is None]
        logger.warning("shutdown deadline (%.1f s) passed: aborting requests of %s",
                       self.shutdown_timeout_s, busy)
        # shutdown joins the step thread (at most one step): not on the event loop
        await asyncio.to_thread(self._shutdown_engines)

    def _shutdown_engines(self) -> None:
        for engine in self.engines.values():
            engine.shutdown()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """uvicorn's handler (first signal: drain; a second SIGINT: force), without re-raising
        the signal afterwards: a drained server exits normally."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach only the main thread; the owner stops us (should_exit)
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def close(self) -> None:
        """Stop every engine and release what they hold (idempotent); after `run()`."""
        if self._closed:
            return
        self._closed = True
        self._shutdown_engines()
        if self._on_close is not None:
            self._on_close()
