"""One page budget for worker processes: the page broker, the shared-weights registry, and what
the pool asks of them (channels for a new worker, limits, sleep, the memory report).

Every replica is its own arbiter entry (named after its worker, e.g. ``demo#1``) with the
model's name as its ``weights_key``: replicas compete for KV pages like models do, and the
model's weights are charged once while any replica is awake.
"""

from __future__ import annotations

import os
import time
from typing import Any

from elasticserve.core.arbiter import ArbiterError, ArbiterPolicy
from elasticserve.errors import InvalidFieldError
from elasticserve.procs.messages import AttachWeights, DetachWeights, WeightsLoaded
from elasticserve.procs.page_broker import Handler, PageBroker
from elasticserve.procs.transport import channel_pair
from elasticserve.procs.weights import WeightsRegistry
from elasticserve.procs.worker_messages import WorkerSpec


class SharedBudget:
    """The front's memory owner when models run in worker processes under `arbiter`."""

    def __init__(self, memory_bytes: int, page_size: int,
                 policy: ArbiterPolicy | None = None, reclaim_deadline_s: float = 2.0) -> None:
        self.registry = WeightsRegistry()
        handlers: dict[type, Handler] = {
            t: self.registry.handle for t in (AttachWeights, WeightsLoaded, DetachWeights)}
        self.broker = PageBroker(memory_bytes, page_size, policy or ArbiterPolicy(),
                                 reclaim_deadline_s, extra_handlers=handlers,
                                 on_worker_gone=[self.registry.worker_gone])
        self.arbiter = self.broker.arbiter

    def channels_for(self, spec: WorkerSpec) -> tuple[list[int], list[str]]:
        """Serve a new worker's `pages` and `reclaim` channels; the child's ends as fds to
        pass (the caller closes them after spawning) and the worker's arguments naming them."""
        pages, pages_child = channel_pair()
        reclaim, reclaim_child = channel_pair()
        self.broker.serve(spec.worker, pages, reclaim)
        fds = [os.dup(pages_child.fileno()), os.dup(reclaim_child.fileno())]
        pages_child.sock.close()  # not Channel.close: shutdown would cut the child off too
        reclaim_child.sock.close()
        return fds, ["--pages-fd", str(fds[0]), "--reclaim-fd", str(fds[1])]

    def worker_exited(self, spec: WorkerSpec) -> None:
        """Its pages back to the budget, its memfd closed, its weights detached."""
        self.broker.worker_died(spec.worker)

    # ---- per model (every replica) ----------------------------------------------------------
    def set_limits(self, workers: list[str], min_bytes: int | None, max_bytes: int | None,
                   priority: int | None) -> None:
        for worker in workers:
            try:
                self.arbiter.set_limits(worker, min_bytes, max_bytes, priority)
            except (ArbiterError, ValueError) as exc:
                raise InvalidFieldError("max_bytes", str(exc)) from exc

    def sleep(self, workers: list[str], timeout_s: float = 5.0) -> int:
        """Every replica asleep (a replica mid-step is asked again until `timeout_s`)."""
        freed, deadline = 0, time.monotonic() + timeout_s
        for worker in workers:
            while worker in self.arbiter.names() and self.arbiter.is_awake(worker):
                freed += self.arbiter.sleep(worker)
                if not self.arbiter.is_awake(worker):
                    break
                if time.monotonic() > deadline:
                    raise ValueError(f"worker {worker} stayed busy for {timeout_s} s; "
                                     "try again")
                time.sleep(0.02)
        return freed

    def note_request(self, workers: list[str]) -> None:
        for worker in workers:
            if worker in self.arbiter.names():
                self.arbiter.note_request(worker)

    # ---- observability ----------------------------------------------------------------------
    def budget_report(self, memory_bytes: int) -> dict[str, Any]:
        snap = self.arbiter.snapshot()
        return {"bytes": memory_bytes, "policy": "arbiter", "page_size": snap.page_size,
                "pages": snap.budget_pages, "used_pages": snap.used_pages,
                "free_pages": snap.free_pages, "weights_pages": snap.weights_pages,
                "reclaim_timeouts": self.broker.reclaim_timeouts}

    def model_report(self, workers: list[str]) -> dict[str, Any]:
        snap = self.arbiter.snapshot()
        states = [snap.models[w] for w in workers if w in snap.models]
        if not states:
            return {"weights_bytes": 0, "kv_pages": 0}
        first = states[0]
        return {"weights_bytes": first.weights_bytes, "kv_pages": sum(m.kv_pages for m in states),
                "min_bytes": first.min_bytes, "max_bytes": first.max_bytes,
                "priority": first.priority, "popularity": sum(m.popularity for m in states)}

    def worker_pages(self, worker: str) -> int:
        return self.broker.held(worker) if worker in self.broker.workers else 0

    def workspace_pages(self, worker: str) -> int:
        """Step-workspace pages booked under the worker (beside its KV pages)."""
        return self.broker.spare(worker) if worker in self.broker.workers else 0

    def check_integrity(self) -> None:
        self.broker.check_integrity()
        self.registry.check_integrity()

    def close(self) -> None:
        self.broker.close()
