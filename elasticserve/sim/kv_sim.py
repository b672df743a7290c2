"""Simulated KV storage of one model: the engine's own page accounting, with costs for actions.

The page logic (grow, hysteresis shrink, compaction before unmapping, reclaim tiers) is
`core.kv_pages.ElasticPages`, the object the engine's `KVStorage` drives too. Here its
"physical" actions accrue simulated time instead of touching memory: mapping pages, copying
blocks and swapping are charged to the device when the current step ends
(`take_pending_cost`); the idle reclaimer's shrinks run beside the steps and delay only a step
of the same model that starts before they finish (`reclaim_in_background`). Pages are granted
by the shared `Arbiter`; the class also implements the arbiter's `Reclaimer` protocol by
delegating to `ElasticPages`. With a `LayerSpill` (sim/host_tier_sim.py, the "tiered" policy)
the pages come from it instead: device pages from the arbiter first, then host-backed ones.
"""

from __future__ import annotations

from collections.abc import Callable

from elasticserve.core.arbiter import Arbiter
from elasticserve.core.block_pool import BlockPool
from elasticserve.core.kv_pages import ElasticPages, PagePolicy, Pairs
from elasticserve.core.scheduler import Scheduler
from elasticserve.outputs import ScheduledSeq
from elasticserve.sim.cost_model import CostModel
from elasticserve.sim.host_tier_sim import LayerSpill


class _ArbiterBroker:
    def __init__(self, arbiter: Arbiter, name: str) -> None:
        self.arbiter, self.name = arbiter, name

    def grant(self, pages: int, at_least: int) -> int:
        return self.arbiter.request(self.name, pages, at_least=at_least)

    def release(self, pages: int) -> None:
        self.arbiter.release(self.name, pages)


