"""The host backend's page files: memfds whose page-sized slots are physical pages.

A file is either the backend's own (created here, sparse, grown with ftruncate, released slots
punched here) or *adopted*: another process's memfd (a worker's KV group file on the front's
page broker, procs/page_broker.py) whose owner sizes it, chooses its slots and punches them.
"""

from __future__ import annotations

import heapq
import os

from elasticserve.memory.linux import punch_hole


class PageFile:
    """A memfd whose page-sized slots are physical pages; sparse, grown on demand."""

    def __init__(self, name: str, page_size: int, size: int = 0, fd: int | None = None) -> None:
        # an adopted fd (another process's memfd of `size` bytes): its owner sizes it and
        # punches the slots released here
        self.adopted = fd is not None
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC) if fd is None else fd
        self.page_size = page_size
        self.capacity = size // page_size  # slots covered by the file size
        if size and not self.adopted:
            os.ftruncate(self.fd, size)
        self.free: list[int] = []  # heap of released slots below next_slot
        self.next_slot = 0
        # slot -> how many live pages use it: an adopted file's owner may briefly hand this
        # process a slot it still maps elsewhere (a page lent out and taken back before the
        # lender remapped it, procs/kv_groups.py), so a slot may be in use twice
        self.used: dict[int, int] = {}
        self.queued: list[int] = []  # adopted: the owner's slots for the next pages, in order
        self.retired = False  # set when its range is released; close once empty

    def alloc(self, slot: int | None = None) -> int | None:
        """Byte offset of a new page: ``slot`` exactly (None if taken) or the lowest free.
        An adopted file takes its owner's next queued slot instead (``slot`` is ignored)."""
        if self.adopted:
            if not self.queued:
                raise RuntimeError("a page was created for the adopted KV range with no slot "
                                   "queued: the owner (the page broker) grants slots, call "
                                   "queue_slots with a grant's slots before mapping its pages")
            slot = self.queued.pop(0)
            self.claim(slot)
            return slot * self.page_size
        if slot is None:
            slot = heapq.heappop(self.free) if self.free else self.next_slot
        elif slot in self.used:
            return None
        self.next_slot = max(self.next_slot, slot + 1)
        if slot >= self.capacity:  # sparse growth: ftruncate allocates nothing
            self.capacity = max(slot + 1, 2 * self.capacity, 64)
            os.ftruncate(self.fd, self.capacity * self.page_size)
        self.used[slot] = 1
        return slot * self.page_size

    def claim(self, slot: int) -> None:
        """Count one more page at ``slot`` of an adopted file, which must lie inside it (its
        owner grows it; a slot past its end would SIGBUS on first touch)."""
        if slot >= self.capacity:
            self.capacity = os.fstat(self.fd).st_size // self.page_size
        if not 0 <= slot < self.capacity:
            raise ValueError(f"slot {slot} is beyond the {self.capacity} of the adopted file")
        self.used[slot] = self.used.get(slot, 0) + 1

    def release(self, offset: int) -> None:
        slot = offset // self.page_size
        if self.used[slot] > 1:
            self.used[slot] -= 1
            return
        del self.used[slot]
        if self.adopted:
            return
        punch_hole(self.fd, offset, self.page_size)
        if not self.retired:
            heapq.heappush(self.free, slot)

    def close_if_done(self) -> bool:
        if self.retired and not self.used:
            os.close(self.fd)
            return True
        return False
