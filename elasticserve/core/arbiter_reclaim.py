"""Who gives pages back, and how many: the arbiter's victim selection, claims of starved
models, and its books' check. Torch-free, lock-free (the arbiter calls these under its lock).

Tiers (``ReclaimTier``), cheapest first: ``FREE`` (mapped, unused pages), ``CACHED`` (pages
holding only cached prefix blocks), ``PREEMPT`` (swap or recompute running requests), ``SLEEP``
(an idle model's weights and KV). Each function answers for one requester and one tier.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from elasticserve.core.arbiter_types import ArbiterError, ArbiterPolicy, Reclaimer, ReclaimTier


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
    weights_key: str | None = None  # replicas sharing one copy of the weights (arbiter_weights)
    last_used: float = 0.0
    rate: float = 0.0  # EWMA of the request rate, as of rate_t
    rate_t: float = 0.0
    held_since: float = 0.0  # when its KV pages last went from none to some
    # a starved model (no KV page, a request denied): since when, for how many, last asked
    claim_since: float | None = None
    claim_pages: int = 0
    claim_at: float = 0.0


def victims(others: list[ModelEntry], req: ModelEntry, tier: ReclaimTier, req_after: int,
            fair: int, policy: ArbiterPolicy, now: float,
            weights_freed: Callable[[ModelEntry], int]) -> list[tuple[ModelEntry, int]]:
    """Candidates of one tier among ``others`` (already in reclaim order), each with an upper
    bound on the pages it yields. ``req`` will hold ``req_after`` KV pages if served;
    ``weights_freed(m)`` is what sleeping ``m`` frees besides its KV."""
    out: list[tuple[ModelEntry, int]] = []
    for m in others:
        if tier is ReclaimTier.SLEEP:
            cap = m.kv_pages + weights_freed(m) \
                if m.priority <= req.priority and m.reclaimer.is_idle() else 0
        else:
            cap = m.kv_pages - floor(req, m, tier, req_after, fair, policy, now)
            if tier is not ReclaimTier.PREEMPT:
                free, cached = m.reclaimer.reclaimable()
                cap = min(cap, free if tier is ReclaimTier.FREE else cached)
        if cap > 0:
            out.append((m, cap))
    return out


def floor(req: ModelEntry, m: ModelEntry, tier: ReclaimTier, req_after: int, fair: int,
          policy: ArbiterPolicy, now: float) -> int:
    """KV pages of victim ``m`` that this request may not take in ``tier``."""
    if m.priority < req.priority or m.reclaimer.is_idle():
        return m.min_pages
    fair_share_on = policy.fair_share
    within = fair_share_on and req_after <= fair
    if tier is ReclaimTier.PREEMPT:
        # a busy peer is preempted only for a requester within its fair share, and only
        # down to that share; a higher-priority model never is
        if m.priority != req.priority or not fair_share_on:
            return m.kv_pages
        if within:
            return max(m.min_pages, fair)
        if req.kv_pages == 0 and now - m.held_since >= policy.min_hold_s:
            # the share rounds to no page (fewer KV pages than busy models): a model with none
            # takes its turn once the holder has had its time slice, else it starves for good
            return m.min_pages
        return m.kv_pages
    if fair_share_on and not within and m.reclaimer.is_starved():
        # The requester is above its share and the peer has a queue: the peer keeps its
        # share, free pages too - they are about to serve that queue, and taking them makes
        # the two models preempt each other in turn.
        return max(m.min_pages, fair)
    return m.min_pages


def fair_share(models: Iterable[ModelEntry], budget_pages: int, weights_pages: int) -> int:
    """KV pages per awake model if the room left by the weights charged (``weights_pages``)
    were split evenly."""
    awake = [m for m in models if m.awake]
    return (budget_pages - weights_pages) // max(1, len(awake))


def best_yield(plans: Mapping[ReclaimTier, list[tuple[ModelEntry, int]]]) -> int:
    """Most pages the tiers' plans can free together. Tiers overlap (preempting also unmaps
    free pages), so a model yields at most its best cumulative tier, not the sum over tiers."""
    best: dict[str, int] = {}
    for tier, candidates in plans.items():
        for m, cap in candidates:
            prior = best.get(m.name, 0)
            best[m.name] = prior + cap if tier is ReclaimTier.CACHED else max(prior, cap)
    return sum(best.values())


def claimed_by_others(models: Iterable[ModelEntry], m: ModelEntry, now: float,
                      ttl_s: float) -> int:
    """Free pages kept for starved models that asked before ``m`` (all of them if ``m`` has
    no claim): freed pages go to the longest-starved model first, not to whoever asks next."""
    return sum(o.claim_pages for o in models
               if o is not m and o.claim_since is not None and o.awake and not o.kv_pages
               and now - o.claim_at <= ttl_s
               and (m.claim_since is None or o.claim_since < m.claim_since))


def note_claim(m: ModelEntry, pages: int, now: float) -> None:
    """``m`` was denied ``pages``: if it holds no KV page, it claims the next freed ones."""
    if m.kv_pages:
        return
    if m.claim_since is None:
        m.claim_since = now
    m.claim_pages, m.claim_at = pages, now


def check_books(models: list[ModelEntry], used: int, budget_pages: int, weights: int) -> None:
    """Raise ArbiterError unless grants + weights charged (``weights``) == used <= budget and
    limits hold."""
    total = sum(m.kv_pages for m in models) + weights
    if total != used or used > budget_pages:
        raise ArbiterError(f"used={used}, grants+weights={total}, budget={budget_pages}")
    for m in models:
        if not 0 <= m.kv_pages <= m.max_pages or m.min_pages > m.max_pages:
            raise ArbiterError(f"{m.name!r}: kv={m.kv_pages} outside "
                               f"[0, {m.max_pages}] (min {m.min_pages})")
        if not m.awake and m.kv_pages:
            raise ArbiterError(f"{m.name!r} is asleep but holds {m.kv_pages} KV pages")


def apply_limits(m: ModelEntry, min_bytes: int, max_bytes: int | None, page_size: int,
                 budget_pages: int) -> None:
    """Set ``m``'s floor and ceiling (ValueError on a bad pair or a ceiling below one page)."""
    if min_bytes < 0 or (max_bytes is not None and max_bytes < max(min_bytes, page_size)):
        raise ValueError(f"need 0 <= min_bytes <= max_bytes >= one KV page, got {min_bytes}, {max_bytes}")
    m.min_bytes, m.max_bytes = min_bytes, max_bytes
    # a ceiling rounds down, like the engine's page limit; a floor rounds up
    m.max_pages = budget_pages if max_bytes is None else max_bytes // page_size
    m.min_pages = min(-(-min_bytes // page_size), m.max_pages)


def decayed_rate(m: ModelEntry, now: float, tau_s: float) -> float:
    """``m``'s request-rate EWMA as of ``now``."""
    return m.rate * math.exp(-max(0.0, now - m.rate_t) / tau_s)
