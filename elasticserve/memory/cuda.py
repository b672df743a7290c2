"""GPU memory backend on the CUDA driver's virtual memory management (VMM) API.

* ``reserve`` = one cuMemAddressReserve, nothing mapped: unmapped offsets are never read *by
  construction* (kernels read only blocks of block tables, and the block pool hands out only
  blocks inside mapped pages), so an 80 GiB reservation costs O(1) driver calls, not 40,960
  zero-page maps. ``zero_fill_unmapped=True`` (a debugging guard) maps a read-only zero page
  at every offset instead; if the driver refuses read-only access that is logged and nothing
  is mapped (a shared *writable* zero page could be corrupted by one stray write).
* ``create_page`` = a page from a small pool of pre-created ones (``page_pool``, filled at
  start and by ``fill_pool()`` off the step path), else cuMemCreate, with a POSIX-fd
  shareable handle type where the device supports it (pages can go to other processes).
* ``map`` = cuMemMap + cuMemSetAccess (a new mapping has no access until then), page by
  page: cuMemUnmap cannot split a mapping.
* ``unmap`` = cuStreamSynchronize on the backend's stream (``set_stream``: the stream its
  model's kernels run on; unless the caller already did, ``sync=False``) + cuMemUnmap. Not
  cuCtxSynchronize, which would stall every other model's streams. ``release_page`` = back to
  the pool, or cuMemRelease (exported and imported pages never enter the pool).

Importing this module never fails: without cuda-bindings or libcuda, ``is_available()``
is False and constructing :class:`CudaBackend` raises ``BackendUnavailableError``.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
from typing import TYPE_CHECKING, Any

from elasticserve.memory.backend import (
    DEFAULT_PAGE_SIZE,
    BackendStats,
    BackendUnavailableError,
    MappingTable,
    PageHandle,
    PagePlacement,
    PhysicalPage,
    VirtualRange,
    round_up,
)
from elasticserve.memory.cuda_pages import PagePool, make_zero_page

if TYPE_CHECKING:
    import torch

_drv: Any
try:
    _drv = importlib.import_module("cuda.bindings.driver")
except ImportError:  # cuda-bindings not installed: the backend is simply unavailable
    _drv = None

class CudaError(RuntimeError):
    """A CUDA driver call failed; the message names the call and the CUresult."""


def _call(what: str, result: Any) -> Any:
    """Unpack a cuda-bindings result tuple ``(CUresult, *values)`` or raise CudaError."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != _drv.CUresult.CUDA_SUCCESS:
        _, name = _drv.cuGetErrorName(err)
        raise CudaError(f"{what} failed: {name.decode() if name else int(err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@functools.cache
def is_available(device: int = 0) -> bool:
    """True if ``device`` exists and supports VMM; never raises (no GPU, no libcuda...)."""
    if _drv is None:
        return False
    try:
        _call("cuInit", _drv.cuInit(0))
        if _call("cuDeviceGetCount", _drv.cuDeviceGetCount()) <= device:
            return False
        dev = _call("cuDeviceGet", _drv.cuDeviceGet(device))
        attr = _drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
        return bool(_call("cuDeviceGetAttribute", _drv.cuDeviceGetAttribute(attr, dev)))
    except Exception:  # DynamicLibNotFoundError (no libcuda) is a RuntimeError, others vary
        return False


class _CudaArray:
    """Minimal ``__cuda_array_interface__`` (v3) exporter: bytes at a device pointer."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
            "strides": None, "version": 3,
        }


class CudaBackend:
    """:class:`MemoryBackend` over GPU memory via CUDA VMM (see module docstring)."""

    name = "cuda"

    def __init__(self, page_size: int | None = None, device: int = 0,
                 zero_fill_unmapped: bool = False, page_pool: int = 4, stream: int = 0) -> None:
        if not is_available(device):
            raise BackendUnavailableError(f"no CUDA device {device} with VMM support")
        self.device = f"cuda:{device}"
        self._dev = _call("cuDeviceGet", _drv.cuDeviceGet(device))
        # The primary context is the one torch uses, so tensors and mappings agree.
        self._ctx = _call("cuDevicePrimaryCtxRetain", _drv.cuDevicePrimaryCtxRetain(self._dev))
        self._bind()
        self._prop = self._allocation_prop(device)
        gran = _call("cuMemGetAllocationGranularity", _drv.cuMemGetAllocationGranularity(
            self._prop, _drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM))
        self.page_size = page_size or round_up(DEFAULT_PAGE_SIZE, gran)
        if self.page_size % gran:
            raise ValueError(f"page_size {self.page_size} is not a multiple of {gran}")
        flags = _drv.CUmemAccess_flags
        self._rw = self._access(device, flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
        self._zero_access = self._access(device, flags.CU_MEM_ACCESS_FLAGS_PROT_READ)
        self._lock = threading.RLock()
        self._table = MappingTable(self.page_size)
        self.stream = stream  # 0: the legacy default stream, torch's default
        self._zero = make_zero_page(_drv, _call, self.page_size, self._create_handle(), self._rw,
                                    self._zero_access) if zero_fill_unmapped else 0
        self._exported: set[int] = set()  # page ids whose fd left us: never pooled
        self.pool = PagePool(page_pool, self._create_handle,
                             lambda h: _call("cuMemRelease", _drv.cuMemRelease(h)))
        self._closed = False
        self.pool.fill()

    # -- setup helpers ---------------------------------------------------------------
    def _bind(self) -> None:
        """Make our context current: the binding is per thread and callers may vary."""
        _call("cuCtxSetCurrent", _drv.cuCtxSetCurrent(self._ctx))

    def _allocation_prop(self, device: int) -> Any:
        prop = _drv.CUmemAllocationProp()
        prop.type = _drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = _drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device
        attrs = _drv.CUdevice_attribute
        attr = attrs.CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED
        if _call("cuDeviceGetAttribute", _drv.cuDeviceGetAttribute(attr, self._dev)):
            prop.requestedHandleTypes = (
                _drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
        return prop

    @staticmethod
    def _access(device: int, flags: Any) -> list[Any]:
        desc = _drv.CUmemAccessDesc()
        desc.location.type = _drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        desc.location.id = device
        desc.flags = flags
        return [desc]

    def _create_handle(self) -> int:
        return int(_call("cuMemCreate", _drv.cuMemCreate(self.page_size, self._prop, 0)))

    def _map_zero(self, va: int) -> None:
        _call("cuMemMap(zero page)", _drv.cuMemMap(va, self.page_size, 0, self._zero, 0))
        _call("cuMemSetAccess(zero page)",
              _drv.cuMemSetAccess(va, self.page_size, self._zero_access, 1))

    # -- address space ---------------------------------------------------------------
    def reserve(self, nbytes: int) -> VirtualRange:
        """Reserve address space (and map the zero page at every offset if zero-filling)."""
        size = round_up(max(nbytes, 1), self.page_size)
        with self._lock:
            self._bind()
            va = int(_call("cuMemAddressReserve",
                           _drv.cuMemAddressReserve(size, self.page_size, 0, 0)))
            vrange = VirtualRange(va, size)
            self._table.ranges[va] = (vrange, {})
            try:
                for off in range(0, size if self._zero else 0, self.page_size):
                    self._map_zero(va + off)
            except CudaError:
                self.release_range(vrange)
                raise
            return vrange

    def release_range(self, vrange: VirtualRange) -> None:
        """Synchronize, unmap every page (real and zero), free the reservation."""
        with self._lock:
            self._bind()
            pages = self._table.pages_of(vrange)
            self.synchronize()
            # O(mapped pages) unless zero-filled: a reservation may span 40,960 offsets
            indices = range(vrange.size // self.page_size) if self._zero else sorted(pages)
            for index in indices:
                if index in pages:
                    self._table.pop_mapped(vrange, index)
                # Best effort: a failed reserve() may have zero-mapped only a prefix.
                _drv.cuMemUnmap(vrange.base + index * self.page_size, self.page_size)
            del self._table.ranges[vrange.base]
            _call("cuMemAddressFree", _drv.cuMemAddressFree(vrange.base, vrange.size))

    # -- physical pages --------------------------------------------------------------
    def create_page(self, placement: PagePlacement | None = None) -> PhysicalPage:
        """A pooled page, else cuMemCreate (placement is irrelevant on the GPU)."""
        with self._lock:
            self._bind()
            handle = self.pool.take()
            if handle is None:
                handle = self._create_handle()
            page = PhysicalPage(self._table.next_page_id(), self.page_size, handle=handle)
            self._table.add_page(page)
            return page

    def release_page(self, page: PhysicalPage) -> None:
        """Back to the pool if it has room, else cuMemRelease (the memory is freed once
        exported fds are closed too). Pages that were ever shared never enter the pool."""
        with self._lock:
            self._bind()
            self._table.drop_page(page)
            shared = page.imported or page.page_id in self._exported
            self._exported.discard(page.page_id)
            if shared or not self.pool.give(page.handle):
                _call("cuMemRelease", _drv.cuMemRelease(page.handle))

    def fill_pool(self) -> int:
        """Top the page pool up (cuMemCreate, ~0.2 ms a page): call it off the step path."""
        self._bind()
        return self.pool.fill()

    # -- mapping ---------------------------------------------------------------------
    def map(self, vrange: VirtualRange, offset: int, page: PhysicalPage) -> None:
        """Map ``page`` at ``offset`` (replacing the zero page if any), grant read-write access.

        No synchronisation: nothing mapped goes away (correct kernels never read the zero page:
        they only read rows below the mapped prefix)."""
        with self._lock:
            self._bind()
            index = self._table.index_of(vrange, offset)
            pages = self._table.check_map(vrange, index, page)
            va = vrange.base + offset
            if self._zero:
                _call("cuMemUnmap(zero page)", _drv.cuMemUnmap(va, self.page_size))
            try:
                _call("cuMemMap", _drv.cuMemMap(va, self.page_size, 0, page.handle, 0))
                _call("cuMemSetAccess", _drv.cuMemSetAccess(va, self.page_size, self._rw, 1))
            except CudaError:
                _drv.cuMemUnmap(va, self.page_size)  # no-op if cuMemMap itself failed
                if self._zero:
                    self._map_zero(va)
                raise
            self._table.record_map(pages, index, page)

    def unmap(self, vrange: VirtualRange, offset: int, *, sync: bool = True) -> PhysicalPage:
        """Synchronize (unless ``sync=False``), unmap, put the zero page back."""
        with self._lock:
            self._bind()
            index = self._table.index_of(vrange, offset)
            if index not in self._table.pages_of(vrange):
                raise ValueError(f"offset {offset} of {vrange} is not mapped")
            if sync:
                self.synchronize()
            va = vrange.base + offset
            _call("cuMemUnmap", _drv.cuMemUnmap(va, self.page_size))
            if self._zero:
                self._map_zero(va)
            return self._table.pop_mapped(vrange, index)

    def set_stream(self, stream: int) -> None:
        """The CUstream (``torch.cuda.Stream.cuda_stream``) whose kernels read this backend's
        pages: unmap waits for it alone, not for other models' streams."""
        self.stream = int(stream)

    def synchronize(self) -> None:
        """cuStreamSynchronize on the backend's stream (see ``set_stream``)."""
        self._bind()
        _call("cuStreamSynchronize", _drv.cuStreamSynchronize(self.stream))

    # -- sharing ---------------------------------------------------------------------
    def export_page(self, page: PhysicalPage) -> PageHandle:
        """A new POSIX fd for the allocation (send it with ``send_page_handle``)."""
        with self._lock:
            self._bind()
            if page.page_id not in self._table.live_pages:
                raise KeyError(f"page {page.page_id} is not live in this backend")
            kind = _drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
            fd = _call("cuMemExportToShareableHandle",
                       _drv.cuMemExportToShareableHandle(page.handle, kind, 0))
            self._exported.add(page.page_id)
            return PageHandle("cuda", int(fd), 0, self.page_size)

    def import_page(self, handle: PageHandle) -> PhysicalPage:
        """cuMemImportFromShareableHandle on an fd received in this process."""
        if handle.kind != "cuda" or handle.size != self.page_size:
            raise ValueError(f"cannot import {handle} into a CUDA backend of page size "
                             f"{self.page_size}")
        if handle.pid != os.getpid():
            raise ValueError("CUDA page fds must be received with recv_page_handle first")
        with self._lock:
            self._bind()
            kind = _drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
            native = _call("cuMemImportFromShareableHandle",
                           _drv.cuMemImportFromShareableHandle(handle.fd, kind))
            page = PhysicalPage(self._table.next_page_id(), self.page_size,
                                handle=int(native), imported=True)
            self._table.add_page(page, imported=True)
            return page

    # -- views and lifecycle ---------------------------------------------------------
    def as_tensor(self, vrange: VirtualRange, dtype: torch.dtype) -> torch.Tensor:
        """CUDA tensor over the whole range through ``__cuda_array_interface__``."""
        import torch

        with self._lock:
            self._table.pages_of(vrange)
        # Bytes first, then .view(dtype): the interface has no typestr for bfloat16.
        raw = torch.as_tensor(_CudaArray(vrange.base, vrange.size), device=self.device)
        return raw.view(dtype)

    def stats(self) -> BackendStats:
        """Counters (``map_entries`` is 0: the GPU has no per-process mapping limit)."""
        with self._lock:
            return self._table.stats()

    def close(self) -> None:
        """Release ranges, pages, the zero page and our primary-context reference."""
        with self._lock:
            if self._closed:
                return
            for vrange, _ in list(self._table.ranges.values()):
                self.release_range(vrange)
            for page in list(self._table.live_pages.values()):
                self.release_page(page)
            self.pool.close()
            if self._zero:
                _call("cuMemRelease", _drv.cuMemRelease(self._zero))
            _call("cuDevicePrimaryCtxRelease", _drv.cuDevicePrimaryCtxRelease(self._dev))
            self._closed = True

    def __enter__(self) -> CudaBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
