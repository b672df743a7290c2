"""The models of a server run in worker processes: replicas, routers, the supervisor, and the
memory budget as the server's admin routes see it (`ModelPoolClient`).

Without a page broker each worker gets a fixed share of the budget (``static``: the budget
split evenly over every replica, less its weights).
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from elasticserve.engine.args import EngineArgs
from elasticserve.engine.multi_model import ModelSpec, checkpoint_bytes
from elasticserve.errors import InvalidFieldError
from elasticserve.models.tokenizer import Tokenizer
from elasticserve.procs.router import ReplicaRouter
from elasticserve.procs.supervisor import Supervisor
from elasticserve.procs.worker_client import WorkerClient
from elasticserve.procs.worker_messages import WorkerSpec

logger = logging.getLogger(__name__)


class WorkerPool:
    """Every served model's replicas, each a worker process; `routers` are the EngineClients."""

    def __init__(self, specs: list[ModelSpec], memory_bytes: int, base: EngineArgs,
                 replicas: dict[str, int] | None = None, max_queue: int = 256,
                 policy: str = "static", idle_sleep_s: float | None = None,
                 supervisor: Supervisor | None = None) -> None:
        if not specs:
            raise ValueError("at least one model is needed")
        replicas = replicas or {}
        unknown = sorted(set(replicas) - {s.name for s in specs})
        if unknown:
            raise ValueError(f"--replicas names unknown model(s) {unknown}")
        self.memory_bytes = memory_bytes
        # TODO(issue 11): the arbiter policy over the page broker lands next; until then
        # workers take fixed shares
        self.policy = "static"
        self.idle_sleep_s = idle_sleep_s
        self.supervisor = supervisor or Supervisor()
        self.routers: dict[str, ReplicaRouter] = {}
        self._plans: list[tuple[WorkerSpec, WorkerClient]] = []
        total = sum(max(1, replicas.get(s.name, 1)) for s in specs)
        for spec in specs:
            self._plan_model(spec, base, max(1, replicas.get(spec.name, 1)), total, max_queue)
        self.closed = False

    def _plan_model(self, spec: ModelSpec, base: EngineArgs, n: int, total: int,
                    max_queue: int) -> None:
        kv_bytes = self.memory_bytes // total - checkpoint_bytes(spec.path)
        if kv_bytes <= 0:
            raise ValueError(f"--memory {self.memory_bytes} split over {total} workers leaves no "
                             f"KV memory for {spec.name!r} after its weights")
        args = dataclasses.replace(base, model=spec.path, kv_cache_mode="elastic",
                                   kv_cache_max_bytes=kv_bytes)
        tokenizer = Tokenizer.from_dir(spec.path)
        clients = []
        for i in range(n):
            worker = f"{spec.name}#{i}"
            client = WorkerClient(worker, spec.name, tokenizer, max_queue, base.max_num_seqs)
            self._plans.append((WorkerSpec(worker, spec.name, i, args), client))
            clients.append(client)
        self.routers[spec.name] = ReplicaRouter(spec.name, clients)

    def start(self) -> None:
        """Start every worker (in parallel) and wait until all answered Ready."""
        with ThreadPoolExecutor(max_workers=len(self._plans)) as pool:
            for fut in [pool.submit(self.supervisor.start, s, c) for s, c in self._plans]:
                fut.result()

    # ---- ModelPoolClient --------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return list(self.routers)

    def note_request(self, name: str) -> None:
        """Popularity is the broker's business; a private budget keeps none."""

    def set_limits(self, name: str, min_bytes: int | None, max_bytes: int | None,
                   priority: int | None) -> None:
        raise InvalidFieldError("name", "limits need the shared page budget (--memory-policy "
                                "arbiter); these workers have fixed shares")

    def sleep(self, name: str) -> int:
        return sum(int(r.call("sleep")) for r in self._replicas(name) if r.state == "ready")

    def wake(self, name: str) -> bool:
        return all(bool(r.call("wake")) for r in self._replicas(name) if r.state == "ready")

    def _replicas(self, name: str) -> list[WorkerClient]:
        if name not in self.routers:
            raise KeyError(name)
        return self.routers[name].replicas

    # ---- observability ----------------------------------------------------------------------
    def workers_report(self) -> list[dict[str, Any]]:
        """Every worker: model, role, pid, state, device, KV pages, weights, restarts."""
        out = []
        for _spec, client in self._plans:
            entry = client.report()
            entry["weights_bytes"] = client.ready_info.weights_bytes if client.ready_info else 0
            entry["weights_shared"] = False
            out.append(entry)
        return out

    def memory_report(self) -> dict[str, object]:
        models: dict[str, object] = {}
        for name, router in self.routers.items():
            stats = router.stats()
            models[name] = {
                "state": "asleep" if stats["asleep"] else "awake",
                "kv": router.memory_stats(), "running": stats["num_running"],
                "waiting": stats["num_waiting"], "swapped": stats["num_swapped"],
                "sleeps": stats["sleeps"], "wakes": stats["wakes"],
                "replicas": len(router.replicas)}
        return {"budget": {"bytes": self.memory_bytes, "policy": self.policy},
                "models": models, "workers": self.workers_report()}

    def check_integrity(self) -> None:
        for _spec, client in self._plans:
            if client.state == "ready":
                client.call("check_integrity")

    def close(self, timeout: float = 10.0) -> None:
        if not self.closed:
            self.closed = True
            self.supervisor.shutdown(timeout)
