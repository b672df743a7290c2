"""The page broker's books of workspace pages: a step's MLP scratch and logits
(engine/workspace.py, `runtime_memory_from_budget`) in pages of the budget, for a worker process.

Workspace pages are booked under the worker (``WorkerPages.spare``, counted in the arbiter's
pages of that worker beside its KV) but name no slot of the KV group file: the worker maps them
from a memfd of its own arena. What is shared is the budget, not the bytes, so a grant is only
booking, and a KV file whose slot i backs page i stays one mapping. A grant is all or none and
taken only from free pages and other workers' free or cached KV (as `ModelHost.grant_spare`
in one process): the step runs on torch's allocator without them, so it never preempts or
sleeps anyone. Every message carries the pages the arena maps, and so does a reclaim reply
(a sleep unmaps the arena with the KV), so the books follow the worker; a dead worker's
workspace pages go back with its KV pages (`PageBroker.worker_died`). Called under the
arbiter's lock.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from elasticserve.core.arbiter import Arbiter, ArbiterError
from elasticserve.procs.messages import GrantSpare, ReleaseSpare

if TYPE_CHECKING:
    from elasticserve.procs.page_broker import WorkerPages


@dataclass(frozen=True, slots=True)
class SpareReply:
    """What to answer a workspace message with (None is an answer too)."""

    reply: int | None


class SpareBooks:
    """PageBroker's workspace side (a mixin: it uses the broker's arbiter and workers)."""

    arbiter: Arbiter
    workers: dict[str, WorkerPages]

    def _spare_message(self, rec: WorkerPages, msg: object) -> SpareReply | None:
        """The reply to a GrantSpare or ReleaseSpare; None for any other message."""
        if isinstance(msg, GrantSpare):
            self._sync_spare(rec, msg.mapped)
            return SpareReply(self._grant_spare(rec, msg.pages))
        if isinstance(msg, ReleaseSpare):
            self._sync_spare(rec, msg.mapped_after)
            return SpareReply(None)
        return None

    def _grant_spare(self, rec: WorkerPages, pages: int) -> int:
        """All ``pages`` or 0, as ModelHost.grant_spare in one process: free pages and other
        workers' free or cached KV only; a step runs without them, so nobody is preempted or
        put to sleep for them."""
        if pages <= 0:
            raise ValueError(f"pages must be > 0, got {pages}")
        arbiter = self.arbiter
        policy = arbiter.policy
        arbiter.policy = replace(policy, preempt=False, sleep_idle=False)  # under its lock
        try:
            got = arbiter.request(rec.worker, pages, pages)
        finally:
            arbiter.policy = policy
        rec.spare += got
        return got

    def _sync_spare(self, rec: WorkerPages, mapped: int) -> None:
        """The worker's arena maps ``mapped`` workspace pages now: book what it gave up."""
        if not 0 <= mapped <= rec.spare:
            raise ArbiterError(f"worker {rec.worker!r} maps {mapped} workspace pages but was "
                               f"granted {rec.spare}")
        freed = self._drop_spare(rec, mapped)
        if freed:
            self.arbiter.release(rec.worker, freed)

    @staticmethod
    def _drop_spare(rec: WorkerPages, mapped_after: int) -> int:
        """Forget workspace pages above ``mapped_after``; returns how many (the caller books
        them; a reclaim reply's too: a sleep unmaps the arena with the KV)."""
        freed = max(0, rec.spare - max(0, mapped_after))
        rec.spare -= freed
        return freed

    def spare(self, worker: str) -> int:
        """Workspace pages booked under the worker now."""
        with self.arbiter.lock:
            return self.workers[worker].spare
