"""The worker's side of the page broker: `RemotePageBroker` (the engine's `ModelBroker` over
the ``pages`` channel), the KV memory backend over the broker's memfd, and the thread that
answers the broker's reclaim requests.

The worker maps its KV pages from slots of its KV group's memfd, which the front's broker owns
(procs/page_broker.py, procs/kv_groups.py): every grant names the slot behind each new page
(`HostBackend.queue_slots`). Releasing a page here only unmaps it; the broker punches it out
of the memfd when it books the release, so memory returns even if this process dies mid-way.
Pages change owner within a group with `offer` / `take` / `withdraw`: the broker swaps slots
and each side remaps the pages whose slot changed (`HostBackend.remap`), zero bytes copied.
A step's workspace (engine/workspace.py) asks through `RemoteSpare`: the broker books those
pages under this worker; they are mapped from the arena's own memfd, not the KV file.

Reclaims are answered by an `EngineReclaimer` (engine/multi_model.py, the same one a model
in the front process uses): it only try-locks the engine's KV storage, so it answers at once
even while this worker's step thread waits on the broker for a grant. A worker mid-step owes
the pages and pays after its step; the broker books that release then.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from elasticserve.engine.kv_connector import HandOffRefused
from elasticserve.engine.multi_model import EngineReclaimer
from elasticserve.memory.backend import MemoryBackend
from elasticserve.memory.host import HostBackend
from elasticserve.procs.messages import (
    BrokerError,
    CancelWake,
    Grant,
    Granted,
    GrantSpare,
    Offer,
    Reclaim,
    Reclaimed,
    Registered,
    RegisterWorker,
    Release,
    ReleaseSpare,
    Take,
    Taken,
    Wake,
    Withdraw,
    Withdrawn,
)
from elasticserve.procs.transport import Channel, ChannelClosed


class PageBrokerError(RuntimeError):
    """The broker refused a message (its reason in the text)."""


class TakeRefused(PageBrokerError, HandOffRefused):
    """The broker refused a take: nothing was swapped (the engine fails that request only)."""


class RemotePageBroker:
    """`core.kv_pages.ModelBroker` for an engine in a worker process.

    Pass ``backend`` to the engine as its ``kv_backend``: its KV range gets the broker's memfd
    at registration (``attach_model``, which the engine calls before it builds its KV)."""

    def __init__(self, channel: Channel, worker: str, kv_max_bytes: int, page_size: int,
                 weights_key: str | None = None, min_bytes: int = 0,
                 max_bytes: int | None = None, priority: int = 0,
                 kv_group: str | None = None) -> None:
        """``kv_group``: workers registered with one group name may hand pages to each other
        (`offer` / `take`); None: a group of its own."""
        self.channel = channel
        self.register = RegisterWorker(worker, weights_key, 0, kv_max_bytes, min_bytes,
                                       max_bytes, priority, kv_group)
        self._backend = HostBackend(page_size)
        self.backend: MemoryBackend = self._backend
        self.reclaimer = EngineReclaimer()  # bind .engine once the engine is built

    @property
    def pages_reclaimed(self) -> int:
        return self.reclaimer.pages_reclaimed

    @pages_reclaimed.setter
    def pages_reclaimed(self, value: int) -> None:
        self.reclaimer.pages_reclaimed = value

    # ---- ModelBroker ---------------------------------------------------------------------------
    def attach_model(self, weights_bytes: int) -> None:
        """Register with the broker; adopt the KV memfd it sends."""
        reply, fds = self.channel.request(replace(self.register, weights_bytes=weights_bytes))
        if not isinstance(reply, Registered) or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise PageBrokerError(_reason(reply))
        if reply.page_size != self._backend.page_size:
            raise ValueError(f"page_size {self._backend.page_size} differs from the broker's "
                             f"{reply.page_size}")
        self._backend.adopt_range_file(fds[0], reply.kv_pages * reply.page_size)

    def grant(self, pages: int, at_least: int) -> int:
        got = self._ask(Grant(pages, at_least, self.mapped_pages))
        if not isinstance(got, Granted) or len(got.slots) != got.pages:
            raise PageBrokerError(f"unexpected reply {got!r}")
        self._backend.queue_slots(got.slots)  # the slots behind the pages mapped next
        return got.pages

    def release(self, pages: int) -> None:
        self._ask(Release(pages, self.mapped_pages))

    def wake(self) -> bool:
        return bool(self._ask(Wake()))

    def spare_broker(self, mapped: Callable[[], int]) -> RemoteSpare:
        """The `WorkspaceBroker` of this worker's step workspace; ``mapped``: the pages its
        arena maps now (every message carries it, so the books follow the arena)."""
        return RemoteSpare(self, mapped)

    def cancel_wake(self) -> None:
        self._ask(CancelWake())

    # ---- hand-offs within a KV group -----------------------------------------------------------
    def offer(self, handoff_id: str, indices: Sequence[int]) -> None:
        """Lend KV pages ``indices`` (page indices of the KV range) to a peer of the group under
        ``handoff_id``; do not write them until `withdraw`."""
        self._ask(Offer(handoff_id, tuple(indices)))

    def take(self, peer: str, handoff_id: str, mine: Sequence[int]) -> None:
        """Take ``peer``'s offer into my KV pages ``mine`` (page ``mine[k]`` then holds the
        offer's k-th page, zero bytes copied; what ``mine`` held is gone)."""
        try:
            taken = self._ask(Take(peer, handoff_id, tuple(mine)))
        except PageBrokerError as exc:  # refused: nothing was swapped
            raise TakeRefused(str(exc)) from exc
        if not isinstance(taken, Taken) or len(taken.slots) != len(mine):
            raise PageBrokerError(f"unexpected reply {taken!r}")
        self._remap(zip(mine, taken.slots, strict=True))

    def withdraw(self, handoff_id: str) -> int:
        """Close my offer; remaps the pages a peer took (each now a blank page); returns how
        many pages changed hands. Call it before reusing the offered pages."""
        withdrawn = self._ask(Withdraw(handoff_id))
        if not isinstance(withdrawn, Withdrawn):
            raise PageBrokerError(f"unexpected reply {withdrawn!r}")
        self._remap(withdrawn.changed)
        return len(withdrawn.changed)

    def _remap(self, pairs: Iterable[tuple[int, int]]) -> None:
        vrange = self._backend.adopted_range()
        for index, slot in pairs:
            if vrange is None:
                raise PageBrokerError("no KV range is mapped from the broker's file")
            self._backend.remap(vrange, index * self._backend.page_size, slot)

    @property
    def mapped_pages(self) -> int:
        """KV pages this process maps now (the broker books against it)."""
        return self._backend.stats().pages_live

    def _ask(self, msg: object) -> object:
        reply, fds = self.channel.request(msg)
        if fds or isinstance(reply, BrokerError):
            raise PageBrokerError(_reason(reply))
        return reply


