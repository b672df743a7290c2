"""Several models on one memory budget: engines, the arbiter between them, sleep and wake.

`ModelHost` is one model's face to the arbiter: the page broker its elastic KV storage asks
for pages, and the `Reclaimer` the arbiter calls to take pages back. Reclaim calls arrive on
*another* model's thread while the arbiter's lock is held, so they only ever try-lock the
victim: a victim in the middle of a step is skipped now and owes the pages instead (it pays at
the end of its step). No thread ever waits for a model's lock while holding the arbiter's, so
the two locks cannot deadlock.
"""

from __future__ import annotations

import functools
import glob
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from elasticserve.core.arbiter import Arbiter, ArbiterError, ArbiterPolicy
from elasticserve.engine.args import EngineArgs
from elasticserve.engine.kv_storage import KVStorage
from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.engine.periodic import run_periodically
from elasticserve.errors import InvalidFieldError

MemoryPolicy = Literal["arbiter", "static"]


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    path: str
    priority: int = 0
    min_bytes: int = 0
    max_bytes: int | None = None


class EngineReclaimer:
    """The arbiter's `Reclaimer` over one local engine; it only ever try-locks the engine's KV
    storage. Serves a `ModelHost` in this process, and in a worker process the broker's
    reclaim requests (procs/page_client.py). `last_mapped`: the pages mapped right after the
    last call that got the lock (None if it did not), read under the lock, so it agrees with
    the pages that call unmapped."""

    def __init__(self) -> None:
        self.engine: LLMEngine | None = None
        self.pages_reclaimed = 0
        self.last_mapped: int | None = None

    # ---- called under the arbiter's lock, from any thread ----------------------------------
    def reclaimable(self) -> tuple[int, int]:
        engine = self.engine
        if engine is None or engine.asleep:
            return 0, 0
        return engine.kv.reclaimable()

    def free_pages(self, n: int) -> int:
        return self._locked(n, lambda kv: kv.free_pages(n))

    def drop_cached(self, n: int) -> int:
        return self._locked(n, lambda kv: kv.drop_cached(n))

    def preempt(self, n: int) -> int:
        return self._locked(n, lambda kv: kv.preempt(n), preempt=True)

    def sleep(self) -> int | None:
        engine = self.engine
        self.last_mapped = None
        if engine is None:
            return None
        return engine.kv.try_locked(lambda: self._note_mapped(engine.sleep(), engine.kv))

    def is_idle(self) -> bool:
        engine = self.engine
        return engine is None or not engine.has_unfinished_requests()

    def is_starved(self) -> bool:
        """Requests wait for memory: the arbiter then protects this model's share."""
        engine = self.engine
        return engine is not None and bool(engine.scheduler.waiting or engine.scheduler.swapped)

    def _locked(self, n: int, action: Callable[[KVStorage], int], preempt: bool = False) -> int:
        engine = self.engine
        self.last_mapped = None
        if engine is None or engine.asleep:
            return 0
        kv = engine.kv
        got = kv.try_locked(lambda: self._note_mapped(action(kv), kv))
        if got is None:
            # mid-step: it pays at the end of the step (or in the reclaimer's next pass), and
            # the arbiter keeps those pages for a starved requester (Arbiter._available)
            kv.owe_pages(n, preempt=preempt)
            return 0
        self.pages_reclaimed += got
        return got

    def _note_mapped(self, got: int, kv: KVStorage) -> int:
        self.last_mapped = kv.pages.mapped_pages
        return got


