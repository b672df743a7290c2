"""Physical pages of the CUDA backend: a pool of pre-created pages, the read-only zero page.

The pool keeps page creation off the step path.
``cuMemCreate`` costs ~0.2 ms per 2 MiB page (kvcached, A100) against ~1.5 us for ``cuMemMap``:
a step that grows the KV cache by a few pages should only map. The pool is filled when the
backend starts and by ``fill()`` (to be called off the step path: the reclaimer thread, after
a step), and released pages go back into it up to its size instead of to the driver.
Driver-agnostic: it holds opaque handles and calls the two functions it is given.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class PagePool:
    """Up to ``size`` spare page handles; ``take`` never creates, ``give`` never releases
    beyond the pool's size."""

    def __init__(self, size: int, create: Callable[[], int], release: Callable[[int], None]) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"page_pool must be an integer >= 0, got {size!r}")
        self.size = size
        self._create, self._release = create, release
        self._spare: list[int] = []
        self._lock = threading.Lock()
        self.hits = 0  # pages handed out from the pool
        self.misses = 0  # pages the caller had to create on its own path (pool empty)

    def __len__(self) -> int:
        return len(self._spare)

    def take(self) -> int | None:
        """A spare handle, or None (counted as a miss) when the pool is empty."""
        with self._lock:
            if self._spare:
                self.hits += 1
                return self._spare.pop()
            self.misses += 1
            return None

    def give(self, handle: int) -> bool:
        """Keep ``handle`` for reuse if the pool has room; False: the caller releases it."""
        with self._lock:
            if len(self._spare) >= self.size:
                return False
            self._spare.append(handle)
            return True

    def fill(self) -> int:
        """Create pages until the pool is full; returns how many were created."""
        made = 0
        while True:
            with self._lock:
                if len(self._spare) >= self.size:
                    return made
            handle = self._create()  # outside the lock: ~0.2 ms each on a GPU
            made += 1
            if not self.give(handle):
                self._release(handle)  # someone else filled it meanwhile
                return made

    def close(self) -> None:
        """Release every spare handle."""
        with self._lock:
            spare, self._spare = self._spare, []
        for handle in spare:
            self._release(handle)


def make_zero_page(drv: Any, call: Callable[[str, Any], Any], size: int, handle: int,
                   rw: list[Any], read_only: list[Any]) -> int:
    """Zero the fresh page ``handle`` through a temporary read-write mapping, then check that
    the driver grants it read-only access. Returns ``handle``, or 0 after releasing it where
    the driver refuses read-only (logged; the caller then maps no zero page at all)."""
    va = int(call("cuMemAddressReserve", drv.cuMemAddressReserve(size, size, 0, 0)))
    call("cuMemMap", drv.cuMemMap(va, size, 0, handle, 0))
    call("cuMemSetAccess", drv.cuMemSetAccess(va, size, rw, 1))
    call("cuMemsetD8", drv.cuMemsetD8(va, 0, size))  # on the legacy default stream
    call("cuStreamSynchronize", drv.cuStreamSynchronize(0))
    call("cuMemUnmap", drv.cuMemUnmap(va, size))
    call("cuMemMap", drv.cuMemMap(va, size, 0, handle, 0))  # a fresh mapping, no access yet
    ok = drv.cuMemSetAccess(va, size, read_only, 1)[0] == drv.CUresult.CUDA_SUCCESS
    call("cuMemUnmap", drv.cuMemUnmap(va, size))
    call("cuMemAddressFree", drv.cuMemAddressFree(va, size))
    if ok:
        return handle
    call("cuMemRelease", drv.cuMemRelease(handle))
    log.warning("the CUDA driver refuses read-only access to the zero page: unmapped KV offsets "
                "stay unmapped (a shared writable zero page is never mapped)")
    return 0
