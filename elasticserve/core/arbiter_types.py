"""The arbiter's public types: reclaim tiers, policy, snapshots and the Reclaimer protocol.
Torch-free."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class ArbiterError(RuntimeError):
    """Misuse (unknown model, bad counts) or a broken invariant."""


class ReclaimTier(enum.StrEnum):
    """How the arbiter takes pages back from a model, cheapest first (declaration order). The
    values are the keys of ``Arbiter.stats`` (pages taken per tier) in metrics and reports."""

    FREE = "free"  # mapped pages holding neither live nor cached blocks
    CACHED = "cached"  # pages holding only cached-prefix blocks
    PREEMPT = "preempt"  # swap out or recompute running requests
    SLEEP = "sleep"  # an idle model's weights and KV


@dataclass(slots=True)
class ArbiterPolicy:
    """Which reclaim tiers run. ``static``/``elastic``/``arbiter`` policies are subsets."""

    reclaim_free: bool = True
    reclaim_cached: bool = True
    preempt: bool = True
    sleep_idle: bool = True
    # equal-priority models above budget/awake-models may be preempted by one below it
    fair_share: bool = True
    popularity_tau_s: float = 60.0  # time constant of the request-rate EWMA
    # With fewer KV pages than busy models (a tiny budget), models with none take turns: with
    # fair_share, a model holding no KV page may preempt an equal-priority one that has held
    # its pages this long (the time slice), and pages freed for it are kept for it.
    min_hold_s: float = 0.5
    # a starved model's claim on freed pages lapses if it stops asking this long
    starved_claim_ttl_s: float = 1.0


@dataclass(frozen=True, slots=True)
class ModelState:
    """One model as :meth:`Arbiter.snapshot` saw it."""

    name: str
    awake: bool
    weights_bytes: int
    weights_pages: int
    kv_pages: int
    min_bytes: int
    max_bytes: int | None
    priority: int
    last_used: float
    popularity: float
    weights_key: str | None = None  # replicas with one key share one copy of the weights


@dataclass(frozen=True, slots=True)
class ArbiterSnapshot:
    page_size: int
    budget_pages: int
    used_pages: int
    free_pages: int
    models: dict[str, ModelState]
    # weights pages charged: each awake model once, or each awake weights_key group once
    weights_pages: int = 0


class Reclaimer(Protocol):
    """What the model side implements so the arbiter can take pages back.

    Each ``n``-taking method unmaps at most ``n`` KV pages and returns how many it unmapped.
    """

    def reclaimable(self) -> tuple[int, int]:
        """(pages unmappable without dropping anything, pages more if cached blocks go)."""
        ...

    def free_pages(self, n: int) -> int:
        """Unmap pages that hold neither live nor cached blocks (compacting first)."""
        ...

    def drop_cached(self, n: int) -> int:
        """Evict cached-prefix blocks, then unmap the pages they held."""
        ...

    def preempt(self, n: int) -> int:
        """Unmap free and cached pages, then preempt (swap or recompute) only as needed."""
        ...

    def sleep(self) -> int | None:
        """Release every KV page (the model is about to lose its weights); return them all,
        or None when the model cannot sleep right now (e.g. it is in the middle of a step)."""
        ...

    def is_idle(self) -> bool:
        """Whether the model has no request in flight (so sleeping it hurts nobody now)."""
        ...

    def is_starved(self) -> bool:
        """Whether requests are queued (waiting or swapped out) for want of memory. With
        ``fair_share`` a starved model keeps its share of free pages; a reclaimer that never
        queues returns False."""
        ...