class SimKVStorage:
    """Elastic (or static) KV pages of one model, granted by the arbiter."""

    def __init__(self, name: str, arbiter: Arbiter, cost: CostModel, block_bytes: int, *,
                 elastic: bool, min_pages: int, max_pages: int, reserve_pages: int = 1,
                 shrink_after_s: float = 0.5, keep_peak_s: float = 5.0,
                 idle_after_s: float = 2.0,
                 clock: Callable[[], float] = lambda: 0.0,
                 spill: LayerSpill | None = None) -> None:
        self.name = name
        self.arbiter = arbiter
        self.cost = cost
        self.block_bytes = block_bytes
        self.page_size = arbiter.page_size
        self.elastic = elastic
        self.idle_after_s = idle_after_s
        self.clock = clock
        self.pending_cost_s = 0.0
        self.reclaimer_until = 0.0  # the reclaimer thread's page work runs until then
        self.last_active = 0.0
        # a static cache maps everything at start and never moves: its floor is its size
        policy = PagePolicy(self.page_size, block_bytes,
                            min_pages=min_pages if elastic else max_pages,
                            # layer-wise spill: up to its host pages beyond the device ceiling
                            max_pages=max_pages + (spill.max_host_pages if spill else 0),
                            reserve_pages=reserve_pages if elastic else 0,
                            shrink_after_s=shrink_after_s, keep_peak_s=keep_peak_s)
        self.spill = spill
        broker = spill if spill is not None else _ArbiterBroker(arbiter, name)
        self.pages = ElasticPages(policy, self, broker, clock=clock)
        if spill is not None:
            spill.mapped = lambda: self.pages.mapped_pages
        self._scheduler: Scheduler | None = None

    def attach(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self.pages.attach(scheduler.kv.pool, scheduler.kv, scheduler.preempt_to_fit)
        if self.spill is not None:
            self.spill.pool = scheduler.kv.pool

    @property
    def scheduler(self) -> Scheduler:
        assert self._scheduler is not None, "attach() a scheduler first"
        return self._scheduler

    @property
    def pool(self) -> BlockPool:
        return self.scheduler.kv.pool

    @property
    def mapped_pages(self) -> int:
        return self.pages.mapped_pages

    @property
    def grow_events(self) -> int:
        return self.pages.grow_events

    @property
    def shrink_events(self) -> int:
        return self.pages.shrink_events

    @property
    def compactions(self) -> int:
        return self.pages.compactions

    def rows_for(self, pages: int) -> int:
        return self.pages.rows_for(pages)

    def pages_for_blocks(self, blocks: int) -> int:
        return self.pages.pages_for_blocks(blocks)

    # ---- PageActions: simulated costs -----------------------------------------------------
    def map_pages(self, n: int) -> None:
        self.pending_cost_s += self.cost.page_map_time(n)

    def unmap_pages(self, n: int) -> None:
        self.pending_cost_s += self.cost.page_map_time(n)

    def copy_blocks(self, pairs: Pairs) -> None:
        # compaction out of host-backed rows (spill) crosses the host link, not HBM
        edge = self.spill.device_rows if self.spill is not None and self.spill.host_pages else None
        link = 0 if edge is None else sum(1 for s, d in pairs if s >= edge or d >= edge)
        self.pending_cost_s += self.cost.copy_time(len(pairs) - link, self.block_bytes)
        if link:
            self.pending_cost_s += self.cost.swap_time(link, self.block_bytes)

    def swap_out(self, pairs: Pairs) -> None:
        self.pending_cost_s += self.cost.swap_time(len(pairs), self.block_bytes)

    # ---- hooks the scheduler and the simulator call ---------------------------------------
    def start(self) -> None:
        """Map the initial pages: everything for a static cache, the floor (+ reserve) else."""
        self.pages.start()

    def grow(self, num_blocks: int) -> bool:
        return self.elastic and self.pages.grow(num_blocks)

    def after_step(self, memory_pressure: bool) -> None:
        self.last_active = self.clock()
        if self.elastic:
            self.pages.after_step(memory_pressure)
        if self.spill is not None:
            self.spill.try_promote()

    def link_time(self, scheduled: list[ScheduledSeq]) -> float:
        """Seconds the host link needs this step for spilled KV, overlapped with compute
        (0 without a spill)."""
        return 0.0 if self.spill is None else self.spill.link_time(scheduled)

    @property
    def spilling(self) -> bool:
        """Some pages are host-backed: the model is short of device memory itself."""
        return self.spill is not None and self.spill.host_pages > 0

    def maybe_shrink(self) -> None:
        if self.elastic and self.pages.mapped_pages:
            self.pages.maybe_shrink()

    def reclaim_in_background(self, now: float) -> None:
        """The engine's reclaimer thread shrinks an idle cache under the cache lock: its page
        work takes time from ``now`` on, and delays this model's next step only while it is
        still running (``wait_for_reclaimer``), not by its whole cost."""
        before = self.pending_cost_s
        self.maybe_shrink()
        spent, self.pending_cost_s = self.pending_cost_s - before, before
        if spent > 0:
            self.reclaimer_until = max(self.reclaimer_until, now) + spent

    def wait_for_reclaimer(self, now: float) -> float:
        """How long a step starting at ``now`` waits for the cache lock."""
        return max(0.0, self.reclaimer_until - now)

    def on_wake(self) -> None:
        """The arbiter charged our weights again: map the floor as at start."""
        self.start()

    def take_pending_cost(self) -> float:
        cost, self.pending_cost_s = self.pending_cost_s, 0.0
        return cost

    # ---- Reclaimer protocol ---------------------------------------------------------------
    def reclaimable(self) -> tuple[int, int]:
        # a spilling model has no device page to spare (its top pages are host-backed)
        return self.pages.reclaimable() if self.elastic and not self.spilling else (0, 0)

    def free_pages(self, n: int) -> int:
        return self.pages.free_pages(n) if self.elastic and not self.spilling else 0

    def drop_cached(self, n: int) -> int:
        return self.pages.drop_cached(n) if self.elastic and not self.spilling else 0

    def preempt(self, n: int) -> int:
        return self.pages.preempt(n) if self.elastic and not self.spilling else 0

    def sleep(self) -> int:
        return self.pages.release_all()

    def is_idle(self) -> bool:
        return (not self.scheduler.has_unfinished()
                and self.clock() - self.last_active >= self.idle_after_s)

    def is_starved(self) -> bool:
        s = self.scheduler
        return bool(s.waiting or s.swapped)

    def check_integrity(self) -> None:
        """The pool matches the mapped pages and the arbiter's grant."""
        self.scheduler.kv.check_integrity()
        self.pages.check_integrity()
        if self.spill is not None:
            self.spill.check_integrity()
            return
        granted = self.arbiter.kv_pages(self.name)
        if granted != self.mapped_pages:
            raise AssertionError(f"{self.name}: arbiter granted {granted} pages, "
                                 f"{self.mapped_pages} are mapped")
