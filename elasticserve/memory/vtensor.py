"""VirtualTensor: a fixed-address tensor whose mapped prefix grows and shrinks by pages."""

from __future__ import annotations

import math

import torch

from elasticserve.memory.backend import MemoryBackend, PagePlacement, PhysicalPage


class VirtualTensor:
    """A ``[max_rows, *shape_tail]`` tensor over reserved address space.

    Only a prefix of whole pages is backed by memory. ``tensor.data_ptr()`` never changes,
    so kernels, CUDA graphs and views captured once stay valid while the prefix grows
    (``map_pages``) or shrinks (``unmap_pages``, which also returns the memory). Rows
    beyond ``rows_mapped`` are never read (zeros on the host, an illegal address on CUDA
    unless zero-filled) and never written (SIGSEGV on the host backend). A row may straddle a
    page boundary; it counts as mapped only when whole.

    Views of ``tensor`` must not be used after :meth:`close`.
    """

    def __init__(self, backend: MemoryBackend, max_bytes: int, dtype: torch.dtype,
                 shape_tail: tuple[int, ...] = ()) -> None:
        self.backend = backend
        self.dtype = dtype
        self.shape_tail = tuple(shape_tail)
        self.row_bytes = math.prod(self.shape_tail) * dtype.itemsize
        if self.row_bytes <= 0 or max_bytes < self.row_bytes:
            raise ValueError(f"max_bytes {max_bytes} must hold at least one row of "
                             f"{self.row_bytes} bytes")
        self.vrange = backend.reserve(max_bytes)
        self.page_size = backend.page_size
        self.max_pages = self.vrange.size // self.page_size
        self.max_rows = self.vrange.size // self.row_bytes
        flat = backend.as_tensor(self.vrange, dtype)
        elems = self.max_rows * math.prod(self.shape_tail)
        self._tensor: torch.Tensor | None = flat[:elems].view(self.max_rows, *self.shape_tail)
        self._pages: list[PhysicalPage] = []

    @property
    def tensor(self) -> torch.Tensor:
        """The full-size view; raises once closed so late users fail loudly."""
        if self._tensor is None:
            raise RuntimeError("VirtualTensor is closed")
        return self._tensor

    @property
    def mapped_pages(self) -> int:
        """Pages currently backing the prefix."""
        return len(self._pages)

    @property
    def mapped_bytes(self) -> int:
        """Bytes of the prefix backed by memory."""
        return len(self._pages) * self.page_size

    @property
    def rows_mapped(self) -> int:
        """Rows lying entirely inside the mapped prefix."""
        return min(self.mapped_bytes // self.row_bytes, self.max_rows)

    def pages_for_rows(self, rows: int) -> int:
        """Pages the prefix needs so that ``rows`` rows are fully mapped."""
        if not 0 <= rows <= self.max_rows:
            raise ValueError(f"rows {rows} outside [0, {self.max_rows}]")
        return -(-rows * self.row_bytes // self.page_size)

    def map_pages(self, n: int) -> int:
        """Back ``n`` more pages (after the current prefix); returns ``mapped_pages``.

        On failure (out of memory, map-count limit) the pages mapped so far stay mapped
        and the exception propagates."""
        self.tensor  # noqa: B018 - raises if closed
        if n < 0 or len(self._pages) + n > self.max_pages:
            raise ValueError(f"cannot map {n} more pages: {len(self._pages)} of "
                             f"{self.max_pages} are mapped")
        for _ in range(n):
            offset = len(self._pages) * self.page_size
            page = self.backend.create_page(PagePlacement(self.vrange, offset))
            try:
                self.backend.map(self.vrange, offset, page)
            except BaseException:
                self.backend.release_page(page)
                raise
            self._pages.append(page)
        return len(self._pages)

    def unmap_pages(self, n: int) -> int:
        """Unmap and release the ``n`` highest pages; returns ``mapped_pages``.

        Synchronizes the device once for the whole batch, not once per page."""
        if n < 0 or n > len(self._pages):
            raise ValueError(f"cannot unmap {n} pages: only {len(self._pages)} are mapped")
        if n:
            self.backend.synchronize()
        for _ in range(n):
            offset = (len(self._pages) - 1) * self.page_size
            page = self.backend.unmap(self.vrange, offset, sync=False)
            self._pages.pop()
            self.backend.release_page(page)
        return len(self._pages)

    def resize_pages(self, pages: int) -> int:
        """Grow or shrink the mapped prefix to exactly ``pages`` pages."""
        if pages >= len(self._pages):
            return self.map_pages(pages - len(self._pages))
        return self.unmap_pages(len(self._pages) - pages)

    def ensure_rows(self, rows: int) -> int:
        """Grow (never shrink) so that at least ``rows`` rows are mapped."""
        need = self.pages_for_rows(rows)
        return self.map_pages(max(0, need - len(self._pages)))

    def close(self) -> None:
        """Release every page and the address space. Idempotent."""
        if self._tensor is None:
            return
        self.unmap_pages(len(self._pages))
        self._tensor = None
        self.backend.release_range(self.vrange)

    def __enter__(self) -> VirtualTensor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"VirtualTensor(rows {self.rows_mapped}/{self.max_rows} x {self.shape_tail}, "
                f"{self.dtype}, pages {self.mapped_pages}/{self.max_pages} of "
                f"{self.page_size} B on {self.backend.name})")
