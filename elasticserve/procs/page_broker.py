"""The front process's page broker: one budget (the `Arbiter`) and the physical KV pages of
every worker process.

Each worker's KV pages are slots of one memfd the broker creates, sized (sparse) to the
worker's KV reservation and passed to it once (SCM_RIGHTS) at registration: the worker maps
slot i at page i of its KV range, always a prefix, so its mapped pages are one kernel mapping.
The broker decides every grant under the arbiter's lock (no check-then-allocate race between
processes) and keeps, per worker, the pages it holds (``WorkerPages.held``, = the arbiter's
KV grant). Every page that leaves a worker (a release, a reclaim, a sleep, its death) is
punched out of the memfd by the broker, so the memory really returns however the worker
behaves. The same per-worker thread serves other front services' messages
(``extra_handlers``, e.g. shared weights) on the worker's ``pages`` channel.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from elasticserve.core.arbiter import Arbiter, ArbiterError, ArbiterPolicy
from elasticserve.memory.linux import punch_hole
from elasticserve.procs.messages import (
    BrokerError,
    CancelWake,
    Grant,
    Registered,
    RegisterWorker,
    Release,
    Wake,
)
from elasticserve.procs.remote_reclaimer import RemoteReclaimer
from elasticserve.procs.transport import Channel, ChannelClosed

logger = logging.getLogger(__name__)

# (worker, message) -> (reply, fds to send with it: handed over, the broker closes them once
# sent; e.g. WeightsRegistry.handle returns duplicates of its memfds)
Handler = Callable[[str, object], tuple[object, list[int]]]


@dataclass(slots=True)
class WorkerPages:
    """The broker's record of one worker: its channels, its KV memfd, the pages it holds."""

    worker: str
    pages: Channel
    reclaim: Channel
    reclaimer: RemoteReclaimer | None = None
    fd: int = -1  # the KV memfd, owned by the broker (-1 until registered, or once closed)
    slots: int = 0
    held: int = 0  # slots [0, held) are the worker's pages
    registered: bool = False
    thread: threading.Thread | None = field(default=None, repr=False)


