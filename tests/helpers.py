"""Loops that drive an engine, bounded: a stuck engine fails its test with its state named,
instead of spinning until the per-test timeout (or forever without one)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

# the longest engine run in the suite takes a few hundred steps; a stuck one takes them all
MAX_STEPS = 2000


def engine_state(engine: Any) -> str:
    """What a stuck engine is holding: queues, blocks, preemptions, KV pages."""
    stats = engine.stats()
    memory = engine.kv.memory_stats()
    pages = {k: memory[k] for k in ("kv_mapped_bytes", "kv_used_bytes", "pages_mapped")
             if k in memory}
    return f"{stats} {pages}"


def bounded(max_steps: int, state: Callable[[], str]) -> Iterator[int]:
    """`for step in bounded(n, describe): ...; break` -- raises AssertionError naming
    `describe()` if the loop asks for step n+1 instead of breaking out."""
    yield from range(max_steps)
    raise AssertionError(f"no end after {max_steps} steps: {state()}")


def run_until_done(engine: Any, max_steps: int = MAX_STEPS,
                   each_step: Callable[[], None] | None = None) -> dict[str, Any]:
    """Step `engine` until it has no unfinished request; returns the last RequestOutput of
    every request that produced one. `each_step` runs after every step (integrity checks)."""
    done: dict[str, Any] = {}
    for _ in bounded(max_steps, lambda: engine_state(engine)):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            done[out.request_id] = out
        if each_step is not None:
            each_step()
    return done


def tokens_of(done: dict[str, Any], request_ids: list[str]) -> list[list[int]]:
    """The first completion's token ids of each request, in `request_ids` order."""
    return [done[rid].outputs[0].token_ids for rid in request_ids]
