"""The memory-backend interface: reserve virtual address space, back it with pages on demand.

A backend hands out three kinds of objects:

* ``VirtualRange``: reserved address space. On the host, unmapped parts read as zeros and
  fault on *write* (which catches bugs). On CUDA they are not mapped at all, and reading them
  is an illegal address: kernels never read them by construction (only blocks inside mapped
  pages are handed out); ``CudaBackend(zero_fill_unmapped=True)`` maps a read-only zero page
  there instead, for debugging and for the backend contract tests.
* ``PhysicalPage``: ``page_size`` bytes of real memory, mapped at zero or more offsets.
* ``PageHandle``: a picklable description of a page (with an fd) for another process.

Backends are not tied to tensors; ``as_tensor`` gives a zero-copy view of a whole range
whose ``data_ptr()`` never changes while pages come and go underneath it.
"""

from __future__ import annotations

import itertools
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

DEFAULT_PAGE_SIZE = 2 << 20  # 2 MiB: CUDA VMM granularity and the x86-64 huge page size


class MapCountLimitError(MemoryError):
    """Mapping one more page would push the process past ``vm.max_map_count``."""


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (no GPU, no driver, no bindings)."""


@dataclass(frozen=True, slots=True)
class VirtualRange:
    """Reserved address space ``[base, base + size)``; ``size`` is a page multiple."""

    base: int
    size: int


@dataclass(frozen=True, slots=True)
class PhysicalPage:
    """One page of physical memory owned by a backend.

    ``fd``/``offset`` locate host pages in their page file; ``handle`` is the CUDA
    generic allocation handle. ``imported`` pages came from another process.
    """

    page_id: int
    size: int
    fd: int = -1
    offset: int = 0
    handle: int = 0
    imported: bool = False


@dataclass(frozen=True, slots=True)
class PageHandle:
    """Picklable description of an exported page.

    ``fd`` is only meaningful in process ``pid``: move it with :func:`send_page_handle`
    (SCM_RIGHTS), or, for host pages, let the importer open ``/proc/<pid>/fd/<fd>``.
    The handle owns ``fd``: call :meth:`close` once it has been sent or imported.
    """

    kind: str  # "host" or "cuda"
    fd: int
    offset: int
    size: int
    pid: int = field(default_factory=os.getpid)

    def close(self) -> None:
        """Close the fd if it belongs to this process (importing never takes it over)."""
        if self.pid == os.getpid() and self.fd >= 0:
            os.close(self.fd)


@dataclass(frozen=True, slots=True)
class PagePlacement:
    """Where a new page is going to be mapped; lets the host backend place it so that
    neighbouring pages merge into one kernel mapping. Purely a hint."""

    vrange: VirtualRange
    offset: int


@dataclass(frozen=True, slots=True)
class BackendStats:
    """Counters since the backend was created (``*_live`` are current values)."""

    pages_created: int
    pages_imported: int
    pages_released: int
    pages_live: int
    pages_mapped: int
    map_calls: int
    unmap_calls: int
    ranges_live: int
    bytes_reserved: int
    map_entries: int  # kernel VMAs this backend accounts for (host only; 0 on CUDA)


@runtime_checkable
class MemoryBackend(Protocol):
    """Elastic memory: reserve address space once, map and release pages on demand."""

    name: str
    page_size: int
    device: str  # torch device string of the tensors from as_tensor

    def reserve(self, nbytes: int) -> VirtualRange:
        """Reserve ``nbytes`` (rounded up to ``page_size``); nothing is mapped yet."""
        ...

    def release_range(self, vrange: VirtualRange) -> None:
        """Give the address space back. Mapped pages are unmapped, not released."""
        ...

    def create_page(self, placement: PagePlacement | None = None) -> PhysicalPage:
        """Allocate one page of physical memory (contents unspecified)."""
        ...

    def release_page(self, page: PhysicalPage) -> None:
        """Return the page's memory to the OS/driver. It must not be mapped anywhere."""
        ...

    def map(self, vrange: VirtualRange, offset: int, page: PhysicalPage) -> None:
        """Map ``page`` at ``offset`` (a page multiple) of ``vrange``; offset must be free."""
        ...

    def unmap(self, vrange: VirtualRange, offset: int, *, sync: bool = True) -> PhysicalPage:
        """Unmap the page at ``offset`` (then as unmapped space, see above) and return it.

        ``sync=False`` skips device synchronisation: the caller already called
        :meth:`synchronize` after the last use of this memory (batch unmaps)."""
        ...

    def synchronize(self) -> None:
        """Wait until no device work can still touch memory about to be unmapped."""
        ...

    def export_page(self, page: PhysicalPage) -> PageHandle:
        """Describe ``page`` for another process (the handle holds a new fd)."""
        ...

    def import_page(self, handle: PageHandle) -> PhysicalPage:
        """Turn another process's handle into a page of this backend (shared memory)."""
        ...

    def as_tensor(self, vrange: VirtualRange, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D tensor over the whole range, no copy; valid until release_range."""
        ...

    def stats(self) -> BackendStats:
        """Current counters."""
        ...

    def close(self) -> None:
        """Release every range and page this backend still owns."""
        ...


class MappingTable:
    """Bookkeeping shared by backends: which page sits at which offset, plus counters.

    Offsets are stored as page indices. Not thread-safe; backends hold their own lock.
    """

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.ranges: dict[int, tuple[VirtualRange, dict[int, PhysicalPage]]] = {}
        self.live_pages: dict[int, PhysicalPage] = {}
        self.map_refs: dict[int, int] = {}  # page_id -> number of places it is mapped
        self._ids = itertools.count(1)
        self.counts = dict.fromkeys(
            ("created", "imported", "released", "map", "unmap"), 0
        )

    def next_page_id(self) -> int:
        return next(self._ids)

    def pages_of(self, vrange: VirtualRange) -> dict[int, PhysicalPage]:
        """The index -> page dict of a live range (KeyError names the range)."""
        entry = self.ranges.get(vrange.base)
        if entry is None or entry[0] != vrange:
            raise KeyError(f"{vrange} is not a live range of this backend")
        return entry[1]

    def index_of(self, vrange: VirtualRange, offset: int) -> int:
        """Validate ``offset`` against the range and page size; return its page index."""
        if offset % self.page_size or not 0 <= offset < vrange.size:
            raise ValueError(
                f"offset {offset} is not a page-aligned offset inside {vrange} "
                f"(page size {self.page_size})"
            )
        return offset // self.page_size

    def add_page(self, page: PhysicalPage, imported: bool = False) -> None:
        self.live_pages[page.page_id] = page
        self.counts["imported" if imported else "created"] += 1

    def drop_page(self, page: PhysicalPage) -> None:
        """Forget a page being released; refuses pages still mapped or unknown."""
        if self.map_refs.get(page.page_id, 0):
            raise ValueError(f"page {page.page_id} is still mapped; unmap it first")
        if self.live_pages.pop(page.page_id, None) is None:
            raise KeyError(f"page {page.page_id} is not live in this backend")
        self.counts["released"] += 1

    def check_map(self, vrange: VirtualRange, index: int,
                  page: PhysicalPage) -> dict[int, PhysicalPage]:
        """Raise unless ``page`` may be mapped at ``index``; return the range's pages."""
        pages = self.pages_of(vrange)
        if page.page_id not in self.live_pages:
            raise KeyError(f"page {page.page_id} is not live in this backend")
        if index in pages:
            raise ValueError(f"offset {index * self.page_size} of {vrange} is already mapped")
        return pages

    def record_map(self, pages: dict[int, PhysicalPage], index: int,
                   page: PhysicalPage) -> None:
        """Note a mapping that ``check_map`` allowed and the backend then made."""
        pages[index] = page
        self.map_refs[page.page_id] = self.map_refs.get(page.page_id, 0) + 1
        self.counts["map"] += 1

    def pop_mapped(self, vrange: VirtualRange, index: int) -> PhysicalPage:
        pages = self.pages_of(vrange)
        page = pages.pop(index, None)
        if page is None:
            raise ValueError(f"offset {index * self.page_size} of {vrange} is not mapped")
        self.map_refs[page.page_id] -= 1
        self.counts["unmap"] += 1
        return page

    def stats(self, map_entries: int = 0) -> BackendStats:
        c = self.counts
        return BackendStats(
            pages_created=c["created"],
            pages_imported=c["imported"],
            pages_released=c["released"],
            pages_live=len(self.live_pages),
            pages_mapped=sum(len(p) for _, p in self.ranges.values()),
            map_calls=c["map"],
            unmap_calls=c["unmap"],
            ranges_live=len(self.ranges),
            bytes_reserved=sum(r.size for r, _ in self.ranges.values()),
            map_entries=map_entries,
        )


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


_HANDLE_MSG = 64  # fixed-size messages: back-to-back handles never run together


def send_page_handle(sock: socket.socket, handle: PageHandle) -> None:
    """Send ``handle`` (fd included, via SCM_RIGHTS) over a Unix socket."""
    meta = f"{handle.kind} {handle.offset} {handle.size}".encode().ljust(_HANDLE_MSG)
    socket.send_fds(sock, [meta], [handle.fd])


def recv_page_handle(sock: socket.socket) -> PageHandle:
    """Receive a handle sent by :func:`send_page_handle`; its fd belongs to this process."""
    data, fds, _flags, _addr = socket.recv_fds(sock, _HANDLE_MSG, 1)
    while data and len(data) < _HANDLE_MSG:  # a stream socket may split the message
        more = sock.recv(_HANDLE_MSG - len(data))
        if not more:
            break
        data += more
    if len(fds) != 1 or len(data) != _HANDLE_MSG:
        for fd in fds:
            os.close(fd)
        raise ConnectionError("expected one page handle message with exactly one fd")
    kind, offset, size = data.decode().split()
    return PageHandle(kind, fds[0], int(offset), int(size), os.getpid())