class PageBroker:
    """Grants, releases, reclaims and frees the KV pages of worker processes on one budget."""

    def __init__(self, budget_bytes: int, page_size: int, policy: ArbiterPolicy | None = None,
                 reclaim_deadline_s: float = 2.0,
                 extra_handlers: Mapping[type, Handler] | None = None,
                 on_worker_gone: Sequence[Callable[[str], None]] = ()) -> None:
        """``extra_handlers``: message type -> handler, for other front services on the
        ``pages`` channel (e.g. `WeightsRegistry.handle`); ``on_worker_gone``: called with the
        worker's name once it is gone (e.g. `WeightsRegistry.worker_gone`)."""
        self.arbiter = Arbiter(budget_bytes, page_size, policy)
        self.page_size = page_size
        self.reclaim_deadline_s = reclaim_deadline_s
        self.extra_handlers = dict(extra_handlers or {})
        self.on_worker_gone = list(on_worker_gone)
        self.workers: dict[str, WorkerPages] = {}
        self.dead: list[str] = []  # workers seen dying, in order

    # ---- workers -------------------------------------------------------------------------------
    def serve(self, worker: str, pages: Channel, reclaim: Channel) -> WorkerPages:
        """Start serving a worker's ``pages`` channel (one thread); ``reclaim`` carries the
        arbiter's reclaim requests to it. The worker registers with `RegisterWorker` first."""
        with self.arbiter.lock:
            if worker in self.workers:
                raise ValueError(f"worker {worker!r} is already served")
            rec = WorkerPages(worker, pages, reclaim)
            self.workers[worker] = rec
        rec.thread = threading.Thread(target=self._serve, args=(rec,), daemon=True,
                                      name=f"pages-{worker}")
        rec.thread.start()
        return rec

    def _serve(self, rec: WorkerPages) -> None:
        try:
            while True:
                msg, fds = rec.pages.recv()
                for fd in fds:  # no message to the broker carries fds
                    os.close(fd)
                reply, out = self._handle(rec, msg)
                try:
                    rec.pages.send(reply, out)
                finally:
                    if not isinstance(msg, RegisterWorker):
                        for fd in out:  # an extra handler's fds are ours once returned
                            os.close(fd)
        except ChannelClosed:
            pass
        finally:
            self.worker_died(rec.worker)

    def _handle(self, rec: WorkerPages, msg: object) -> tuple[object, list[int]]:
        try:
            if isinstance(msg, RegisterWorker):
                return self._register(rec, msg)
            handler = self.extra_handlers.get(type(msg))
            if handler is not None:
                return handler(rec.worker, msg)
            return self._pages_message(rec, msg), []
        except (ArbiterError, ValueError, OSError) as exc:
            return BrokerError(f"{type(exc).__name__}: {exc}"), []

    def _register(self, rec: WorkerPages, msg: RegisterWorker) -> tuple[object, list[int]]:
        if msg.worker != rec.worker or rec.registered:
            raise ValueError(f"worker {rec.worker!r} registers as {msg.worker!r} "
                             f"(registered already: {rec.registered})")
        if msg.kv_max_bytes <= 0:
            raise ValueError(f"kv_max_bytes must be > 0, got {msg.kv_max_bytes}")
        slots = -(-msg.kv_max_bytes // self.page_size)
        fd = os.memfd_create(f"elasticserve-kv-{rec.worker}", os.MFD_CLOEXEC)
        with self.arbiter.lock:  # a reclaim may reach the worker as soon as it is registered
            os.ftruncate(fd, slots * self.page_size)  # sparse: nothing allocated yet
            rec.fd, rec.slots = fd, slots
            rec.reclaimer = RemoteReclaimer(rec.reclaim, lambda after: self._shrink(rec, after),
                                            self.reclaim_deadline_s)
            try:
                # never more pages than the memfd (the worker's reservation) has slots
                ceiling = min(msg.max_bytes or slots * self.page_size, slots * self.page_size)
                self.arbiter.register(rec.worker, msg.weights_bytes, msg.min_bytes, ceiling,
                                      msg.priority, reclaimer=rec.reclaimer,
                                      weights_key=msg.weights_key)
            except BaseException:
                os.close(fd)
                rec.fd, rec.reclaimer = -1, None
                raise
            rec.registered = True
        return Registered(self.page_size, slots), [fd]

    def _pages_message(self, rec: WorkerPages, msg: object) -> object:
        if not rec.registered:
            raise ValueError(f"worker {rec.worker!r} sent {type(msg).__name__} before "
                             f"RegisterWorker")
        name = rec.worker
        with self.arbiter.lock:  # decided and booked together: no two workers get one page
            if isinstance(msg, Grant):
                self._sync(rec, msg.mapped)
                pages = min(msg.pages, rec.slots - rec.held)  # an admin may raise the ceiling
                if pages < msg.at_least:
                    return 0
                got = self.arbiter.request(name, pages, msg.at_least)
                rec.held += got
                return got
            if isinstance(msg, Release):
                self._sync(rec, msg.mapped_after)
                return None
            if isinstance(msg, Wake):
                return self.arbiter.wake(name)
            if isinstance(msg, CancelWake):
                self._sync(rec, 0)
                self.arbiter.cancel_wake(name)
                return None
        raise ValueError(f"unknown message {type(msg).__name__} on the pages channel")

    def _sync(self, rec: WorkerPages, mapped: int) -> None:
        """The worker maps ``mapped`` pages now: book and punch what it gave up since."""
        if not 0 <= mapped <= rec.held:
            raise ArbiterError(f"worker {rec.worker!r} maps {mapped} pages but holds {rec.held}")
        freed = self._shrink(rec, mapped)
        if freed:
            self.arbiter.release(rec.worker, freed)

    def _shrink(self, rec: WorkerPages, mapped_after: int) -> int:
        """Punch slots [mapped_after, held) out of the memfd; returns how many (the caller
        books them). Called under the arbiter's lock."""
        freed = rec.held - max(0, mapped_after)
        if freed <= 0 or rec.fd < 0:
            return 0
        punch_hole(rec.fd, mapped_after * self.page_size, freed * self.page_size)
        rec.held = mapped_after
        return freed

    def worker_died(self, worker: str) -> None:
        """The worker is gone (EOF, kill -9, exit): its pages go back to the budget, its memfd
        is punched and closed (its mappings died with it), it leaves the arbiter. Idempotent."""
        with self.arbiter.lock:
            rec = self.workers.pop(worker, None)
            if rec is None:
                return
            self.dead.append(worker)
            if rec.reclaimer is not None:
                rec.reclaimer.closed = True
            if rec.registered:
                self.arbiter.release(worker, self.arbiter.kv_pages(worker))
                self.arbiter.unregister(worker)
            if rec.fd >= 0:
                punch_hole(rec.fd, 0, rec.slots * self.page_size)
                os.close(rec.fd)
                rec.fd, rec.held = -1, 0
        rec.pages.close()
        rec.reclaim.close()
        for hook in self.on_worker_gone:
            hook(worker)
        logger.info("worker %s gone: its pages are back in the budget", worker)

    # ---- observability -------------------------------------------------------------------------
    @property
    def reclaim_timeouts(self) -> int:
        """Reclaim calls a live worker did not answer within the deadline."""
        with self.arbiter.lock:
            return sum(r.reclaimer.timeouts for r in self.workers.values() if r.reclaimer)

    def held(self, worker: str) -> int:
        with self.arbiter.lock:
            return self.workers[worker].held

    def check_integrity(self) -> None:
        """Raise ArbiterError unless the arbiter's books hold, every worker's grant equals the
        pages it holds, and no memfd has more memory allocated than its held pages."""
        with self.arbiter.lock:
            self.arbiter.check_integrity()
            for rec in self.workers.values():
                if not rec.registered:
                    continue
                booked = self.arbiter.kv_pages(rec.worker)
                allocated = os.fstat(rec.fd).st_blocks * 512
                if booked != rec.held or allocated > rec.held * self.page_size:
                    raise ArbiterError(f"worker {rec.worker!r}: booked {booked} pages, holds "
                                       f"{rec.held}, memfd has {allocated} bytes allocated")

    def close(self) -> None:
        """Close every worker's channels (their threads end and clean up)."""
        for rec in list(self.workers.values()):
            rec.pages.close()
            rec.reclaim.close()
            if rec.thread is not None:
                rec.thread.join(5)
        for worker in list(self.workers):
            self.worker_died(worker)