class ModelHost(EngineReclaimer):
    """Page broker (`core.kv_pages.ModelBroker`) + arbiter reclaimer for one engine."""

    def __init__(self, arbiter: Arbiter, spec: ModelSpec) -> None:
        super().__init__()
        self.arbiter = arbiter
        self.spec = spec

    # ---- broker (called by the engine's own thread) --------------------------------------
    def attach_model(self, weights_bytes: int) -> None:
        s = self.spec
        self.arbiter.register(s.name, weights_bytes, s.min_bytes, s.max_bytes, s.priority,
                              reclaimer=self)

    def grant(self, pages: int, at_least: int) -> int:
        return self.arbiter.request(self.spec.name, pages, at_least)

    def release(self, pages: int) -> None:
        self.arbiter.release(self.spec.name, pages)

    def grant_spare(self, pages: int) -> int:
        """All `pages` or none, for a step's workspace (engine/workspace.py): taken only from
        free pages and other models' free or cached KV pages, never by preempting or sleeping
        a neighbour (the step can run without them). A grant here is only booking, so its
        pages may back any range of this process."""
        arbiter = self.arbiter
        with arbiter.lock:  # other requests never see the narrowed policy
            policy = arbiter.policy
            arbiter.policy = replace(policy, preempt=False, sleep_idle=False)
            try:
                return arbiter.request(self.spec.name, pages, pages)
            finally:
                arbiter.policy = policy

    def wake(self) -> bool:
        return self.arbiter.wake(self.spec.name)

    def cancel_wake(self) -> None:
        self.arbiter.cancel_wake(self.spec.name)