class RemoteSpare:
    """`engine.workspace.WorkspaceBroker` over the pages channel: workspace pages booked by
    the front's broker under this worker, all or none, never by preempting anyone."""

    def __init__(self, broker: RemotePageBroker, mapped: Callable[[], int]) -> None:
        self.broker = broker
        self.mapped = mapped

    def grant_spare(self, pages: int) -> int:
        got = self.broker._ask(GrantSpare(pages, self.mapped()))
        if not isinstance(got, int) or got not in (0, pages):
            raise PageBrokerError(f"unexpected reply {got!r}")
        return got

    def release(self, pages: int) -> None:
        """The arena unmapped ``pages`` (already: `mapped` counts without them)."""
        self.broker._ask(ReleaseSpare(pages, self.mapped()))


def _reason(reply: object) -> str:
    return reply.message if isinstance(reply, BrokerError) else f"unexpected reply {reply!r}"


def serve_reclaims(channel: Channel, reclaimer: EngineReclaimer) -> None:
    """Answer the broker's reclaim requests until the channel closes (a worker's thread)."""
    while True:
        try:
            msg, _ = channel.recv()
            if isinstance(msg, Reclaim):
                channel.send(answer(reclaimer, msg))
        except ChannelClosed:
            return


def answer(reclaimer: EngineReclaimer, msg: Reclaim) -> Reclaimed:
    """Run one reclaim call; a request past its deadline is not run (the broker gave up)."""
    rid = msg.request_id
    if time.monotonic() > msg.deadline:
        return Reclaimed(rid, None, None)
    if msg.op == "probe":
        free, cached = reclaimer.reclaimable()
        return Reclaimed(rid, None, None, (free, cached, reclaimer.is_idle(),
                                           reclaimer.is_starved()))
    calls = {"free_pages": reclaimer.free_pages, "drop_cached": reclaimer.drop_cached,
             "preempt": reclaimer.preempt}
    if msg.op == "sleep":
        pages = reclaimer.sleep()
    elif msg.op in calls:
        pages = calls[msg.op](msg.n)
    else:
        raise ValueError(f"unknown reclaim op {msg.op!r}")
    return Reclaimed(rid, pages, reclaimer.last_mapped, spare_after=_spare_after(reclaimer))


def _spare_after(reclaimer: EngineReclaimer) -> int | None:
    """The workspace pages mapped after a call that got the lock (a sleep unmaps them). Read
    after it let go: the count may have fallen since (an idle shrink, whose ReleaseSpare then
    books nothing more) but not risen, as a new page needs a grant, which waits for the
    broker's lock, held until this reply is booked."""
    engine = reclaimer.engine
    arena = None if engine is None else engine.kv.workspace
    if arena is None or reclaimer.last_mapped is None:
        return None
    return arena.mapped_pages
