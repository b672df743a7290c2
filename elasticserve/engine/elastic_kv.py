"""Elastic KV storage: the cache is a view over reserved address space; pages come and go.

Blocks live in the mapped prefix of the range: block ids [0, num_blocks) are exactly the rows
that lie wholly inside mapped pages, so the block pool's capacity is `rows_mapped` and changes
only by `BlockPool.resize`. Growing maps pages at the end; shrinking first moves live blocks
out of the tail (`KVCacheManager.relocate`, a KV copy plus a block-table rewrite) and then unmaps
and releases the tail pages.

With a `PageBroker` (several models on one budget), every page mapped is granted by the broker
first and every page the storage unmaps on its own is released to it; pages taken back *by*
the broker (reclaim) are reported through the reclaim call's return value instead.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any, Protocol

import torch

from elasticserve.core.scheduler import Scheduler
from elasticserve.engine.args import EngineArgs
from elasticserve.engine.kv_storage import KVStorage
from elasticserve.memory.backend import get_backend
from elasticserve.memory.vtensor import VirtualTensor


class PageBroker(Protocol):
    """Who grants pages when several models share one budget (see engine/multi_model.py)."""

    def grant(self, pages: int, at_least: int) -> int: ...
    def release(self, pages: int) -> None: ...


class ElasticKVStorage(KVStorage):
    """Grows when requests lack blocks, shrinks with hysteresis when under-used."""

    elastic = True

    def __init__(self, args: EngineArgs, config: Any, dtype: torch.dtype,
                 broker: PageBroker | None = None) -> None:
        self._args = args
        self.broker = broker
        self.backend = get_backend(args.memory_backend, args.page_size)
        self.page_size = self.backend.page_size
        self.reserve_pages = args.kv_reserve_pages
        self.shrink_after_s = args.kv_shrink_after_s
        self.grow_events = self.shrink_events = self.compactions = 0
        self.reclaim_debt = 0  # pages a broker asked for while a step held the lock
        self._over_since: float | None = None
        self._limit_bytes: int | None = None
        self.closed = False
        super().__init__(args, config, dtype)

    def _allocate(self, dtype: torch.dtype) -> torch.Tensor:
        self.vt = VirtualTensor(self.backend, self.max_blocks * self.block_bytes, dtype,
                                self.block_shape)
        self.max_blocks = min(self.max_blocks, self.vt.tensor.shape[0])
        self.vt.map_pages(self._granted(self._initial_pages(), 0))
        self.num_blocks = self.vt.rows_mapped
        return self.vt.tensor

    # ---- sizing ---------------------------------------------------------------------------
    def _pages_for_bytes(self, nbytes: int) -> int:
        return -(-nbytes // self.page_size)

    def pages_for_blocks(self, blocks: int) -> int:
        return self._pages_for_bytes(blocks * self.block_bytes)

    def _initial_pages(self) -> int:
        return min(self._max_pages,
                   self._pages_for_bytes(self._args.kv_cache_min_bytes) + self.reserve_pages)

    @property
    def _max_pages(self) -> int:
        limit = self.max_blocks * self.block_bytes
        if self._limit_bytes is not None:
            limit = min(limit, self._limit_bytes)
        return max(1, limit // self.page_size)

    def _floor_pages(self) -> int:
        return min(self._max_pages, self._pages_for_bytes(self._args.kv_cache_min_bytes))

    def _granted(self, pages: int, at_least: int) -> int:
        if self.broker is None or pages <= 0:
            return max(pages, 0)
        return self.broker.grant(pages, at_least)

    def _set_pages(self, pages: int, notify: bool = True) -> int:
        """Map or unmap so that exactly `pages` are mapped; the pool follows. Returns the
        pages unmapped (0 on growth). Growth must already be granted by the broker."""
        assert self.pool is not None
        current = self.vt.mapped_pages
        if pages > current:
            self.vt.map_pages(pages - current)
            self.pool.resize(self.vt.rows_mapped)
            self.grow_events += 1
            return 0
        if pages == current:
            return 0
        self._compact_below((pages * self.page_size) // self.block_bytes)
        self.pool.resize((pages * self.page_size) // self.block_bytes)
        self.vt.unmap_pages(current - pages)
        self.shrink_events += 1
        if notify and self.broker is not None:
            self.broker.release(current - pages)
        return current - pages

    # ---- hooks the scheduler and the engine call -----------------------------------------
    def grow(self, num_blocks: int) -> bool:
        """Map enough pages for `num_blocks` more blocks (plus the reserve), if allowed."""
        assert self.pool is not None
        before, mapped = self.pool.num_blocks, self.vt.mapped_pages
        need = min(self._max_pages, self.pages_for_blocks(before + num_blocks)) - mapped
        want = min(self._max_pages, need + mapped + self.reserve_pages) - mapped
        if need <= 0:
            return False
        granted = self._granted(want, need)
        if granted <= 0:
            return False
        self._set_pages(mapped + granted)
        return self.pool.num_blocks - before >= num_blocks

    def before_step(self, scheduler: Scheduler) -> None:
        self.lock.acquire()

    def after_step(self, scheduler: Scheduler) -> None:
        try:
            if self.reclaim_debt:
                self._pay_debt()
            if scheduler.memory_pressure:
                self._over_since = None
            else:
                self.maybe_shrink()
        finally:
            self.lock.release()

    def _pay_debt(self) -> None:
        assert self.pool is not None
        floor = self.pages_for_blocks(self.pool.num_used)
        target = max(floor, self.vt.mapped_pages - self.reclaim_debt)
        self.reclaim_debt = max(0, self.reclaim_debt - self._set_pages(target))

    def maybe_shrink(self) -> None:
        """Give back pages above what live blocks + the reserve need, once that has been true
        for `kv_shrink_after_s` (hysteresis: a burst's pages are not thrashed step to step)."""
        assert self.pool is not None
        target = max(self._floor_pages(),
                     min(self._max_pages, self.pages_for_blocks(self.pool.num_used)
                         + self.reserve_pages))
        if target >= self.vt.mapped_pages:
            self._over_since = None
            return
        now = time.monotonic()
        if self._over_since is None:
            self._over_since = now
        if now - self._over_since >= self.shrink_after_s:
            self._set_pages(target)
            self._over_since = None

    def _compact_below(self, rows: int) -> None:
        assert self.manager is not None
        copies = self.manager.relocate(rows)
        if copies:
            src = torch.tensor([c[0] for c in copies], dtype=torch.long)
            dst = torch.tensor([c[1] for c in copies], dtype=torch.long)
            self.tensor[dst] = self.tensor[src]
            self.compactions += 1

    def give_back(self, target_pages: int) -> int:
        """For a broker's reclaim (caller holds the lock): shrink to `target_pages` or to what
        live blocks need, whichever is more; returns pages unmapped (not released: the
        broker counts them from this return value)."""
        assert self.pool is not None
        floor = self.pages_for_blocks(self.pool.num_used)
        return self._set_pages(max(target_pages, floor), notify=False)

    def remap_initial(self) -> None:
        """After sleep: map the starting pages again (granted by the broker)."""
        self._set_pages(self._granted(self._initial_pages(), 0))

    def resize(self, nbytes: int, scheduler: Scheduler) -> None:
        """User-set ceiling: shrinking below what is in use preempts (swap or recompute) first."""
        if nbytes <= 0:
            raise ValueError(f"resize_kv_cache: bytes must be > 0, got {nbytes}")
        with self.lock:
            self._limit_bytes = nbytes
            rows = (self._max_pages * self.page_size) // self.block_bytes
            assert self.pool is not None
            if self.pool.num_used > rows:
                self.apply_swap_out(scheduler.preempt_to_fit(rows))
            if self.vt.mapped_pages > self._max_pages:
                self._set_pages(self._max_pages)

    def reclaim_idle(self) -> None:
        """Called by the reclaimer thread: shrink between steps, and while no step runs."""
        if self.lock.acquire(blocking=False):
            try:
                if self.reclaim_debt:
                    self._pay_debt()
                self.maybe_shrink()
            finally:
                self.lock.release()

    def start_reclaimer(self, interval_s: float = 0.1) -> None:
        """A daemon thread that lets an idle engine give memory back (nothing else steps it)."""
        ref = weakref.ref(self)

        def loop() -> None:
            while True:
                time.sleep(interval_s)
                storage = ref()
                if storage is None or storage.closed:
                    return
                storage.reclaim_idle()
                del storage

        threading.Thread(target=loop, name="kv-reclaimer", daemon=True).start()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.vt.close()

    # ---- observability --------------------------------------------------------------------
    @property
    def mapped_pages(self) -> int:
        return self.vt.mapped_pages

    def check_integrity(self) -> None:
        super().check_integrity()
        assert self.pool is not None
        assert self.pool.num_blocks <= self.vt.rows_mapped, "pool has blocks on unmapped pages"

    def memory_stats(self) -> dict[str, int]:
        assert self.pool is not None
        return {
            "page_size": self.page_size,
            "kv_reserved_bytes": self.vt.tensor.shape[0] * self.block_bytes,
            "kv_mapped_bytes": self.vt.mapped_bytes,
            "kv_used_bytes": self.pool.num_used * self.block_bytes,
            "kv_cached_bytes": self.pool.num_cached_free * self.block_bytes,
            "pages_mapped": self.vt.mapped_pages,
            "grow_events": self.grow_events, "shrink_events": self.shrink_events,
            "compactions": self.compactions,
        }
