"""Elastic KV storage: the cache is a view over reserved address space; pages come and go.

The page accounting (grow, hysteresis shrink, compaction, reclaim) is `core.kv_pages.
ElasticPages`, the same object the simulator drives; this class supplies its physical actions:
pages of a `VirtualTensor` and KV copies between blocks. With a `PageBroker` (several models on
one budget, see engine/multi_model.py) every page mapped is granted first.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import torch

from elasticserve.core.block_pool import BlockPool
from elasticserve.core.kv_cache_manager import KVCacheManager
from elasticserve.core.kv_pages import ElasticPages, PageBroker, PagePolicy, Pairs
from elasticserve.core.scheduler import Scheduler
from elasticserve.engine.args import EngineArgs
from elasticserve.engine.kv_storage import KVStorage
from elasticserve.memory.factory import get_backend
from elasticserve.memory.vtensor import VirtualTensor


class ElasticKVStorage(KVStorage):
    """Grows when requests lack blocks, shrinks with hysteresis when under-used."""

    elastic = True

    def __init__(self, args: EngineArgs, config: Any, dtype: torch.dtype,
                 broker: PageBroker | None = None) -> None:
        self._args = args
        self._broker = broker
        self.backend = get_backend(args.memory_backend, args.page_size)
        self.page_size = self.backend.page_size
        self.closed = False
        super().__init__(args, config, dtype)

    def _allocate(self, dtype: torch.dtype) -> torch.Tensor:
        self.vt = VirtualTensor(self.backend, self.max_blocks * self.block_bytes, dtype,
                                self.block_shape)
        self.max_blocks = min(self.max_blocks, self.vt.tensor.shape[0])
        args = self._args
        policy = PagePolicy(
            page_size=self.page_size, block_bytes=self.block_bytes,
            min_pages=-(-args.kv_cache_min_bytes // self.page_size),
            max_pages=max(1, self.max_blocks * self.block_bytes // self.page_size),
            reserve_pages=args.kv_reserve_pages, shrink_after_s=args.kv_shrink_after_s,
            keep_peak_s=args.kv_keep_peak_s)
        self.pages = ElasticPages(policy, self, self._broker)
        self.num_blocks = self.pages.start()
        return self.vt.tensor

    def attach(self, pool: BlockPool, manager: KVCacheManager) -> None:
        super().attach(pool, manager)
        self.pages.attach(pool, manager)

    def bind_scheduler(self, scheduler: Scheduler) -> None:
        """Resize and reclaim may preempt: they need the scheduler's preempt_to_fit."""
        self.pages.preempt_to_fit = scheduler.preempt_to_fit

    # ---- PageActions: what mapping and copying mean here ---------------------------------
    def map_pages(self, n: int) -> None:
        self.vt.map_pages(n)

    def unmap_pages(self, n: int) -> None:
        self.vt.unmap_pages(n)

    def copy_blocks(self, pairs: Pairs) -> None:
        src, dst = _index(pairs)
        self.tensor[dst] = self.tensor[src]

    def swap_out(self, pairs: Pairs) -> None:
        self.apply_swap_out(pairs)

    # ---- hooks the scheduler and the engine call -----------------------------------------
    def grow(self, num_blocks: int) -> bool:
        return self.pages.grow(num_blocks)

    def before_step(self, scheduler: Scheduler) -> None:
        self.lock.acquire()

    def after_step(self, scheduler: Scheduler) -> None:
        try:
            self.pages.after_step(scheduler.memory_pressure)
        finally:
            self.lock.release()

    def maybe_shrink(self) -> None:
        self.pages.maybe_shrink()

    def give_back(self, target_pages: int) -> int:
        """Shrink to `target_pages` or to what live blocks need, for a caller that books the
        pages itself (sleep); returns pages unmapped."""
        return self.pages.set_pages(target_pages, notify=False)

    def release_all(self) -> int:
        """Sleep: preempt every request, drop the prefix cache, unmap every page."""
        return self.pages.release_all()

    def remap_initial(self) -> None:
        """After sleep: map the starting pages again (granted by the broker)."""
        self.pages.start()

    def resize(self, nbytes: int, scheduler: Scheduler) -> None:
        """User-set ceiling: shrinking below what is in use preempts (swap or recompute) first."""
        if nbytes <= 0:
            raise ValueError(f"resize_kv_cache: bytes must be > 0, got {nbytes}")
        with self.lock:
            self.bind_scheduler(scheduler)
            self.pages.set_limit(nbytes // self.page_size)

    def reclaim_idle(self) -> None:
        """Called by the reclaimer thread: shrink between steps, and while no step runs."""
        if self.lock.acquire(blocking=False):
            try:
                self.pages.after_step(memory_pressure=False)
            finally:
                self.lock.release()

    def start_reclaimer(self, interval_s: float = 0.1) -> None:
        """A daemon thread that lets an idle engine give memory back (nothing else steps it)."""
        run_periodically(self, interval_s, ElasticKVStorage.reclaim_idle, "kv-reclaimer")

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.vt.close()

    # ---- observability --------------------------------------------------------------------
    @property
    def mapped_pages(self) -> int:
        return self.pages.mapped_pages

    def check_integrity(self) -> None:
        super().check_integrity()
        self.pages.check_integrity()
        assert self.pages.mapped_pages == self.vt.mapped_pages, "page count out of sync"

    def memory_stats(self) -> dict[str, int]:
        assert self.pool is not None
        return {
            "page_size": self.page_size,
            "kv_reserved_bytes": self.vt.tensor.shape[0] * self.block_bytes,
            "kv_mapped_bytes": self.vt.mapped_bytes,
            "kv_used_bytes": self.pool.num_used * self.block_bytes,
            "kv_cached_bytes": self.pool.num_cached_free * self.block_bytes,
            "pages_mapped": self.vt.mapped_pages,
            "grow_events": self.pages.grow_events, "shrink_events": self.pages.shrink_events,
            "compactions": self.pages.compactions,
        }


def build_kv_storage(args: EngineArgs, config: Any, broker: Any = None) -> KVStorage:
    """Static or elastic storage; `broker` (a PageBroker) makes an elastic one ask a shared
    budget for every page."""
    dtype = torch.float32 if args.dtype in (None, "auto") else getattr(torch, args.dtype)
    if args.kv_cache_mode == "static":
        if broker is not None:
            raise ValueError("a shared page budget needs kv_cache_mode='elastic'")
        return KVStorage(args, config, dtype)
    return ElasticKVStorage(args, config, dtype, broker)


def _index(pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor([p[0] for p in pairs], dtype=torch.long),
            torch.tensor([p[1] for p in pairs], dtype=torch.long))


def run_periodically(owner: Any, interval_s: float, method: Any, name: str) -> None:
    """Call `method(owner)` every `interval_s` on a daemon thread until the owner is garbage
    or has `closed` set; holds only a weak reference, so it never keeps the owner alive."""
    ref = weakref.ref(owner)

    def loop() -> None:
        while True:
            time.sleep(interval_s)
            target = ref()
            if target is None or getattr(target, "closed", False):
                return
            method(target)
            del target

    threading.Thread(target=loop, name=name, daemon=True).start()
