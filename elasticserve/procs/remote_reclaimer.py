"""The arbiter's `Reclaimer` for a model in a worker process: each call is a request on the
worker's ``reclaim`` channel, answered within a deadline or counted as nothing.

The arbiter calls reclaimers under its lock, so a worker that does not answer (stopped,
swapping, stuck in a long step's Python code) would stall every other model's grants. Each
call therefore waits at most ``deadline_s``: a late worker counts as 0 pages now
(``timeouts``), is marked unresponsive (later calls return at once until a reply shows it
is back), and its late replies are dropped. What a late reply reported is not lost: the
worker's next Grant or Release carries its mapped page count and the broker books the
difference (procs/page_broker.py). The worker itself skips requests already past their
deadline, so late replies are rare.

``reclaimable``, ``is_idle`` and ``is_starved`` share one round trip ("probe") whose answer is
kept ``probe_ttl_s``: the arbiter asks them several times per decision (per tier, per victim),
and the reclaim calls themselves return what they really freed, so an estimate a few
milliseconds old can only make the arbiter ask for pages it then does not get.
"""

from __future__ import annotations

import itertools
import os
import select
import time
from collections.abc import Callable

from elasticserve.procs.messages import Reclaim, Reclaimed
from elasticserve.procs.transport import Channel, ChannelClosed

ProbeState = tuple[int, int, bool, bool]  # free pages, cached pages, idle, starved


class RemoteReclaimer:
    """`core.arbiter_types.Reclaimer` over a channel to one worker.

    ``book(mapped_after)``: the broker's callback when the worker reports the pages it maps
    after a reclaim call; it punches the rest out of the worker's memfd and returns how many
    pages that freed (what the arbiter books). ``book_spare(spare_after)``: the same for the
    workspace pages its arena maps (a sleep unmaps them with the KV)."""

    def __init__(self, channel: Channel, book: Callable[[int], int], deadline_s: float = 2.0,
                 probe_ttl_s: float = 0.02,
                 book_spare: Callable[[int], int] | None = None) -> None:
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        self.channel = channel
        self.book = book
        self.book_spare = book_spare
        self.deadline_s = deadline_s
        self.probe_ttl_s = probe_ttl_s
        self.timeouts = 0
        self.unresponsive = False
        self.closed = False  # the worker is gone: every call answers nothing at once
        self._ids = itertools.count(1)
        self._probe: tuple[float, ProbeState | None] | None = None

    # ---- Reclaimer ---------------------------------------------------------------------------
    def reclaimable(self) -> tuple[int, int]:
        state = self._state()
        return (0, 0) if state is None else (state[0], state[1])

    def is_idle(self) -> bool:
        state = self._state()
        return state is not None and state[2]

    def is_starved(self) -> bool:
        state = self._state()
        return state is not None and state[3]

    def free_pages(self, n: int) -> int:
        return self._take("free_pages", n) or 0

    def drop_cached(self, n: int) -> int:
        return self._take("drop_cached", n) or 0

    def preempt(self, n: int) -> int:
        return self._take("preempt", n) or 0

    def sleep(self) -> int | None:
        return self._take("sleep", 0)

    # ---- one round trip ------------------------------------------------------------------------
    def _take(self, op: str, n: int) -> int | None:
        reply = self._call(op, n)
        self._probe = None  # the worker's state changed
        if reply is None or reply.pages is None or reply.mapped_after is None:
            return None  # not answered in time, mid-step (owes the pages), or refused
        freed = self.book(reply.mapped_after)
        if reply.spare_after is not None and self.book_spare is not None:
            freed += self.book_spare(reply.spare_after)
        return freed

    def _state(self) -> ProbeState | None:
        now = time.monotonic()
        if self._probe is not None and now - self._probe[0] < self.probe_ttl_s:
            return self._probe[1]
        reply = self._call("probe", 0)
        state = None if reply is None else reply.state
        self._probe = (now, state)
        return state

    def _call(self, op: str, n: int) -> Reclaimed | None:
        """Send one request and wait for its reply until the deadline; None if none came."""
        if self.closed:
            return None
        with self.channel.rpc_lock:
            try:
                if self.unresponsive and not self._drain():
                    return None
                rid = next(self._ids)
                deadline = time.monotonic() + self.deadline_s
                self.channel.send(Reclaim(rid, op, n, deadline))
                while _readable(self.channel, deadline - time.monotonic()):
                    reply = self._recv()
                    if isinstance(reply, Reclaimed) and reply.request_id == rid:
                        return reply
                    # a reply to a request we gave up on: dropped (see the module docstring)
            except ChannelClosed:
                self.closed = True  # the broker's pages thread sees the EOF and cleans up
                return None
        self.timeouts += 1
        self.unresponsive = True
        return None

    def _drain(self) -> bool:
        """Read late replies without waiting; True (responsive again) if there were any."""
        got = False
        while _readable(self.channel, 0.0):
            self._recv()
            got = True
        self.unresponsive = not got
        return got

    def _recv(self) -> object:
        msg, fds = self.channel.recv()
        for fd in fds:
            os.close(fd)
        return msg


def _readable(channel: Channel, timeout: float) -> bool:
    if timeout < 0:
        return False
    ready, _, _ = select.select([channel.fileno()], [], [], timeout)
    return bool(ready)
