"""The host swap pool's block accounting: reference counts and a free list of host block ids.

Kept apart from the device `BlockPool` because host blocks have no prefix cache and no
elastic capacity; the KV cache manager moves sequences between the two.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from elasticserve.core.errors import IntegrityError, NoFreeBlocksError


class HostBlocks:
    """Host block ids with reference counts (blocks shared by forked sequences count once)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_swap_blocks must be >= 0, got {num_blocks}")
        self._ref = [0] * num_blocks
        # Reversed so pop() hands out low host ids first (easier to read in logs).
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, device_blocks: list[int]) -> dict[int, int]:
        """One host block per distinct device block (refs start at 0); all or nothing."""
        if len(device_blocks) > len(self._free):
            raise NoFreeBlocksError(
                f"need {len(device_blocks)} swap blocks, {len(self._free)} free")
        return {block: self._free.pop() for block in device_blocks}

    def incref(self, host_blocks: Iterable[int]) -> None:
        for host in host_blocks:
            self._ref[host] += 1

    def decref(self, host_blocks: Iterable[int]) -> None:
        for host in host_blocks:
            self._ref[host] -= 1
            if self._ref[host] == 0:
                self._free.append(host)

    def check_integrity(self, refs: Counter[int]) -> None:
        """Raise IntegrityError unless each host block's count equals ``refs`` (from the
        swapped sequences' tables) and the free list holds exactly the unreferenced ones."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise IntegrityError("host free list holds duplicates")
        for h, ref in enumerate(self._ref):
            if ref != refs[h] or (h in free) != (ref == 0):
                raise IntegrityError(f"host block {h}: ref {ref}, {refs[h]} refs, free={h in free}")
