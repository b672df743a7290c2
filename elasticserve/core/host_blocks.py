"""The host pool's block accounting: reference counts and free host block ids.

Kept apart from the device `BlockPool`: the host tier's prefix cache (core/host_prefix.py)
holds its blocks by a reference here, like a swapped table does; the KV cache manager moves
sequences between the two. The host pool is either the fixed swap area or the
elastic host KV tier (engine/host_tier.py). For the tier, free ids are handed out lowest first
(a heap), so live host blocks gather at the bottom and the tier can unmap the pages above its
`high_water`; `on_take` lets it map pages before the copies into new ids are applied.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable

from elasticserve.core.errors import IntegrityError, NoFreeBlocksError


class HostBlocks:
    """Host block ids with reference counts (blocks shared by forked sequences count once)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_swap_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref = [0] * num_blocks
        self._free = list(range(num_blocks))  # a min-heap: lowest id first
        # called with (highest id taken + 1) after every take: the tier maps that many rows
        self.on_take: Callable[[int], None] | None = None

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, host: int) -> int:
        """References to host block ``host`` (swapped tables, the host prefix cache, pins)."""
        return self._ref[host]

    def high_water(self, below: int | None = None) -> int:
        """One past the highest host id in use (0 when none is): rows that must stay mapped.
        `below`: no id at or above it is in use (the tier's mapped rows), so the scan, which
        lowest-first allocation keeps short, starts there."""
        top = self.num_blocks if below is None else min(below, self.num_blocks)
        for h in range(top - 1, -1, -1):
            if self._ref[h]:
                return h + 1
        return 0

    def take(self, device_blocks: list[int]) -> dict[int, int]:
        """One host block per distinct device block (refs start at 0); all or nothing."""
        if len(device_blocks) > len(self._free):
            raise NoFreeBlocksError(
                f"need {len(device_blocks)} swap blocks, {len(self._free)} free")
        taken = [heapq.heappop(self._free) for _ in device_blocks]
        if taken and self.on_take is not None:
            try:
                self.on_take(max(taken) + 1)
            except BaseException:
                for h in taken:
                    heapq.heappush(self._free, h)
                raise
        return dict(zip(device_blocks, taken, strict=True))

    def incref(self, host_blocks: Iterable[int]) -> None:
        for host in host_blocks:
            self._ref[host] += 1

    def decref(self, host_blocks: Iterable[int]) -> None:
        for host in host_blocks:
            self._ref[host] -= 1
            if self._ref[host] == 0:
                heapq.heappush(self._free, host)

    def check_integrity(self, refs: Counter[int]) -> None:
        """Raise IntegrityError unless each host block's count equals ``refs`` (from the
        swapped sequences' tables) and the free list holds exactly the unreferenced ones."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise IntegrityError("host free list holds duplicates")
        for h, ref in enumerate(self._ref):
            if ref != refs[h] or (h in free) != (ref == 0):
                raise IntegrityError(f"host block {h}: ref {ref}, {refs[h]} refs, free={h in free}")
