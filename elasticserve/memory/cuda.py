"""GPU memory backend on the CUDA driver's virtual memory management (VMM) API.

* ``reserve`` = cuMemAddressReserve; every page offset of the range gets the backend's
  *zero page* mapped (one physical page, zero-filled once, mapped read-only, or
  read-write where the driver refuses read-only, and never written by us), so reads of
  unmapped KV rows see zeros instead of an illegal-address fault that kills the context.
* ``create_page`` = cuMemCreate with a POSIX-fd shareable handle type (when the device
  supports it) so pages can be exported to other processes.
* ``map`` = cuMemUnmap(zero page) + cuMemMap + cuMemSetAccess: a new mapping has no
  access until cuMemSetAccess, and cuMemUnmap cannot split a mapping, so everything is
  mapped page by page.
* ``unmap`` = cuCtxSynchronize (unless the caller already did, ``sync=False``) +
  cuMemUnmap + zero page back; ``release_page`` = cuMemRelease: the memory returns to
  the driver once no mapping and no exported fd refer to it.

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
                 zero_fill_unmapped: bool = True) -> None:
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
        self._zero_fill = zero_fill_unmapped
        self._zero = self._make_zero_page() if zero_fill_unmapped else 0
        self._closed = False

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

    def _make_zero_page(self) -> int:
        """Allocate one page and zero it through a temporary read-write mapping."""
        ps = self.page_size
        handle = _call("cuMemCreate", _drv.cuMemCreate(ps, self._prop, 0))
        va = int(_call("cuMemAddressReserve", _drv.cuMemAddressReserve(ps, ps, 0, 0)))
        _call("cuMemMap", _drv.cuMemMap(va, ps, 0, handle, 0))
        _call("cuMemSetAccess", _drv.cuMemSetAccess(va, ps, self._rw, 1))
        _call("cuMemsetD8", _drv.cuMemsetD8(va, 0, ps))
        _call("cuCtxSynchronize", _drv.cuCtxSynchronize())
        _call("cuMemUnmap", _drv.cuMemUnmap(va, ps))
        _call("cuMemAddressFree", _drv.cuMemAddressFree(va, ps))
        return int(handle)

    def _map_zero(self, va: int) -> None:
        ps = self.page_size
        _call("cuMemMap", _drv.cuMemMap(va, ps, 0, self._zero, 0))
        result = _drv.cuMemSetAccess(va, ps, self._zero_access, 1)
        if result[0] != _drv.CUresult.CUDA_SUCCESS and self._zero_access is not self._rw:
            self._zero_access = self._rw  # driver refuses read-only: RW, never written
            result = _drv.cuMemSetAccess(va, ps, self._rw, 1)
        _call("cuMemSetAccess(zero page)", result)

    # -- address space ---------------------------------------------------------------
    def reserve(self, nbytes: int) -> VirtualRange:
        """Reserve address space and map the zero page at every page offset."""
        size = round_up(max(nbytes, 1), self.page_size)
        with self._lock:
            self._bind()
            va = int(_call("cuMemAddressReserve",
                           _drv.cuMemAddressReserve(size, self.page_size, 0, 0)))
            vrange = VirtualRange(va, size)
            self._table.ranges[va] = (vrange, {})
            try:
                for off in range(0, size if self._zero_fill else 0, self.page_size):
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
            for off in range(0, vrange.size, self.page_size):
                index = off // self.page_size
                if index in pages:
                    self._table.pop_mapped(vrange, index)
                elif not self._zero_fill:
                    continue
                # Best effort: a failed reserve() may have zero-mapped only a prefix.
                _drv.cuMemUnmap(vrange.base + off, self.page_size)
            del self._table.ranges[vrange.base]
            _call("cuMemAddressFree", _drv.cuMemAddressFree(vrange.base, vrange.size))

    # -- physical pages --------------------------------------------------------------
    def create_page(self, placement: PagePlacement | None = None) -> PhysicalPage:
        """cuMemCreate one page (placement is irrelevant on the GPU)."""
        with self._lock:
            self._bind()
            handle = _call("cuMemCreate", _drv.cuMemCreate(self.page_size, self._prop, 0))
            page = PhysicalPage(self._table.next_page_id(), self.page_size, handle=int(handle))
            self._table.add_page(page)
            return page

    def release_page(self, page: PhysicalPage) -> None:
        """cuMemRelease; memory is freed once exported fds are closed too."""
        with self._lock:
            self._bind()
            self._table.drop_page(page)
            _call("cuMemRelease", _drv.cuMemRelease(page.handle))

    # -- mapping ---------------------------------------------------------------------
    def map(self, vrange: VirtualRange, offset: int, page: PhysicalPage) -> None:
        """Replace the zero page at ``offset`` by ``page`` and grant read-write access.

        No synchronisation: only the zero page goes away, which correct kernels never
        read (they only read rows below the mapped prefix)."""
        with self._lock:
            self._bind()
            index = self._table.index_of(vrange, offset)
            pages = self._table.check_map(vrange, index, page)
            va = vrange.base + offset
            if self._zero_fill:
                _call("cuMemUnmap(zero page)", _drv.cuMemUnmap(va, self.page_size))
            try:
                _call("cuMemMap", _drv.cuMemMap(va, self.page_size, 0, page.handle, 0))
                _call("cuMemSetAccess", _drv.cuMemSetAccess(va, self.page_size, self._rw, 1))
            except CudaError:
                _drv.cuMemUnmap(va, self.page_size)  # no-op if cuMemMap itself failed
                if self._zero_fill:
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
            if self._zero_fill:
                self._map_zero(va)
            return self._table.pop_mapped(vrange, index)

    def synchronize(self) -> None:
        """cuCtxSynchronize: every stream of the (primary, torch-shared) context."""
        self._bind()
        _call("cuCtxSynchronize", _drv.cuCtxSynchronize())

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
            if self._zero:
                _call("cuMemRelease", _drv.cuMemRelease(self._zero))
            _call("cuDevicePrimaryCtxRelease", _drv.cuDevicePrimaryCtxRelease(self._dev))
            self._closed = True

    def __enter__(self) -> CudaBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
