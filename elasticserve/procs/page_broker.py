"""The front process's page broker: one budget (the `Arbiter`) and the physical KV pages of
every worker process.

Each worker's KV pages are slots of a memfd the broker creates (sparse) and passes to it once
(SCM_RIGHTS) at registration: its KV group's file (procs/kv_groups.py; a worker without a
group is a group of one, whose slot i backs page i of its KV range, one kernel mapping).
The broker decides every grant under the arbiter's lock (no check-then-allocate race between
processes), picks its slots (the `Granted` reply) and keeps, per worker, the slot behind each
page it holds (``WorkerPages.held``, = the arbiter's KV grant). Every page that leaves a
worker (a release, a reclaim, a sleep, its death) is punched out of the file by the broker,
so the memory really returns however the worker behaves. Workers of one group hand pages to
each other (Offer/Take/Withdraw) by swapping slots, zero bytes copied. A step's workspace
pages are booked under the worker too, without slots (procs/page_broker_spare.py). The same
per-worker thread serves other front services' messages (``extra_handlers``, e.g. shared weights) on the
worker's ``pages`` channel.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from elasticserve.core.arbiter import Arbiter, ArbiterError, ArbiterPolicy
from elasticserve.procs.kv_groups import KVGroup
from elasticserve.procs.messages import (
    Ack,
    BrokerError,
    CancelWake,
    Grant,
    Granted,
    Offer,
    Registered,
    RegisterWorker,
    Release,
    Take,
    Taken,
    Wake,
    Withdraw,
    Withdrawn,
)
from elasticserve.procs.page_broker_spare import SpareBooks
from elasticserve.procs.remote_reclaimer import RemoteReclaimer
from elasticserve.procs.transport import Channel, ChannelClosed

logger = logging.getLogger(__name__)

# (worker, message) -> (reply, fds to send with it: handed over, the broker closes them once
# sent; e.g. WeightsRegistry.handle returns duplicates of its memfds)
Handler = Callable[[str, object], tuple[object, list[int]]]


@dataclass(slots=True)
class WorkerPages:
    """The broker's record of one worker: its channels, its KV group, its reservation."""

    worker: str
    pages: Channel
    reclaim: Channel
    reclaimer: RemoteReclaimer | None = None
    group: KVGroup | None = None  # its KV group (None until registered)
    slots: int = 0  # its KV reservation in pages: it never holds more
    spare: int = 0  # workspace pages booked under it (its arena maps them; no slots)
    registered: bool = False
    thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def fd(self) -> int:
        """Its group's file, owned by the broker (-1 until registered, or once closed)."""
        return -1 if self.group is None else self.group.fd

    @property
    def held(self) -> int:
        """Pages it holds: page indices [0, held), each backed by a slot of the group file."""
        return 0 if self.group is None else len(self.group.backing.get(self.worker, ()))


