"""Page accounting of one elastic KV cache, shared by the engine and the simulator. Torch-free.

Pages are mapped as a prefix of a reserved range; block ids `[0, rows)` are exactly the blocks
lying wholly inside mapped pages (`rows = pages * page_size // block_bytes`), and the block
pool's capacity always equals `rows`. Growing maps pages at the end (granted by a broker when
several models share a budget); shrinking moves live blocks out of the tail first
(`KVCacheManager.relocate`) and then unmaps. What "map", "unmap" and "copy" mean is the
caller's: real pages and tensor copies in the engine, accrued costs in the simulator.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from elasticserve.core.block_pool import BlockPool
from elasticserve.core.kv_cache_manager import KVCacheManager

Pairs = list[tuple[int, int]]


class PageActions(Protocol):
    """The physical side: back `n` more pages at the end, drop the last `n`, copy blocks."""

    def map_pages(self, n: int) -> None: ...
    def unmap_pages(self, n: int) -> None: ...
    def copy_blocks(self, pairs: Pairs) -> None: ...
    def swap_out(self, pairs: Pairs) -> None: ...


class PageBroker(Protocol):
    """Who grants pages when several models share one budget."""

    def grant(self, pages: int, at_least: int) -> int:
        """Up to `pages` more pages, or none if fewer than `at_least` are available."""
        ...

    def release(self, pages: int) -> None:
        """Take back `pages` this cache unmapped on its own (not ones the broker reclaimed)."""
        ...


class ModelBroker(PageBroker, Protocol):
    """A page broker that also books one model's weights and its wake-ups: what an engine
    on a shared budget asks of it (engine/multi_model.py's ModelHost)."""

    pages_reclaimed: int  # pages the arbiter has taken back from this model (for metrics)

    def attach_model(self, weights_bytes: int) -> None:
        """Register the model; its weights count against the budget from now on."""
        ...

    def wake(self) -> bool:
        """Book the weights and starting pages of a sleeping model; False if no room yet."""
        ...

    def cancel_wake(self) -> None:
        """Undo a `wake` whose weights then failed to load: the model is asleep again and its
        weights no longer count (its KV pages were already released)."""
        ...


@dataclass(frozen=True, slots=True)
class PagePolicy:
    page_size: int
    block_bytes: int
    min_pages: int
    max_pages: int
    reserve_pages: int = 1  # pre-mapped beyond need, so allocation rarely waits
    shrink_after_s: float = 0.5  # hysteresis before unused pages are given back
    # A busy cache keeps its peak of the last few seconds mapped: shrinking to exactly what
    # is live unmaps pages the next arrivals map again, and both cost driver time per page.
    keep_peak_s: float = 5.0
    # at most this many blocks however many pages hold: a static cache of exactly N blocks
    # maps whole pages but offers only N (None: every whole block in the mapped pages)
    max_blocks: int | None = None


class ElasticPages:
    """Grow on demand, shrink with hysteresis, compact before unmapping, reclaim on request."""

    def __init__(self, policy: PagePolicy, actions: PageActions,
                 broker: PageBroker | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.actions = actions
        self.broker = broker
        self.clock = clock
        self.mapped_pages = 0
        self.limit_pages = policy.max_pages
        self.grow_events = self.shrink_events = self.compactions = 0
        self.pages_granted = 0  # every page ever mapped (granted by the broker, if any)
        self.reclaim_debt = 0  # pages a broker asked for while a step held the cache
        # pages a broker asked for by preemption while a step held the cache (not summed: a
        # starved neighbour asks again every step for the same pages)
        self.preempt_debt = 0
        self.pool: BlockPool | None = None
        self.manager: KVCacheManager | None = None
        self.preempt_to_fit: Callable[[int], Pairs] | None = None
        # rows that must stay where they are (blocks lent to another process, whose page
        # indices it was told): no shrink goes below them and no compaction moves them
        self.pinned_rows: Callable[[], int] | None = None
        self._over_since: float | None = None
        self._peak, self._peak_at = 0, 0.0  # live pages held for keep_peak_s

    # ---- sizing ---------------------------------------------------------------------------
    def rows_for(self, pages: int) -> int:
        rows = pages * self.policy.page_size // self.policy.block_bytes
        cap = self.policy.max_blocks
        return rows if cap is None else min(rows, cap)

    def pages_for_blocks(self, blocks: int) -> int:
        return -(-blocks * self.policy.block_bytes // self.policy.page_size)

    @property
    def floor_pages(self) -> int:
        return min(self.limit_pages, self.policy.min_pages)

    def _live_pages(self) -> int:
        assert self.pool is not None
        return self.pages_for_blocks(self.pool.num_used)

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> int:
        """Map the starting pages (floor + reserve, as granted); returns the rows they hold."""
        want = min(self.limit_pages, self.policy.min_pages + self.policy.reserve_pages)
        self._map(self._granted(want, min(want, self.policy.min_pages)))
        return self.rows_for(self.mapped_pages)

    def attach(self, pool: BlockPool, manager: KVCacheManager,
               preempt_to_fit: Callable[[int], Pairs] | None = None) -> None:
        self.pool, self.manager, self.preempt_to_fit = pool, manager, preempt_to_fit

    def _granted(self, pages: int, at_least: int) -> int:
        if self.broker is None or pages <= 0:
            return max(pages, 0)
        return self.broker.grant(pages, at_least)

    def _map(self, n: int) -> None:
        if n <= 0:
            return
        self.actions.map_pages(n)
        self.mapped_pages += n
        self.grow_events += 1
        self.pages_granted += n
        if self.pool is not None:
            self.pool.resize(self.rows_for(self.mapped_pages))

    def set_pages(self, pages: int, notify: bool = True) -> int:
        """Shrink to `pages` (never below live blocks): compact, resize, unmap. Returns the
        pages unmapped; `notify` releases them to the broker (not when it reclaimed them)."""
        assert self.pool is not None
        pinned = self.pages_for_blocks(self.pinned_rows()) if self.pinned_rows else 0
        pages = max(pages, self._live_pages(), pinned)
        gone = self.mapped_pages - pages
        if gone <= 0:
            return 0
        self._compact_below(self.rows_for(pages))
        self.pool.resize(self.rows_for(pages))
        self.actions.unmap_pages(gone)
        self.mapped_pages = pages
        self.shrink_events += 1
        if notify and self.broker is not None:
            self.broker.release(gone)
        return gone

    def _compact_below(self, rows: int) -> None:
        assert self.manager is not None
        copies = self.manager.relocate(rows)
        if copies:
            self.actions.copy_blocks(copies)
            self.compactions += 1

    # ---- the scheduler's and the engine's hooks ---------------------------------------------
    def grow(self, num_blocks: int) -> bool:
        """Map pages for `num_blocks` more blocks (plus the reserve), if granted."""
        assert self.pool is not None
        before, mapped = self.pool.num_blocks, self.mapped_pages
        need = min(self.limit_pages, self.pages_for_blocks(before + num_blocks)) - mapped
        if need <= 0:
            return False
        want = min(self.limit_pages, mapped + need + self.policy.reserve_pages) - mapped
        granted = self._granted(want, need)
        if granted <= 0:
            return False
        self._map(granted)
        return self.pool.num_blocks - before >= num_blocks

    def after_step(self, memory_pressure: bool) -> None:
        if self.reclaim_debt:
            self.reclaim_debt = max(0, self.reclaim_debt - self.set_pages(
                self.mapped_pages - self.reclaim_debt))
        if self.preempt_debt:
            # a free-page shrink never goes below live blocks: this debt preempts
            owed, self.preempt_debt = self.preempt_debt, 0
            paid = self.preempt(owed)
            if paid and self.broker is not None:
                self.broker.release(paid)
        if memory_pressure:
            self._over_since = None
        else:
            self.maybe_shrink()

    def maybe_shrink(self) -> None:
        """Give back pages above the target once that held for `shrink_after_s` (a burst's
        pages are not thrashed step to step). The target is the reserve plus, while any block
        is live, the peak of live pages in the last `keep_peak_s` (an idle cache keeps only the
        reserve), never below the floor."""
        now = self.clock()
        live = self._live_pages()
        held = self._recent_peak(live, now) if live else 0
        target = max(self.floor_pages, min(self.limit_pages, held + self.policy.reserve_pages))
        if target >= self.mapped_pages:
            self._over_since = None
            return
        if self._over_since is None:
            self._over_since = now
        if now - self._over_since >= self.policy.shrink_after_s:
            self.set_pages(target)
            self._over_since = None

    def _recent_peak(self, live: int, now: float) -> int:
        if live >= self._peak or now - self._peak_at >= self.policy.keep_peak_s:
            self._peak, self._peak_at = live, now
        return self._peak

    def set_limit(self, pages: int) -> None:
        """A user-set ceiling between one page and the reserved maximum (`policy.max_pages`,
        else ValueError): preempts (swap or recompute) what does not fit, then shrinks.
        Preempted requests wait for the ceiling to rise again (see `can_hold_later`)."""
        assert self.pool is not None
        if not 1 <= pages <= self.policy.max_pages:
            raise ValueError(f"the KV ceiling must be between 1 and {self.policy.max_pages} "
                             f"pages (the reserved maximum), got {pages}")
        self.limit_pages = pages
        self._preempt_to_rows(self.rows_for(self.limit_pages))
        if self.mapped_pages > self.limit_pages:
            self.set_pages(self.limit_pages)

    def can_hold_later(self, blocks: int) -> bool:
        """Whether `blocks` would fit once a lowered ceiling is raised back to the reserved
        maximum: a request that outgrows the current ceiling then waits instead of failing."""
        return self.limit_pages < self.policy.max_pages and blocks <= self.rows_for(
            self.policy.max_pages)

    def _preempt_to_rows(self, rows: int) -> None:
        assert self.pool is not None
        if self.pool.num_used > rows:
            assert self.preempt_to_fit is not None, "attach() a scheduler to preempt"
            self.actions.swap_out(self.preempt_to_fit(rows))

    # ---- what a broker may take back (the caller holds the cache's lock) ---------------------
    def reclaimable(self) -> tuple[int, int]:
        """(pages free of live and cached blocks, pages more if cached blocks go)."""
        assert self.pool is not None
        with_cached = self.pages_for_blocks(self.pool.num_used + self.pool.num_cached_free)
        free = max(0, self.mapped_pages - with_cached)
        return free, max(0, with_cached - self._live_pages())

    def free_pages(self, n: int) -> int:
        assert self.pool is not None
        keep = self.pages_for_blocks(self.pool.num_used + self.pool.num_cached_free)
        return self._reclaimed(max(keep, self.mapped_pages - n))

    def drop_cached(self, n: int) -> int:
        assert self.pool is not None
        target = max(self._live_pages(), self.mapped_pages - n)
        excess = self.pool.num_used + self.pool.num_cached_free - self.rows_for(target)
        if excess > 0:
            self.pool.evict_cached(excess)  # least recently used first
        return self._reclaimed(target)

    def preempt(self, n: int) -> int:
        target = max(0, self.mapped_pages - n)
        self._preempt_to_rows(self.rows_for(target))
        return self.drop_cached(n)

    def release_all(self) -> int:
        """Sleep: preempt everyone, drop the cache, unmap every page (not released: the broker
        books a sleep itself)."""
        assert self.pool is not None
        self._preempt_to_rows(0)
        self.pool.evict_cached()
        return self._reclaimed(0)

    def _reclaimed(self, target: int) -> int:
        self._over_since = None
        return self.set_pages(target, notify=False)

    def check_integrity(self) -> None:
        assert self.pool is not None
        if self.pool.num_blocks != self.rows_for(self.mapped_pages):
            raise AssertionError(f"pool has {self.pool.num_blocks} blocks but "
                                 f"{self.mapped_pages} pages hold {self.rows_for(self.mapped_pages)}")
        if self.mapped_pages > self.policy.max_pages:
            raise AssertionError(f"{self.mapped_pages} pages mapped, limit {self.policy.max_pages}")
