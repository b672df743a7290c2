"""The models of a server run in worker processes: replicas, routers, the supervisor, and the
memory budget as the server's admin routes see it (`ModelPoolClient`).

``arbiter`` (default): one page budget owned by the front's page broker (procs/shared_budget.py);
each replica's KV pages are granted and reclaimed by it, and a model's weights are one shared
copy charged once. ``static``: each worker gets a fixed share (the budget split evenly over every
replica, less its weights) and loads its own weights.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from elasticserve.engine.args import EngineArgs
from elasticserve.engine.kv_storage import kv_block_bytes
from elasticserve.engine.multi_model import ModelSpec, checkpoint_bytes
from elasticserve.engine.periodic import run_periodically
from elasticserve.errors import InvalidFieldError
from elasticserve.memory.backend import DEFAULT_PAGE_SIZE
from elasticserve.models.hf_config import load_config
from elasticserve.models.loader import default_dtype
from elasticserve.models.tokenizer import Tokenizer
from elasticserve.procs.pd_router import PDRouter
from elasticserve.procs.router import ReplicaRouter
from elasticserve.procs.shared_budget import SharedBudget
from elasticserve.procs.supervisor import Supervisor
from elasticserve.procs.worker_client import WorkerClient
from elasticserve.procs.worker_messages import Role, WorkerSpec

logger = logging.getLogger(__name__)


class WorkerPool:
    """Every served model's replicas, each a worker process; `routers` are the EngineClients."""

    def __init__(self, specs: list[ModelSpec], memory_bytes: int, base: EngineArgs,
                 replicas: dict[str, int] | None = None, max_queue: int = 256,
                 policy: str = "arbiter", idle_sleep_s: float | None = None,
                 supervisor: Supervisor | None = None,
                 pd: dict[str, tuple[int, int]] | None = None, kv_handoff: str = "pages") -> None:
        """`pd`: model -> (prefill workers, decode workers) for the models served
        disaggregated (engine/pd.py); `kv_handoff`: "pages" (lend pages, zero-copy) or "copy"."""
        if not specs:
            raise ValueError("at least one model is needed")
        if policy not in ("arbiter", "static"):
            raise ValueError(f"memory policy must be 'arbiter' or 'static', got {policy!r}")
        replicas, self.pd = replicas or {}, pd or {}
        names = {s.name for s in specs}
        for flag, given in (("--replicas", replicas), ("--pd", self.pd)):
            if unknown := sorted(set(given) - names):
                raise ValueError(f"{flag} names unknown model(s) {unknown}")
        if both := sorted(set(replicas) & set(self.pd)):
            raise ValueError(f"model(s) {both} given both --replicas and --pd")
        if kv_handoff not in ("pages", "copy"):
            raise ValueError(f"kv_handoff must be 'pages' or 'copy', got {kv_handoff!r}")
        self.kv_handoff = kv_handoff
        self.memory_bytes, self.policy, self.idle_sleep_s = memory_bytes, policy, idle_sleep_s
        self.page_size = base.page_size or pd_page_size(specs, self.pd, base) or DEFAULT_PAGE_SIZE
        self.budget = SharedBudget(memory_bytes, self.page_size) if policy == "arbiter" else None
        self.supervisor = supervisor or Supervisor()
        if self.budget is not None:
            self.supervisor.on_spawn = self.budget.channels_for
            self.supervisor.on_exit = self.budget.worker_exited
        self.routers: dict[str, ReplicaRouter] = {}
        self._plans: list[tuple[WorkerSpec, WorkerClient]] = []
        counts = {s.name: sum(self.pd[s.name]) if s.name in self.pd
                  else max(1, replicas.get(s.name, 1)) for s in specs}
        total = sum(counts.values())
        for spec in specs:
            self._plan_model(spec, base, counts[spec.name], total, max_queue)
        self.closed = False

    def _plan_model(self, spec: ModelSpec, base: EngineArgs, n: int, total: int,
                    max_queue: int) -> None:
        args = self._engine_args(spec, base, total)
        tokenizer = Tokenizer.from_dir(spec.path)
        split = self.pd.get(spec.name)
        colocated: list[Role] = ["colocated"]
        prefill: list[Role] = ["prefill"]
        decode: list[Role] = ["decode"]
        roles = colocated * n if split is None else prefill * split[0] + decode * split[1]
        clients = []
        for i, role in enumerate(roles):
            worker = f"{spec.name}#{i}" if role == "colocated" else f"{spec.name}#{role[0]}{i}"
            client = WorkerClient(worker, spec.name, tokenizer, max_queue, base.max_num_seqs,
                                  role=role)
            self._plans.append((WorkerSpec(
                worker, spec.name, i, args, role=role, shared=self.budget is not None,
                priority=spec.priority, min_bytes=spec.min_bytes, max_bytes=spec.max_bytes,
                kv_group=spec.name if split is not None else None,
                kv_handoff=self.kv_handoff), client))
            clients.append(client)
        if split is None:
            self.routers[spec.name] = ReplicaRouter(spec.name, clients)
        else:
            self.routers[spec.name] = PDRouter(spec.name, clients[:split[0]], clients[split[0]:])

    def _engine_args(self, spec: ModelSpec, base: EngineArgs, total: int) -> EngineArgs:
        if self.budget is not None:
            return dataclasses.replace(
                base, model=spec.path, kv_cache_mode="elastic", page_size=self.page_size,
                kv_cache_max_bytes=spec.max_bytes or self.memory_bytes,
                kv_cache_min_bytes=spec.min_bytes)
        kv_bytes = self.memory_bytes // total - checkpoint_bytes(spec.path)
        if kv_bytes <= 0:
            raise ValueError(f"--memory {self.memory_bytes} split over {total} workers leaves no "
                             f"KV memory for {spec.name!r} after its weights")
        return dataclasses.replace(base, model=spec.path, kv_cache_mode="elastic",
                                   kv_cache_max_bytes=kv_bytes)

    def start(self) -> None:
        """Start every worker (in parallel) and wait until all answered Ready."""
        with ThreadPoolExecutor(max_workers=len(self._plans)) as pool:
            for fut in [pool.submit(self.supervisor.start, s, c) for s, c in self._plans]:
                fut.result()
        if self.budget is not None and self.idle_sleep_s is not None:
            run_periodically(self, 0.1, WorkerPool.sleep_idle_workers, "idle-sleeper")

    # ---- ModelPoolClient --------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return list(self.routers)

    def _workers(self, name: str) -> list[str]:
        return [r.worker for r in self._replicas(name)]

    def note_request(self, name: str) -> None:
        if self.budget is not None and name in self.routers:
            self.budget.note_request(self._workers(name))

    def set_limits(self, name: str, min_bytes: int | None, max_bytes: int | None,
                   priority: int | None) -> None:
        if self.budget is None:
            raise InvalidFieldError("name", "limits need --memory-policy arbiter; these workers "
                                    "have fixed shares")
        self.budget.set_limits(self._workers(name), min_bytes, max_bytes, priority)

    def sleep(self, name: str) -> int:
        if self.budget is not None:
            return self.budget.sleep(self._workers(name))
        return sum(int(r.call("sleep")) for r in self._replicas(name) if r.state == "ready")

    def wake(self, name: str) -> bool:
        return all(bool(r.call("wake")) for r in self._replicas(name) if r.state == "ready")

    def _replicas(self, name: str) -> list[WorkerClient]:
        if name not in self.routers:
            raise KeyError(name)
        return self.routers[name].replicas

    def sleep_idle_workers(self) -> None:
        """A replica idle for `idle_sleep_s` gives back its KV (and, the last awake replica of a
        model, the weights); its next request wakes it."""
        assert self.budget is not None and self.idle_sleep_s is not None
        now = time.monotonic()
        for spec, client in self._plans:
            if client.state != "ready" or len(client.streams) or client.last_stats.get("asleep"):
                continue
            if now - client.last_busy >= self.idle_sleep_s:
                try:
                    self.budget.sleep([spec.worker], timeout_s=0.0)
                except ValueError:
                    pass  # it became busy: not idle after all

    # ---- observability ----------------------------------------------------------------------
    def workers_report(self) -> list[dict[str, Any]]:
        """Every worker: model, role, pid, state, device, KV and workspace pages, weights,
        restarts."""
        out = []
        for spec, client in self._plans:
            entry = client.report()
            entry["weights_bytes"] = client.ready_info.weights_bytes if client.ready_info else 0
            entry["weights_shared"] = self.budget is not None
            if self.budget is not None:
                entry["kv_pages"] = self.budget.worker_pages(spec.worker)
                entry["workspace_pages"] = self.budget.workspace_pages(spec.worker)
            out.append(entry)
        return out

    def memory_report(self) -> dict[str, object]:
        models: dict[str, object] = {}
        for name, router in self.routers.items():
            stats = router.stats()
            entry: dict[str, Any] = {
                "state": "asleep" if stats["asleep"] else "awake",
                "kv": router.memory_stats(), "running": stats["num_running"],
                "waiting": stats["num_waiting"], "swapped": stats["num_swapped"],
                "sleeps": stats["sleeps"], "wakes": stats["wakes"],
                "replicas": len(router.replicas)}
            if self.budget is not None:
                entry.update(self.budget.model_report(self._workers(name)))
            models[name] = entry
        budget = (self.budget.budget_report(self.memory_bytes) if self.budget is not None
                  else {"bytes": self.memory_bytes, "policy": self.policy})
        return {"budget": budget, "models": models, "workers": self.workers_report()}

    def check_integrity(self) -> None:
        for _spec, client in self._plans:
            if client.state == "ready":
                client.call("check_integrity")
        if self.budget is not None:
            self.budget.check_integrity()

    def close(self, timeout: float = 10.0) -> None:
        if not self.closed:
            self.closed = True
            self.supervisor.shutdown(timeout)
            if self.budget is not None:
                self.budget.close()


def pd_page_size(specs: list[ModelSpec], pd: dict[str, tuple[int, int]],
                 base: EngineArgs) -> int | None:
    """The page size that lets P/D hand-offs lend pages: one KV block of the first P/D model
    (a page then holds one block, which one sequence owns), if that is a multiple of the OS
    page; None (the default page size) otherwise or without P/D."""
    for spec in specs:
        if spec.name in pd:
            config = load_config(spec.path)
            dtype = getattr(torch, base.dtype) if base.dtype and base.dtype != "auto" \
                else default_dtype(config, torch.device(base.device or "cpu"))
            block = kv_block_bytes(config, base.block_size, dtype)
            return block if block % mmap.PAGESIZE == 0 else None
    return None