class PageBroker(SpareBooks):
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
        self.groups: dict[str, KVGroup] = {}  # named KV groups with members

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
        with self.arbiter.lock:  # a reclaim may reach the worker as soon as it is registered
            group = self._join(rec.worker, msg.kv_group, slots)
            rec.reclaimer = RemoteReclaimer(rec.reclaim, lambda after: self._shrink(rec, after),
                                            self.reclaim_deadline_s,
                                            book_spare=lambda after: self._drop_spare(rec, after))
            try:
                # never more pages than the worker's reservation
                ceiling = min(msg.max_bytes or slots * self.page_size, slots * self.page_size)
                self.arbiter.register(rec.worker, msg.weights_bytes, msg.min_bytes, ceiling,
                                      msg.priority, reclaimer=rec.reclaimer,
                                      weights_key=msg.weights_key)
            except BaseException:
                self._leave(rec.worker, group)
                rec.reclaimer = None
                raise
            rec.group, rec.slots, rec.registered = group, slots, True
        return Registered(self.page_size, slots), [group.fd]

    def _join(self, worker: str, name: str | None, slots: int) -> KVGroup:
        if name is not None and not name:
            raise ValueError("kv_group must be a non-empty name or None")
        group = self.groups.get(name) if name is not None else None
        if group is None:
            group = KVGroup(name, self.page_size)
        group.join(worker, slots)
        if name is not None:
            self.groups[name] = group
        return group

    def _leave(self, worker: str, group: KVGroup) -> None:
        if group.leave(worker) and group.name is not None:
            self.groups.pop(group.name, None)

    def _pages_message(self, rec: WorkerPages, msg: object) -> object:
        if not rec.registered:
            raise ValueError(f"worker {rec.worker!r} sent {type(msg).__name__} before "
                             f"RegisterWorker")
        name, group = rec.worker, rec.group
        assert group is not None
        with self.arbiter.lock:  # decided and booked together: no two workers get one page
            if self.workers.get(name) is not rec:
                raise ValueError(f"worker {name!r} is gone")
            if isinstance(msg, Grant):
                self._sync(rec, msg.mapped)
                pages = min(msg.pages, rec.slots - rec.held)  # an admin may raise the ceiling
                if pages < msg.at_least:
                    return Granted(0, ())
                got = self.arbiter.request(name, pages, msg.at_least)
                return Granted(got, group.grant(name, got))
            if isinstance(msg, Release):
                self._sync(rec, msg.mapped_after)
                return None
            if (spare := self._spare_message(rec, msg)) is not None:
                return spare.reply
            if isinstance(msg, Wake):
                return self.arbiter.wake(name)
            if isinstance(msg, CancelWake):
                self._sync(rec, 0)
                self._sync_spare(rec, 0)
                self.arbiter.cancel_wake(name)
                return None
            if isinstance(msg, Offer):
                group.offer(name, msg.handoff_id, tuple(msg.indices))
                return Ack()
            if isinstance(msg, Take):
                return Taken(group.take(name, msg.peer, msg.handoff_id, tuple(msg.mine)))
            if isinstance(msg, Withdraw):
                return Withdrawn(group.withdraw(name, msg.handoff_id))
        raise ValueError(f"unknown message {type(msg).__name__} on the pages channel")

    def _sync(self, rec: WorkerPages, mapped: int) -> None:
        """The worker maps ``mapped`` pages now: book and punch what it gave up since."""
        if not 0 <= mapped <= rec.held:
            raise ArbiterError(f"worker {rec.worker!r} maps {mapped} pages but holds {rec.held}")
        freed = self._shrink(rec, mapped)
        if freed:
            self.arbiter.release(rec.worker, freed)

    def _shrink(self, rec: WorkerPages, mapped_after: int) -> int:
        """Punch the slots behind page indices [mapped_after, held) out of the group file;
        returns how many (the caller books them). Called under the arbiter's lock."""
        if rec.group is None or rec.held <= max(0, mapped_after):
            return 0
        return rec.group.shrink(rec.worker, max(0, mapped_after))

    def worker_died(self, worker: str) -> None:
        """The worker is gone (EOF, kill -9, exit): its pages go back to the budget, their
        slots are punched (its mappings died with it), its offers die, it leaves the arbiter;
        its group file is closed with the last member. Idempotent."""
        with self.arbiter.lock:
            rec = self.workers.pop(worker, None)
            if rec is None:
                return
            self.dead.append(worker)
            if rec.reclaimer is not None:
                rec.reclaimer.closed = True
            if rec.registered:  # its KV and workspace pages
                self.arbiter.release(worker, self.arbiter.kv_pages(worker))
                rec.spare = 0
                self.arbiter.unregister(worker)
            if rec.group is not None:  # its slots only: other members keep the file
                self._leave(worker, rec.group)
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
        pages it holds (KV + workspace), and every KV group's invariants hold (no slot behind
        two pages, free slots apart, no more memory allocated than pages held)."""
        with self.arbiter.lock:
            self.arbiter.check_integrity()
            groups = {}
            for rec in self.workers.values():
                if not rec.registered or rec.group is None:
                    continue
                groups[id(rec.group)] = rec.group
                booked = self.arbiter.kv_pages(rec.worker)
                if booked != rec.held + rec.spare:
                    raise ArbiterError(f"worker {rec.worker!r}: booked {booked} pages, holds "
                                       f"{rec.held} KV + {rec.spare} workspace")
            for group in groups.values():
                if problems := group.problems():
                    raise ArbiterError(f"KV group {group.name!r}: {'; '.join(problems)}")

    def close(self) -> None:
        """Close every worker's channels (their threads end and clean up)."""
        for rec in list(self.workers.values()):
            rec.pages.close()
            rec.reclaim.close()
            if rec.thread is not None:
                rec.thread.join(5)
        for worker in list(self.workers):
            self.worker_died(worker)