class ModelPool:
    """The engines a server hosts, under one budget (`arbiter`) or split evenly (`static`)."""

    def __init__(self, specs: list[ModelSpec], memory_bytes: int, base: EngineArgs,
                 policy: MemoryPolicy = "arbiter", idle_sleep_s: float | None = None,
                 page_size: int | None = None) -> None:
        if not specs:
            raise ValueError("at least one model is needed")
        self.policy = policy
        self.idle_sleep_s = idle_sleep_s
        self.memory_bytes = memory_bytes
        self.arbiter: Arbiter | None = None
        self.hosts: dict[str, ModelHost] = {}
        self.engines: dict[str, LLMEngine] = {}
        if policy == "static":
            self._build_static(specs, base)
        elif policy == "arbiter":
            self._build_shared(specs, base, page_size)
        else:
            raise ValueError(f"memory policy must be 'arbiter' or 'static', got {policy!r}")
        self.closed = False
        self._start_housekeeping()

    def _build_static(self, specs: list[ModelSpec], base: EngineArgs) -> None:
        share = self.memory_bytes // len(specs)
        for spec in specs:
            kv_bytes = share - checkpoint_bytes(spec.path)
            if kv_bytes <= 0:
                raise ValueError(f"--memory {self.memory_bytes} split {len(specs)} ways leaves no "
                                 f"KV memory for {spec.name!r} after its weights")
            args = replace(base, model=spec.path, kv_cache_mode="static", kv_cache_bytes=kv_bytes)
            self.engines[spec.name] = LLMEngine(args)

    def _build_shared(self, specs: list[ModelSpec], base: EngineArgs,
                      page_size: int | None) -> None:
        from elasticserve.memory.backend import DEFAULT_PAGE_SIZE

        page = page_size or base.page_size or DEFAULT_PAGE_SIZE
        self.arbiter = Arbiter(self.memory_bytes, page, ArbiterPolicy())
        for spec in specs:
            host = ModelHost(self.arbiter, spec)
            args = replace(base, model=spec.path, kv_cache_mode="elastic", page_size=page,
                           kv_cache_max_bytes=spec.max_bytes or self.memory_bytes,
                           kv_cache_min_bytes=spec.min_bytes)
            engine = LLMEngine(args, broker=host)
            host.engine = engine
            self.hosts[spec.name] = host
            self.engines[spec.name] = engine

    # ---- sleep / wake ---------------------------------------------------------------------
    def sleep(self, name: str) -> int:
        """Put a model to sleep now (admin); returns the KV pages it gave back."""
        engine = self._engine(name)
        if self.arbiter is None:
            raise ValueError("sleep needs --memory-policy arbiter")
        with engine.kv.lock:
            return self.arbiter.sleep(name)

    def wake(self, name: str) -> bool:
        return self._engine(name).wake()

    def set_limits(self, name: str, min_bytes: int | None, max_bytes: int | None,
                   priority: int | None) -> None:
        """Change a model's limits or priority (admin); InvalidFieldError names the field."""
        if self.arbiter is None:
            raise InvalidFieldError("name", "limits need --memory-policy arbiter")
        try:
            self.arbiter.set_limits(name, min_bytes, max_bytes, priority)
        except (ArbiterError, ValueError) as exc:  # limits the model cannot meet now
            raise InvalidFieldError("max_bytes", str(exc)) from exc

    @property
    def model_names(self) -> list[str]:
        return list(self.engines)

    def note_request(self, name: str) -> None:
        if self.arbiter is not None:
            self.arbiter.note_request(name)

    def _engine(self, name: str) -> LLMEngine:
        if name not in self.engines:
            raise KeyError(name)
        return self.engines[name]

    def _start_housekeeping(self) -> None:
        if self.arbiter is not None and self.idle_sleep_s is not None:
            run_periodically(self, 0.05, ModelPool.sleep_idle_models, "idle-sleeper")

    def sleep_idle_models(self) -> None:
        """Models idle for `idle_sleep_s` give back everything (weights and KV)."""
        assert self.arbiter is not None and self.idle_sleep_s is not None
        now = time.monotonic()
        for name, engine in self.engines.items():
            if engine.asleep or engine.has_unfinished_requests():
                continue
            if now - engine.last_active < self.idle_sleep_s:
                continue
            engine.kv.try_locked(functools.partial(self._sleep_if_idle, name, engine))

    def _sleep_if_idle(self, name: str, engine: LLMEngine) -> None:
        assert self.arbiter is not None
        if not engine.has_unfinished_requests():  # a request may have come in meanwhile
            self.arbiter.sleep(name)

    # ---- observability --------------------------------------------------------------------
    def memory_report(self) -> dict[str, object]:
        """The budget and, per model, state, weights, KV bytes, limits, priority, queues."""
        models: dict[str, object] = {}
        snap = self.arbiter.snapshot() if self.arbiter is not None else None
        for name, engine in self.engines.items():
            stats = engine.stats()
            entry: dict[str, object] = {
                "state": "asleep" if engine.asleep else "awake",
                "kv": engine.kv.memory_stats(),
                "running": stats["num_running"], "waiting": stats["num_waiting"],
                "swapped": stats["num_swapped"], "sleeps": engine.sleeps,
                "wakes": engine.wakes, "wake_latency_s": engine.wake_latencies_s[-5:],
            }
            if snap is not None:
                m = snap.models[name]
                entry.update(weights_bytes=m.weights_bytes, kv_pages=m.kv_pages,
                             min_bytes=m.min_bytes, max_bytes=m.max_bytes, priority=m.priority,
                             popularity=m.popularity,
                             pages_reclaimed=self.hosts[name].pages_reclaimed)
            models[name] = entry
        budget: dict[str, object] = {"bytes": self.memory_bytes, "policy": self.policy}
        if snap is not None:
            budget.update(page_size=snap.page_size, pages=snap.budget_pages,
                          used_pages=snap.used_pages, free_pages=snap.free_pages)
        return {"budget": budget, "models": models}

    def workers_report(self) -> list[dict[str, object]]:
        """In-process engines: one "worker" per model, all in this process."""
        return [{"worker": name, "model": name, "role": "colocated", "pid": os.getpid(),
                 "state": "asleep" if engine.asleep else "awake", "device": "cpu",
                 "kv_pages": engine.kv.pages.mapped_pages,
                 "weights_bytes": 0 if engine.asleep else engine.weights_bytes,
                 "weights_shared": False, "restarts": 0}
                for name, engine in self.engines.items()]

    def check_integrity(self) -> None:
        if self.arbiter is not None:
            self.arbiter.check_integrity()
        for engine in self.engines.values():
            with engine.kv.lock:
                engine.check_integrity()

    def close(self) -> None:
        """Stop the idle sleeper and close every engine (their reclaimers stop, pages unmap);
        the caller has stopped stepping them."""
        self.closed = True
        for engine in self.engines.values():
            engine.close()


def checkpoint_bytes(path: str) -> int:
    """Weights' size from the safetensors files (what fp32 weights take once loaded on CPU)."""
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "*.safetensors")))
