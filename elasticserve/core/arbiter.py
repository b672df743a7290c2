"""One page budget shared by several models' weights and KV caches. Torch-free.

Every model holds ``weights_pages`` while awake plus the KV pages it was granted. A model asks for
pages with :meth:`Arbiter.request`; when the free budget is short the arbiter takes pages back
from *other* models through their :class:`Reclaimer`, cheapest first:

1. mapped but unused pages (no live block, no cached prefix);
2. pages that only hold cached-prefix blocks;
3. preemption (swap or recompute) in models of lower priority, in idle models, and - with
   ``fair_share`` - in equal-priority models holding more than their fair share;
4. putting an idle model to sleep (weights and KV released), least popular and least recently
   used first.

Tiers 1-3 never take a model below its ``min_bytes``. A model's own pages are never reclaimed to
serve its own request. The arbiter only reclaims when the estimated reclaimable total covers
the shortfall, so destructive tiers are not run for a request that would fail anyway.

Replicas of one model register with one ``weights_key``: their shared weights are charged once
while any of them is awake (arbiter_weights.py).

Locking: every public method holds one re-entrant lock (``lock``), and reclaimers are called
under it. A reclaimer reports what it unmapped through its return value; it must not call
``release`` for those pages (that would count them twice).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from elasticserve.core.arbiter_reclaim import (
    ModelEntry,
    apply_limits,
    best_yield,
    check_books,
    claimed_by_others,
    decayed_rate,
    fair_share,
    note_claim,
    victims,
)
from elasticserve.core.arbiter_types import (
    ArbiterError,
    ArbiterPolicy,
    ArbiterSnapshot,
    ModelState,
    Reclaimer,
    ReclaimTier,
)
from elasticserve.core.arbiter_weights import charged_weights, check_group, weights_delta

__all__ = ["Arbiter", "ArbiterError", "ArbiterPolicy", "ArbiterSnapshot", "ModelState", "Reclaimer",
           "ReclaimTier"]

class Arbiter:
    """Grants KV pages out of one budget; reclaims from other models when it runs short."""

    def __init__(self, budget_bytes: int, page_size: int = 2 << 20,
                 policy: ArbiterPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if page_size <= 0 or budget_bytes < 0:
            raise ValueError("page_size must be > 0 and budget_bytes >= 0")
        self.page_size = page_size
        self.budget_pages = budget_bytes // page_size
        self.policy = policy or ArbiterPolicy()
        self._clock = clock
        self._lock = threading.RLock()
        self.lock = self._lock  # for callers keeping books beside ours (procs/page_broker.py)
        self._models: dict[str, ModelEntry] = {}
        self._used = 0
        # pages taken per reclaim tier (keyed by its plain string value), plus event counts
        self.stats: dict[str, int] = {t.value: 0 for t in ReclaimTier} | {"sleeps": 0, "wakes": 0,
                                                                          "denied": 0}

    # ---- registration and limits ---------------------------------------------------------
    def register(self, name: str, weights_bytes: int, min_bytes: int = 0,
                 max_bytes: int | None = None, priority: int = 0,
                 reclaimer: Reclaimer | None = None, awake: bool = True,
                 weights_key: str | None = None) -> None:
        """Add a model; an awake one is charged its weights now (reclaiming if needed), unless
        another entry of its ``weights_key`` is awake (replicas share one copy)."""
        if reclaimer is None:
            raise ArbiterError(f"model {name!r} needs a reclaimer")
        if weights_bytes < 0:
            raise ValueError(f"weights_bytes must be >= 0, got {weights_bytes}")
        with self._lock:
            if name in self._models:
                raise ArbiterError(f"model {name!r} is already registered")
            check_group(self._models.values(), weights_key, weights_bytes)
            m = ModelEntry(name, reclaimer, weights_bytes, -(-weights_bytes // self.page_size),
                           0, None, 0, 0, priority, False, last_used=self._clock(),
                           weights_key=weights_key)
            m.rate_t = m.last_used
            apply_limits(m, min_bytes, max_bytes, self.page_size, self.budget_pages)
            self._models[name] = m
            if awake:
                if not self.wake(name):
                    del self._models[name]
                    raise ArbiterError(f"no room for the weights of {name!r} "
                                       f"({m.weights_pages} pages, {self.free_pages} free)")
                self.stats["wakes"] -= 1  # loading at registration is not a wake-up

    def unregister(self, name: str) -> None:
        """Forget a model; it must hold no KV pages (sleep it first or release them)."""
        with self._lock:
            m = self._get(name)
            if m.kv_pages:
                raise ArbiterError(f"model {name!r} still holds {m.kv_pages} KV pages")
            if m.awake:
                self._used -= weights_delta(self._models.values(), m)
            del self._models[name]

    def set_limits(self, name: str, min_bytes: int | None = None, max_bytes: int | None = None,
                   priority: int | None = None) -> None:
        """Change limits; a lower ceiling takes pages back from the model itself first."""
        with self._lock:
            m = self._get(name)
            new_min = m.min_bytes if min_bytes is None else min_bytes
            new_max = m.max_bytes if max_bytes is None else max_bytes
            old = (m.min_bytes, m.max_bytes, m.min_pages, m.max_pages)
            apply_limits(m, new_min, new_max, self.page_size, self.budget_pages)
            if priority is not None:
                m.priority = priority
            excess = m.kv_pages - m.max_pages
            for tier in (ReclaimTier.FREE, ReclaimTier.CACHED, ReclaimTier.PREEMPT):
                if excess > 0:
                    excess -= self._take(m, tier, excess)
            if excess > 0:
                m.min_bytes, m.max_bytes, m.min_pages, m.max_pages = old
                raise ArbiterError(f"model {name!r} cannot give back {excess} more pages "
                                   f"to meet max_bytes={new_max}")

    # ---- grants ---------------------------------------------------------------------------
    def request(self, name: str, pages: int, at_least: int | None = None) -> int:
        """Grant up to ``pages`` KV pages, but no fewer than ``at_least`` (default: all).

        Returns the pages granted: 0, or between ``at_least`` and ``pages``.
        """
        need = pages if at_least is None else at_least
        if not 0 <= need <= pages:
            raise ValueError(f"need 0 <= at_least <= pages, got {at_least}, {pages}")
        with self._lock:
            m = self._awake_model(name)
            m.last_used = now = self._clock()
            want = min(pages, m.max_pages - m.kv_pages)
            if want < need:
                self.stats["denied"] += 1
                return 0
            if self._available(m, now) < need:
                self._reclaim(m, need - self._available(m, now), m.kv_pages + need)
            available = self._available(m, now)
            if available < need:
                self.stats["denied"] += 1
                note_claim(m, need, now)
                return 0
            grant = min(want, available)
            if not m.kv_pages:
                m.held_since = now
            m.kv_pages += grant
            self._used += grant
            m.claim_since = None
            return grant

    def _available(self, m: ModelEntry, now: float) -> int:
        """Free pages ``m`` may take: those not kept for models starved before it."""
        return self.free_pages - claimed_by_others(self._models.values(), m, now,
                                                   self.policy.starved_claim_ttl_s)

    def release(self, name: str, pages: int) -> None:
        """The model unmapped ``pages`` KV pages on its own (shrink, shutdown)."""
        with self._lock:
            m = self._get(name)
            if not 0 <= pages <= m.kv_pages:
                raise ArbiterError(f"model {name!r} releases {pages} pages but holds {m.kv_pages}")
            m.kv_pages -= pages
            self._used -= pages

    def sleep(self, name: str) -> int:
        """Put a model to sleep now: every KV page and its weights go back to the budget."""
        with self._lock:
            return self._sleep(self._get(name))

    def wake(self, name: str) -> bool:
        """Charge the weights of a sleeping model again (reclaiming if needed)."""
        with self._lock:
            m = self._get(name)
            if m.awake:
                return True
            m.last_used = now = self._clock()
            charge = weights_delta(self._models.values(), m)
            if self._available(m, now) < charge:
                self._reclaim(m, charge - self._available(m, now), m.min_pages)
            if self._available(m, now) < charge:
                return False
            m.awake = True
            self._used += charge
            self.stats["wakes"] += 1
            return True

    def cancel_wake(self, name: str) -> None:
        """Undo ``wake`` (the model's weights failed to load): asleep again, weights not
        charged; it must hold no KV pages by now."""
        with self._lock:
            m = self._get(name)
            if not m.awake:
                return
            if m.kv_pages:
                raise ArbiterError(f"model {name!r} cancels a wake holding {m.kv_pages} KV pages")
            self._used -= weights_delta(self._models.values(), m)
            m.awake = False
            self.stats["wakes"] -= 1

    # ---- popularity -----------------------------------------------------------------------
    def note_request(self, name: str) -> None:
        """A request arrived for ``name``: update its rate EWMA and last-used time."""
        with self._lock:
            m, now, tau = self._get(name), self._clock(), self.policy.popularity_tau_s
            m.rate = decayed_rate(m, now, tau) + 1.0 / tau
            m.rate_t = m.last_used = now

    def popularity(self, name: str) -> float:
        """Request rate EWMA (requests/s) as of now."""
        with self._lock:
            return decayed_rate(self._get(name), self._clock(), self.policy.popularity_tau_s)

    # ---- reclaim --------------------------------------------------------------------------
    def _reclaim(self, req: ModelEntry, short: int, req_after: int) -> None:
        """Take ``short`` pages from models other than ``req`` (which will then hold
        ``req_after`` KV pages), cheapest tier first."""
        plans = {tier: self._victims(req, tier, req_after) for tier in self._tiers()}
        if best_yield(plans) < short:
            return  # cannot succeed: do not disturb anyone
        got = 0
        for tier, candidates in plans.items():
            for victim, cap in candidates:
                if got >= short:
                    return
                got += self._take(victim, tier, min(cap, short - got))

    def _tiers(self) -> list[ReclaimTier]:
        p = self.policy
        flags = (p.reclaim_free, p.reclaim_cached, p.preempt, p.sleep_idle)
        return [t for t, on in zip(ReclaimTier, flags, strict=True) if on]

    def _victims(self, req: ModelEntry, tier: ReclaimTier, req_after: int) -> list[tuple[ModelEntry, int]]:
        """Candidates of one tier: lowest priority, least popular, least recently used first."""
        now, tau = self._clock(), self.policy.popularity_tau_s
        others = sorted((m for m in self._models.values() if m is not req and m.awake),
                        key=lambda m: (m.priority, decayed_rate(m, now, tau), m.last_used))
        models = self._models.values()
        fair = fair_share(models, self.budget_pages, charged_weights(models))
        return victims(others, req, tier, req_after, fair, self.policy, now,
                       lambda m: weights_delta(models, m))

    def _take(self, m: ModelEntry, tier: ReclaimTier, n: int) -> int:
        """Run one reclaim call on ``m`` and book what it returned."""
        if tier is ReclaimTier.SLEEP:
            return self._sleep(m)
        call = {ReclaimTier.FREE: m.reclaimer.free_pages, ReclaimTier.CACHED: m.reclaimer.drop_cached,
                ReclaimTier.PREEMPT: m.reclaimer.preempt}[tier]
        freed = call(n)
        if not 0 <= freed <= m.kv_pages:
            raise ArbiterError(f"reclaimer of {m.name!r} returned {freed} pages from {tier} "
                               f"but holds {m.kv_pages}")
        m.kv_pages -= freed
        self._used -= freed
        self.stats[tier.value] += freed
        return freed

    def _sleep(self, m: ModelEntry) -> int:
        if not m.awake:
            return 0
        freed = m.reclaimer.sleep()
        if freed is None:
            return 0  # the model is mid-step and cannot sleep now
        if freed != m.kv_pages:
            raise ArbiterError(f"{m.name!r} released {freed} KV pages on sleep, holds {m.kv_pages}")
        total = m.kv_pages + weights_delta(self._models.values(), m)
        self._used -= total
        m.kv_pages, m.awake, m.claim_since = 0, False, None
        self.stats[ReclaimTier.SLEEP.value] += total
        self.stats["sleeps"] += 1
        return total

    # ---- observability --------------------------------------------------------------------
    @property
    def free_pages(self) -> int:
        """Pages not granted to anyone."""
        return self.budget_pages - self._used

    @property
    def used_pages(self) -> int:
        """Pages held as weights of awake models or as KV grants."""
        return self._used

    def kv_pages(self, name: str) -> int:
        """KV pages currently granted to ``name``."""
        with self._lock:
            return self._get(name).kv_pages

    def is_awake(self, name: str) -> bool:
        with self._lock:
            return self._get(name).awake

    def names(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def snapshot(self) -> ArbiterSnapshot:
        """A consistent copy of the budget and every model's state."""
        with self._lock:
            now, tau = self._clock(), self.policy.popularity_tau_s
            models = {m.name: ModelState(m.name, m.awake, m.weights_bytes, m.weights_pages,
                                         m.kv_pages, m.min_bytes, m.max_bytes, m.priority,
                                         m.last_used, decayed_rate(m, now, tau), m.weights_key)
                      for m in self._models.values()}
            return ArbiterSnapshot(self.page_size, self.budget_pages, self._used,
                                   self.free_pages, models,
                                   charged_weights(self._models.values()))

    def check_integrity(self) -> None:
        """Raise ArbiterError unless grants + weights == used <= budget and limits hold."""
        with self._lock:
            models = list(self._models.values())
            check_books(models, self._used, self.budget_pages, charged_weights(models))

    # ---- helpers --------------------------------------------------------------------------
    def _get(self, name: str) -> ModelEntry:
        m = self._models.get(name)
        if m is None:
            raise ArbiterError(f"unknown model {name!r}")
        return m

    def _awake_model(self, name: str) -> ModelEntry:
        m = self._get(name)
        if not m.awake:
            raise ArbiterError(f"model {name!r} is asleep; wake it before requesting pages")
        return m
