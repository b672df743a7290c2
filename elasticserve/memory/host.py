"""CPU memory backend: reserved address space backed on demand by memfd pages.

* Reservation = a read-only, private, anonymous, MAP_NORESERVE mapping. Reads of it hit
  the kernel's shared zero page (no fault, no RSS); writes SIGSEGV, which turns a stray
  write into unmapped KV space into a crash instead of silent corruption. This IS the
  "read-only shared zero page" of the design: the kernel supplies it for free.
* Physical pages are slots of memfd "page files". Mapping = mmap(MAP_SHARED|MAP_FIXED)
  of a slot over the reservation; unmapping = mmap(MAP_FIXED) of the read-only zero
  mapping back over it; releasing = fallocate(PUNCH_HOLE), so RssShmem and the file's
  blocks really fall (munmap alone leaves the memory in the page cache of the memfd).
* Page files (memory/page_file.py): one shared file per backend (free list, lowest slot
  first) keeps the fd count at one; a page created with a ``PagePlacement`` goes to a
  per-range file at slot == range offset, so a range's mapped pages always sit at contiguous
  file offsets and the kernel merges them into ONE mapping however allocations interleave.
  An adopted file (a worker's KV group file) takes the slots its owner queues
  (``queue_slots``); ``remap`` swaps the slot behind a mapped page in place.
* Every non-merged mapping is a VMA and a process may own only ``vm.max_map_count`` of
  them; the backend models merges exactly (see ``_entries_delta``) and refuses to map
  past the limit with :class:`MapCountLimitError` instead of failing at random later.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Sequence
from dataclasses import replace

import torch

from elasticserve.memory.backend import (
    DEFAULT_PAGE_SIZE,
    BackendStats,
    MappingTable,
    PageHandle,
    PagePlacement,
    PhysicalPage,
    VirtualRange,
    round_up,
)
from elasticserve.memory.linux import (
    _ZERO_FLAGS,
    MAP_FIXED,
    MAP_SHARED,
    PROT_READ,
    PROT_WRITE,
    MapCountGuard,
    map_zero,
    sys_mmap,
    sys_munmap,
)
from elasticserve.memory.page_file import PageFile


class HostBackend:
    """:class:`MemoryBackend` over CPU memory (see module docstring for the design)."""

    name = "host"
    device = "cpu"

    def __init__(self, page_size: int = DEFAULT_PAGE_SIZE, *, max_map_count: int | None = None,
                 map_headroom: int | None = None) -> None:
        if page_size <= 0 or page_size % mmap.PAGESIZE:
            raise ValueError(f"page_size {page_size} must be a multiple of {mmap.PAGESIZE}")
        self.page_size = page_size
        self._lock = threading.RLock()
        self._table = MappingTable(page_size)
        self._shared = PageFile("elasticserve-pages", page_size)
        self._files: dict[int, PageFile] = {self._shared.fd: self._shared}
        self._range_files: dict[int, PageFile] = {}  # range base -> its own page file
        self._entries: dict[int, int] = {}  # range base -> kernel mappings it occupies
        self._guard = MapCountGuard(max_map_count, map_headroom)
        self._adopted: PageFile | None = None  # a KV group file (adopt_range_file)
        self._adopted_base: int | None = None  # the range it backs
        self._closed = False

    # -- address space ---------------------------------------------------------------
    def reserve(self, nbytes: int) -> VirtualRange:
        """Reserve ``nbytes`` rounded up to pages, aligned to ``page_size``."""
        size = round_up(max(nbytes, 1), self.page_size)
        with self._lock:
            self._guard.check(1)
            # Over-reserve by a page and trim so that pages are page_size-aligned
            # (2 MiB alignment lets the kernel use huge page table entries).
            slack = self.page_size if self.page_size > mmap.PAGESIZE else 0
            raw = sys_mmap(None, size + slack, PROT_READ, _ZERO_FLAGS, -1, 0)
            base = round_up(raw, self.page_size) if slack else raw
            if base > raw:
                sys_munmap(raw, base - raw)
            if raw + slack > base:
                sys_munmap(base + size, raw + slack - base)
            vrange = VirtualRange(base, size)
            self._table.ranges[base] = (vrange, {})
            self._entries[base] = 1
            self._guard.commit(1)
            return vrange

    def release_range(self, vrange: VirtualRange) -> None:
        """Unmap everything and give the address space back; pages stay allocated."""
        with self._lock:
            pages = self._table.pages_of(vrange)
            for index in list(pages):
                self._table.pop_mapped(vrange, index)
            sys_munmap(vrange.base, vrange.size)
            del self._table.ranges[vrange.base]
            self._guard.commit(-self._entries.pop(vrange.base))
            own = self._range_files.pop(vrange.base, None)
            if own is not None:
                own.retired = True
                if own.close_if_done():
                    del self._files[own.fd]

    # -- physical pages --------------------------------------------------------------
    def create_page(self, placement: PagePlacement | None = None) -> PhysicalPage:
        """A new page; with ``placement`` it lands at the matching slot of the range's file."""
        with self._lock:
            file, offset = self._shared, None
            if placement is not None and placement.vrange.base in self._table.ranges:
                file = self._range_file(placement.vrange)
                offset = file.alloc(self._table.index_of(placement.vrange, placement.offset))
                if offset is None:  # slot busy (page still alive elsewhere): use shared file
                    file = self._shared
            if offset is None:
                offset = file.alloc()
            assert offset is not None
            page = PhysicalPage(self._table.next_page_id(), self.page_size, file.fd, offset)
            self._table.add_page(page)
            return page

    def _range_file(self, vrange: VirtualRange) -> PageFile:
        self._table.pages_of(vrange)  # validates the range
        file = self._range_files.get(vrange.base)
        if file is None and self._adopted is not None and self._adopted_base is None:
            file, self._adopted_base = self._adopted, vrange.base
            if vrange.size > file.capacity * self.page_size:
                raise ValueError(f"the adopted page file holds {file.capacity} pages, the range "
                                 f"{vrange.size // self.page_size}")
        if file is None:
            file = PageFile("elasticserve-range", self.page_size, vrange.size)
        self._range_files[vrange.base] = file
        self._files[file.fd] = file
        return file

    def release_page(self, page: PhysicalPage) -> None:
        """Punch the page out of its file (memory returns to the OS); imports just close."""
        with self._lock:
            self._table.drop_page(page)
            if page.imported:
                os.close(page.fd)  # the exporter owns the memory; only our fd goes
                return
            file = self._files[page.fd]
            file.release(page.offset)
            if file.close_if_done():
                del self._files[file.fd]

    def adopt_range_file(self, fd: int, size: int) -> None:
        """Back the next range that gets pages with slots of ``fd``, a memfd of at least
        ``size`` bytes owned by another process (a worker's KV group file on the front's page
        broker, procs/page_broker.py). The owner chooses the slots (`queue_slots`) and punches
        released ones: pages released here are only unmapped. The backend closes ``fd``."""
        with self._lock:
            if self._adopted is not None:
                raise ValueError("a page file was adopted already")
            self._adopted = PageFile("", self.page_size, size, fd=fd)
            self._files[fd] = self._adopted

    def queue_slots(self, slots: Sequence[int]) -> None:
        """The next pages created for the adopted range use these slots of its file, in
        order (a grant's slots); replaces slots queued before and not used."""
        with self._lock:
            if self._adopted is None:
                raise ValueError("queue_slots: no page file was adopted")
            self._adopted.queued = list(slots)

    def adopted_range(self) -> VirtualRange | None:
        """The range the adopted file backs (None until it got its first page)."""
        with self._lock:
            entry = self._table.ranges.get(self._adopted_base or -1)
            return None if entry is None else entry[0]

    def remap(self, vrange: VirtualRange, offset: int, slot: int) -> None:
        """Replace the page mapped at ``offset`` of the adopted range by slot ``slot`` of the
        adopted file, with one MAP_FIXED mmap (no moment where the offset reads zeros). The
        page keeps its id; its old slot is only dropped (the file's owner swapped it)."""
        with self._lock:
            index = self._table.index_of(vrange, offset)
            pages = self._table.pages_of(vrange)
            file, old = self._range_files.get(vrange.base), pages.get(index)
            if file is None or file is not self._adopted or old is None:
                raise ValueError(f"remap: offset {offset} of {vrange} is not a mapped page of "
                                 f"the adopted range")
            if old.offset == slot * self.page_size:
                return
            if self._table.map_refs[old.page_id] != 1:
                raise ValueError(f"remap: page {old.page_id} is mapped in several places")
            new = replace(old, offset=slot * self.page_size)
            delta = self._entries_delta(vrange, pages, index, new)
            self._guard.check(delta)
            file.claim(slot)
            try:
                sys_mmap(vrange.base + offset, self.page_size, PROT_READ | PROT_WRITE,
                         MAP_SHARED | MAP_FIXED, file.fd, new.offset)
            except OSError as exc:
                file.release(new.offset)
                raise self._guard.translate(exc) from exc
            pages[index] = self._table.live_pages[old.page_id] = new
            file.release(old.offset)
            self._entries[vrange.base] += delta
            self._guard.commit(delta)

    # -- mapping ---------------------------------------------------------------------
    def map(self, vrange: VirtualRange, offset: int, page: PhysicalPage) -> None:
        """mmap the page's slot over the reservation at ``offset`` (MAP_SHARED|MAP_FIXED)."""
        with self._lock:
            index = self._table.index_of(vrange, offset)
            pages = self._table.check_map(vrange, index, page)
            delta = self._entries_delta(vrange, pages, index, page)
            self._guard.check(delta)
            try:
                sys_mmap(vrange.base + offset, self.page_size, PROT_READ | PROT_WRITE,
                         MAP_SHARED | MAP_FIXED, page.fd, page.offset)
            except OSError as exc:
                raise self._guard.translate(exc) from exc
            self._table.record_map(pages, index, page)
            self._entries[vrange.base] += delta
            self._guard.commit(delta)

    def unmap(self, vrange: VirtualRange, offset: int, *, sync: bool = True) -> PhysicalPage:
        """Put the zero mapping back at ``offset``; the page keeps its contents."""
        with self._lock:
            index = self._table.index_of(vrange, offset)
            pages = self._table.pages_of(vrange)
            if index not in pages:
                raise ValueError(f"offset {offset} of {vrange} is not mapped")
            delta = self._entries_delta(vrange, pages, index, None)
            self._guard.check(delta, hard=True)  # may use the headroom: frees memory
            try:
                map_zero(vrange.base + offset, self.page_size)
            except OSError as exc:
                raise self._guard.translate(exc) from exc
            self._entries[vrange.base] += delta
            self._guard.commit(delta)
            return self._table.pop_mapped(vrange, index)

    def _entries_delta(self, vrange: VirtualRange, pages: dict[int, PhysicalPage],
                       index: int, new: PhysicalPage | None) -> int:
        """Change in kernel mappings if slot ``index`` held ``new`` (None = zero mapping).

        Neighbours merge when both are zero mapping, or both are slots of the same
        page file at consecutive file offsets (and the same process-local open file).
        """
        last = vrange.size // self.page_size - 1

        def joined(a: PhysicalPage | None, b: PhysicalPage | None) -> bool:
            if a is None or b is None:
                return a is None and b is None
            return (a.fd == b.fd and not (a.imported or b.imported)
                    and b.offset == a.offset + self.page_size)

        delta, old = 0, pages.get(index)
        for left, right in ((index - 1, index), (index, index + 1)):
            if left < 0 or right > last:
                continue
            lp, rp = pages.get(left), pages.get(right)
            before = joined(old if left == index else lp, old if right == index else rp)
            after = joined(new if left == index else lp, new if right == index else rp)
            delta += int(before) - int(after)
        return delta

    def synchronize(self) -> None:
        """Nothing to wait for: CPU writes are synchronous."""

    # -- sharing ---------------------------------------------------------------------
    def export_page(self, page: PhysicalPage) -> PageHandle:
        """(dup of the page-file fd, slot offset, size); the importer maps the same memory."""
        with self._lock:
            if page.page_id not in self._table.live_pages:
                raise KeyError(f"page {page.page_id} is not live in this backend")
            return PageHandle("host", os.dup(page.fd), page.offset, self.page_size)

    def import_page(self, handle: PageHandle) -> PhysicalPage:
        """Adopt a page from another process (fd received, or opened via /proc/<pid>/fd)."""
        if handle.kind != "host" or handle.size != self.page_size:
            raise ValueError(f"cannot import {handle} into a host backend of page size "
                             f"{self.page_size}")
        if handle.pid == os.getpid():
            fd = os.dup(handle.fd)
        else:
            fd = os.open(f"/proc/{handle.pid}/fd/{handle.fd}", os.O_RDWR | os.O_CLOEXEC)
        with self._lock:
            page = PhysicalPage(self._table.next_page_id(), self.page_size, fd,
                                handle.offset, imported=True)
            self._table.add_page(page, imported=True)
            return page

    # -- views and lifecycle ---------------------------------------------------------
    def as_tensor(self, vrange: VirtualRange, dtype: torch.dtype) -> torch.Tensor:
        """CPU tensor over the whole range; creating it touches no page."""
        with self._lock:
            self._table.pages_of(vrange)
        buf = (ctypes.c_uint8 * vrange.size).from_address(vrange.base)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype)

    def stats(self) -> BackendStats:
        """Counters; ``map_entries`` is this backend's modelled share of the VMA limit."""
        with self._lock:
            return self._table.stats(map_entries=sum(self._entries.values()))

    def map_entries(self, vrange: VirtualRange) -> int:
        """Kernel mappings (VMAs) the model says ``vrange`` occupies right now."""
        with self._lock:
            return self._entries[vrange.base]

    def close(self) -> None:
        """Release every range, then every page, then the page files. Idempotent."""
        with self._lock:
            if self._closed:
                return
            for vrange, _ in list(self._table.ranges.values()):
                self.release_range(vrange)
            for page in list(self._table.live_pages.values()):
                self.release_page(page)
            for file in self._files.values():
                os.close(file.fd)
            self._files.clear()
            self._closed = True

    def __enter__(self) -> HostBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
