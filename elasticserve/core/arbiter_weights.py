"""Weights charged to the budget: once per awake model, or once per *group* of replicas.

Replicas of one model (worker processes mapping one shared copy of the weights) register with
the same ``weights_key``: their weights are charged while any of them is awake, freed when the
last one sleeps. An entry with no key is its own group (one model, one copy). Torch-free,
lock-free: the arbiter calls these under its lock.
"""

from __future__ import annotations

from collections.abc import Iterable

from elasticserve.core.arbiter_reclaim import ModelEntry


def weights_delta(models: Iterable[ModelEntry], m: ModelEntry) -> int:
    """Weights pages that waking ``m`` would charge, or that sleeping it (or unregistering
    it) frees: none while another entry of its group is awake."""
    if m.weights_key is None:
        return m.weights_pages
    for o in models:
        if o is not m and o.awake and o.weights_key == m.weights_key:
            return 0
    return m.weights_pages


def charged_weights(models: Iterable[ModelEntry]) -> int:
    """Weights pages charged now: each awake group once."""
    seen: set[str] = set()
    total = 0
    for m in models:
        if not m.awake:
            continue
        if m.weights_key is not None:
            if m.weights_key in seen:
                continue
            seen.add(m.weights_key)
        total += m.weights_pages
    return total


def check_group(models: Iterable[ModelEntry], key: str | None, weights_bytes: int) -> None:
    """Replicas share one copy, so they must agree on its size (ValueError naming the field)."""
    if key is None:
        return
    for o in models:
        if o.weights_key == key and o.weights_bytes != weights_bytes:
            raise ValueError(f"weights_bytes {weights_bytes} differs from {o.weights_bytes} of "
                             f"{o.name!r}, which shares weights_key {key!r}")
