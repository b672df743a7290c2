"""Simulated KV storage of one model: the page accounting of ``engine/elastic_kv.py`` without torch.

Pages are mapped as a prefix of a reserved range and block ids ``[0, rows)`` are the blocks lying
wholly inside mapped pages: ``rows = pages * page_size // block_bytes``. After every change the
block pool is resized to ``rows``. Growing asks the shared :class:`Arbiter` for pages; shrinking
compacts live blocks below the cut with ``KVCacheManager.relocate`` first, and the idle shrink
waits ``shrink_after_s`` of continuous over-provisioning (hysteresis), as the engine does.

The class also implements the arbiter's ``Reclaimer`` protocol. Time spent mapping pages,
copying blocks and swapping is accrued in ``pending_cost_s``; the simulator charges it to the
device when the current step ends.
"""

from __future__ import annotations

from collections.abc import Callable

from elasticserve.core.arbiter import Arbiter
from elasticserve.core.block_pool import BlockPool
from elasticserve.core.scheduler import Scheduler
from elasticserve.sim.cost_model import CostModel


class SimKVStorage:
    """Elastic (or static) KV pages of one model, granted by the arbiter."""

    def __init__(self, name: str, arbiter: Arbiter, cost: CostModel, block_bytes: int, *,
                 elastic: bool, min_pages: int, max_pages: int, reserve_pages: int = 1,
                 shrink_after_s: float = 0.5, idle_after_s: float = 2.0,
                 clock: Callable[[], float] = lambda: 0.0) -> None:
        self.name = name
        self.arbiter = arbiter
        self.cost = cost
        self.block_bytes = block_bytes
        self.page_size = arbiter.page_size
        self.elastic = elastic
        self.min_pages = min_pages
        self.max_pages = max_pages
        self.reserve_pages = reserve_pages
        self.shrink_after_s = shrink_after_s
        self.idle_after_s = idle_after_s
        self.clock = clock
        self.mapped_pages = 0
        self.pending_cost_s = 0.0
        self.last_active = 0.0
        self.grow_events = self.shrink_events = self.compactions = 0
        self._over_since: float | None = None
        self._scheduler: Scheduler | None = None

    def attach(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    @property
    def scheduler(self) -> Scheduler:
        assert self._scheduler is not None, "attach() a scheduler first"
        return self._scheduler

    @property
    def pool(self) -> BlockPool:
        return self.scheduler.kv.pool

    # ---- sizing ---------------------------------------------------------------------------
    def rows_for(self, pages: int) -> int:
        return pages * self.page_size // self.block_bytes

    def pages_for_blocks(self, blocks: int) -> int:
        return -(-blocks * self.block_bytes // self.page_size)

    def start(self) -> None:
        """Map the initial pages: everything for a static cache, the floor (+ reserve) else."""
        want = self.max_pages if not self.elastic else min(self.max_pages,
                                                           self.min_pages + self.reserve_pages)
        granted = self.arbiter.request(self.name, want, at_least=min(want, self.min_pages))
        self._set_pages(granted)

    def _set_pages(self, pages: int) -> None:
        """Map or unmap so that exactly ``pages`` are mapped; the pool follows."""
        current = self.mapped_pages
        if pages == current:
            return
        if pages > current:
            self.mapped_pages = pages
            self.pool.resize(self.rows_for(pages))
            self.grow_events += 1
        else:
            self.pool.resize(self.rows_for(pages))  # raises if live blocks would be cut
            self.mapped_pages = pages
            self.shrink_events += 1
        self.pending_cost_s += self.cost.page_map_time(abs(pages - current))

    # ---- hooks the scheduler and the simulator call ---------------------------------------
    def grow(self, num_blocks: int) -> bool:
        """Scheduler callback: map pages for ``num_blocks`` more blocks (plus the reserve)."""
        if not self.elastic:
            return False
        before = self.pool.num_blocks
        want = self.pages_for_blocks(before + num_blocks)
        target = min(self.max_pages, want + self.reserve_pages)
        need = min(want, self.max_pages) - self.mapped_pages
        if target <= self.mapped_pages:
            return False
        granted = self.arbiter.request(self.name, target - self.mapped_pages, at_least=max(need, 0))
        if granted == 0:
            return False
        self._set_pages(self.mapped_pages + granted)
        return self.pool.num_blocks - before >= num_blocks

    def after_step(self, memory_pressure: bool) -> None:
        self.last_active = self.clock()
        if memory_pressure:
            self._over_since = None
        else:
            self.maybe_shrink()

    def maybe_shrink(self) -> None:
        """Give back pages above live blocks + reserve once that held for ``shrink_after_s``."""
        if not self.elastic or not self.mapped_pages:
            return
        target = max(self.min_pages, min(self.max_pages, self.pages_for_blocks(self.pool.num_used)
                                         + self.reserve_pages))
        if target >= self.mapped_pages:
            self._over_since = None
            return
        now = self.clock()
        if self._over_since is None:
            self._over_since = now
        if now - self._over_since >= self.shrink_after_s:
            before = self.mapped_pages
            self._shrink_to(target)
            self.arbiter.release(self.name, before - self.mapped_pages)
            self._over_since = None

    def on_wake(self) -> None:
        """The arbiter charged our weights again: map the floor as at start."""
        self.start()

    def take_pending_cost(self) -> float:
        cost, self.pending_cost_s = self.pending_cost_s, 0.0
        return cost

    def _shrink_to(self, pages: int) -> None:
        """Compact live blocks below the cut, then unmap down to ``pages`` (or as close as
        live blocks allow)."""
        pages = max(pages, self.pages_for_blocks(self.pool.num_used))
        if pages >= self.mapped_pages:
            return
        rows = self.rows_for(pages)
        copies = self.scheduler.kv.relocate(rows)
        if copies:
            self.compactions += 1
            self.pending_cost_s += self.cost.copy_time(len(copies), self.block_bytes)
        self._set_pages(pages)

    # ---- Reclaimer protocol ---------------------------------------------------------------
    def reclaimable(self) -> tuple[int, int]:
        if not self.elastic:
            return 0, 0
        pool = self.pool
        keep_cached = self.pages_for_blocks(pool.num_used + pool.num_cached_free)
        keep_live = self.pages_for_blocks(pool.num_used)
        free = max(0, self.mapped_pages - keep_cached)
        return free, max(0, self.mapped_pages - keep_live - free)

    def free_pages(self, n: int) -> int:
        if not self.elastic:
            return 0
        pool = self.pool
        floor = self.pages_for_blocks(pool.num_used + pool.num_cached_free)
        return self._unmap_down_to(max(floor, self.mapped_pages - n))

    def drop_cached(self, n: int) -> int:
        if not self.elastic:
            return 0
        pool = self.pool
        target = max(self.pages_for_blocks(pool.num_used), self.mapped_pages - n)
        excess = pool.num_used + pool.num_cached_free - self.rows_for(target)
        if excess > 0:
            pool.evict_cached(excess)  # oldest first, as the LRU would
        return self._unmap_down_to(target)

    def preempt(self, n: int) -> int:
        if not self.elastic:
            return 0
        target = max(0, self.mapped_pages - n)
        rows = self.rows_for(target)
        if self.pool.num_used > rows:
            swapped = self.scheduler.preempt_to_fit(rows)
            self.pending_cost_s += self.cost.swap_time(len(swapped), self.block_bytes)
        return self.drop_cached(n)

    def sleep(self) -> int:
        before = self.mapped_pages
        if self.pool.num_used:
            swapped = self.scheduler.preempt_to_fit(0)
            self.pending_cost_s += self.cost.swap_time(len(swapped), self.block_bytes)
        self.pool.evict_cached()
        self._set_pages(0)
        return before

    def is_idle(self) -> bool:
        return (not self.scheduler.has_unfinished()
                and self.clock() - self.last_active >= self.idle_after_s)

    def is_starved(self) -> bool:
        s = self.scheduler
        return bool(s.waiting or s.swapped)

    def _unmap_down_to(self, pages: int) -> int:
        before = self.mapped_pages
        self._shrink_to(pages)
        self._over_since = None
        return before - self.mapped_pages

    def check_integrity(self) -> None:
        """The pool matches the mapped pages and the arbiter's grant."""
        self.scheduler.kv.check_integrity()
        if self.pool.num_blocks != self.rows_for(self.mapped_pages):
            raise AssertionError(f"{self.name}: pool has {self.pool.num_blocks} blocks, "
                                 f"{self.mapped_pages} pages hold {self.rows_for(self.mapped_pages)}")
        granted = self.arbiter.kv_pages(self.name)
        if granted != self.mapped_pages:
            raise AssertionError(f"{self.name}: arbiter granted {granted} pages, "
                                 f"{self.mapped_pages} are mapped")
