"""Who gives pages back, and how many: the arbiter's victim selection. Torch-free, lock-free
(the arbiter calls these under its lock).

Tiers (``ReclaimTier``), cheapest first: ``FREE`` (mapped, unused pages), ``CACHED`` (pages
holding only cached prefix blocks), ``PREEMPT`` (swap or recompute running requests), ``SLEEP``
(an idle model's weights and KV). Each function answers for one requester and one tier.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from elasticserve.core.arbiter_types import Reclaimer, ReclaimTier


@dataclass(slots=True)
class ModelEntry:
    """The arbiter's record of one model."""

    name: str
    reclaimer: Reclaimer
    weights_bytes: int
    weights_pages: int
    min_bytes: int
    max_bytes: int | None
    min_pages: int
    max_pages: int
    priority: int
    awake: bool
    kv_pages: int = 0
    last_used: float = 0.0
    rate: float = 0.0  # EWMA of the request rate, as of rate_t
    rate_t: float = 0.0


def victims(others: list[ModelEntry], req: ModelEntry, tier: ReclaimTier, req_after: int,
            fair: int, fair_share_on: bool) -> list[tuple[ModelEntry, int]]:
    """Candidates of one tier among ``others`` (already in reclaim order), each with an upper
    bound on the pages it yields. ``req`` will hold ``req_after`` KV pages if served."""
    out: list[tuple[ModelEntry, int]] = []
    for m in others:
        if tier is ReclaimTier.SLEEP:
            cap = m.kv_pages + m.weights_pages \
                if m.priority <= req.priority and m.reclaimer.is_idle() else 0
        else:
            cap = m.kv_pages - floor(req, m, tier, req_after, fair, fair_share_on)
            if tier is not ReclaimTier.PREEMPT:
                free, cached = m.reclaimer.reclaimable()
                cap = min(cap, free if tier is ReclaimTier.FREE else cached)
        if cap > 0:
            out.append((m, cap))
    return out


def floor(req: ModelEntry, m: ModelEntry, tier: ReclaimTier, req_after: int, fair: int,
          fair_share_on: bool) -> int:
    """KV pages of victim ``m`` that this request may not take in ``tier``."""
    if m.priority < req.priority or m.reclaimer.is_idle():
        return m.min_pages
    within = fair_share_on and req_after <= fair
    if tier is ReclaimTier.PREEMPT:
        # a busy peer is preempted only for a requester within its fair share, and only
        # down to that share; a higher-priority model never is
        return max(m.min_pages, fair) if within and m.priority == req.priority else m.kv_pages
    if fair_share_on and not within and m.reclaimer.is_starved():
        # The requester is above its share and the peer has a queue: the peer keeps its
        # share, free pages too - they are about to serve that queue, and taking them makes
        # the two models preempt each other in turn.
        return max(m.min_pages, fair)
    return m.min_pages


def fair_share(models: Iterable[ModelEntry], budget_pages: int) -> int:
    """KV pages per awake model if the room left by their weights were split evenly."""
    awake = [m for m in models if m.awake]
    kv_room = budget_pages - sum(m.weights_pages for m in awake)
    return kv_room // max(1, len(awake))


def best_yield(plans: Mapping[ReclaimTier, list[tuple[ModelEntry, int]]]) -> int:
    """Most pages the tiers' plans can free together. Tiers overlap (preempting also unmaps
    free pages), so a model yields at most its best cumulative tier, not the sum over tiers."""
    best: dict[str, int] = {}
    for tier, candidates in plans.items():
        for m, cap in candidates:
            prior = best.get(m.name, 0)
            best[m.name] = prior + cap if tier is ReclaimTier.CACHED else max(prior, cap)
    return sum(best.values())
