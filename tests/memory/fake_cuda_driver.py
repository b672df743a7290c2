"""A strict in-memory stand-in for ``cuda.bindings.driver`` (VMM subset), for CPU CI.

It enforces the documented rules the CUDA backend must follow, returning error codes
as the real driver does: maps only inside reservations at granularity multiples, no
overlapping maps, cuMemUnmap only of a whole mapping, no access before cuMemSetAccess,
writes need PROT_READWRITE, cuMemAddressFree only when empty, and memory is freed only
when no mapping, handle or exported fd refers to it. ``launch(stream)`` models GPU work in
flight on a stream: unmapping while a stream that reads KV memory is busy is an error, until
cuStreamSynchronize on that stream (or cuCtxSynchronize, which waits for every stream).
``calls`` counts every driver call by name.
"""

from __future__ import annotations

import collections
import enum
import itertools
import os
from types import SimpleNamespace
from typing import Any

GRAN = 2 << 20


class Result(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_OUT_OF_MEMORY = 2
    CUDA_ERROR_ILLEGAL_STATE = 401


Ok = Result.CUDA_SUCCESS
Bad = Result.CUDA_ERROR_INVALID_VALUE
CUdevice_attribute = SimpleNamespace(
    CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED=102,
    CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED=103)
CUmemAllocationType = SimpleNamespace(CU_MEM_ALLOCATION_TYPE_PINNED=1)
CUmemLocationType = SimpleNamespace(CU_MEM_LOCATION_TYPE_DEVICE=1)
CUmemAllocationHandleType = SimpleNamespace(CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR=1)
CUmemAllocationGranularity_flags = SimpleNamespace(CU_MEM_ALLOC_GRANULARITY_MINIMUM=0)
CUmemAccess_flags = SimpleNamespace(CU_MEM_ACCESS_FLAGS_PROT_READ=1,
                                    CU_MEM_ACCESS_FLAGS_PROT_READWRITE=3)


def CUmemAllocationProp() -> Any:  # noqa: N802 - mirrors the binding's class name
    return SimpleNamespace(type=0, requestedHandleTypes=0, location=SimpleNamespace(type=0, id=0))


def CUmemAccessDesc() -> Any:  # noqa: N802
    return SimpleNamespace(flags=0, location=SimpleNamespace(type=0, id=0))


class FakeDriver:
    """Module-like object: attribute access mirrors ``cuda.bindings.driver``."""

    CUresult = Result
    CUdevice_attribute = CUdevice_attribute
    CUmemAllocationType = CUmemAllocationType
    CUmemLocationType = CUmemLocationType
    CUmemAllocationHandleType = CUmemAllocationHandleType
    CUmemAllocationGranularity_flags = CUmemAllocationGranularity_flags
    CUmemAccess_flags = CUmemAccess_flags
    CUmemAllocationProp = staticmethod(CUmemAllocationProp)
    CUmemAccessDesc = staticmethod(CUmemAccessDesc)

    def __init__(self, read_only_ok: bool = True) -> None:
        self.read_only_ok = read_only_ok
        self.allocs: dict[int, bytearray] = {}  # allocation id -> memory
        self.handles: dict[int, int] = {}  # live handle -> allocation id
        self.fds: dict[int, int] = {}  # exported fd -> allocation id
        self.ranges: dict[int, int] = {}  # reservation base -> size
        self.maps: dict[int, list[Any]] = {}  # va -> [allocation id, access flags]
        self.ids = itertools.count(1000)
        self.busy: dict[int, bool] = {}  # stream with work in flight -> whether it reads KV
        self.syncs = 0  # stream and context synchronizations
        self.calls: collections.Counter[str] = collections.Counter()

    def __getattribute__(self, name: str) -> Any:
        attr = object.__getattribute__(self, name)
        if name.startswith("cu") and callable(attr):
            object.__getattribute__(self, "calls")[name] += 1
        return attr

    @property
    def in_flight(self) -> bool:
        return any(self.busy.values())

    # -- contexts and devices ---------------------------------------------------------
    def cuGetErrorName(self, err: Result) -> tuple[Result, bytes]:  # noqa: N802
        return Ok, Result(err).name.encode()

    def cuInit(self, flags: int) -> tuple[Result]:  # noqa: N802
        return (Ok,)

    def cuDeviceGetCount(self) -> tuple[Result, int]:  # noqa: N802
        return Ok, 1

    def cuDeviceGet(self, ordinal: int) -> tuple[Result, int]:  # noqa: N802
        return (Ok, ordinal) if ordinal == 0 else (Bad, 0)

    def cuDeviceGetAttribute(self, attr: int, dev: int) -> tuple[Result, int]:  # noqa: N802
        return Ok, 1

    def cuDevicePrimaryCtxRetain(self, dev: int) -> tuple[Result, str]:  # noqa: N802
        return Ok, "ctx"

    def cuDevicePrimaryCtxRelease(self, dev: int) -> tuple[Result]:  # noqa: N802
        return (Ok,)

    def cuCtxSetCurrent(self, ctx: str) -> tuple[Result]:  # noqa: N802
        return (Ok,)

    def cuCtxSynchronize(self) -> tuple[Result]:  # noqa: N802
        self.busy.clear()
        self.syncs += 1
        return (Ok,)

    def cuStreamSynchronize(self, stream: int) -> tuple[Result]:  # noqa: N802
        self.busy.pop(stream, None)
        self.syncs += 1
        return (Ok,)

    def cuMemGetAllocationGranularity(self, prop: Any, flag: int) -> tuple[Result, int]:  # noqa: N802
        return Ok, GRAN

    # -- physical memory --------------------------------------------------------------
    def cuMemCreate(self, size: int, prop: Any, flags: int) -> tuple[Result, int]:  # noqa: N802
        if size % GRAN or prop.location.type != 1:
            return Bad, 0
        alloc, handle = next(self.ids), next(self.ids)
        self.allocs[alloc] = bytearray(b"\xee" * size)  # new memory is not zeroed
        self.handles[handle] = alloc
        return Ok, handle

    def cuMemRelease(self, handle: int) -> tuple[Result]:  # noqa: N802
        if self.handles.pop(handle, None) is None:
            return (Bad,)
        self._collect()
        return (Ok,)

    def cuMemExportToShareableHandle(self, handle: int, kind: int, flags: int) -> tuple[Result, int]:  # noqa: N802,E501
        if handle not in self.handles:
            return Bad, -1
        fd = os.open(os.devnull, os.O_RDONLY)
        self.fds[fd] = self.handles[handle]
        return Ok, fd

    def cuMemImportFromShareableHandle(self, fd: int, kind: int) -> tuple[Result, int]:  # noqa: N802
        if fd not in self.fds:
            return Bad, 0
        handle = next(self.ids)
        self.handles[handle] = self.fds[fd]
        return Ok, handle

    def close_fd(self, fd: int) -> None:
        """What closing an exported fd does to the driver's reference count."""
        self.fds.pop(fd, None)
        self._collect()

    def _collect(self) -> None:
        used = {*self.handles.values(), *self.fds.values(), *(m[0] for m in self.maps.values())}
        for alloc in set(self.allocs) - used:
            del self.allocs[alloc]

    # -- address space ------------------------------------------------------------------
    def cuMemAddressReserve(self, size: int, align: int, addr: int, flags: int) -> tuple[Result, int]:  # noqa: N802,E501
        base = 0x7F00_0000_0000 + sum(self.ranges.values()) + GRAN * len(self.ranges)
        self.ranges[base] = size
        return Ok, base

    def cuMemAddressFree(self, base: int, size: int) -> tuple[Result]:  # noqa: N802
        if self.ranges.get(base) != size or any(base <= va < base + size for va in self.maps):
            return (Bad,)
        del self.ranges[base]
        return (Ok,)

    def _reserved(self, va: int, size: int) -> bool:
        return any(b <= va and va + size <= b + s for b, s in self.ranges.items())

    def cuMemMap(self, va: int, size: int, offset: int, handle: int, flags: int) -> tuple[Result]:  # noqa: N802,E501
        if (va % GRAN or size != GRAN or offset or handle not in self.handles
                or not self._reserved(va, size) or va in self.maps):
            return (Bad,)
        self.maps[va] = [self.handles[handle], 0]  # no access until cuMemSetAccess
        return (Ok,)

    def cuMemUnmap(self, va: int, size: int) -> tuple[Result]:  # noqa: N802
        if va not in self.maps or size != GRAN:
            return (Bad,)
        if self.in_flight:
            return (Result.CUDA_ERROR_ILLEGAL_STATE,)
        del self.maps[va]
        self._collect()
        return (Ok,)

    def cuMemSetAccess(self, va: int, size: int, desc: list[Any], count: int) -> tuple[Result]:  # noqa: N802,E501
        flags = desc[0].flags
        if flags == 1 and not self.read_only_ok:
            return (Bad,)
        pages = range(va, va + size, GRAN)
        if count != 1 or any(p not in self.maps for p in pages):
            return (Bad,)
        for p in pages:
            self.maps[p][1] = flags
        return (Ok,)

    def cuMemsetD8(self, va: int, value: int, n: int) -> tuple[Result]:  # noqa: N802
        try:
            self.write(va, bytes([value]) * n)
        except PermissionError:
            return (Bad,)
        return (Ok,)

    # -- test-side device access ------------------------------------------------------
    def _page(self, va: int, need: int) -> bytearray:
        base = va - va % GRAN
        m = self.maps.get(base)
        if m is None or m[1] & need != need:
            raise PermissionError(f"illegal address {va:#x}")  # a real GPU kills the context
        return self.allocs[m[0]]

    def read(self, va: int, n: int) -> bytes:
        mem = self._page(va, 1)
        return bytes(mem[va % GRAN : va % GRAN + n])

    def write(self, va: int, data: bytes) -> None:
        for i in range(0, len(data), GRAN):
            chunk = data[i : i + GRAN]
            self._page(va + i, 3)[(va + i) % GRAN : (va + i) % GRAN + len(chunk)] = chunk

    def launch(self, stream: int = 0, reads_kv: bool = True) -> None:
        """Pretend a kernel is still running on ``stream`` (reading the KV memory or not)."""
        self.busy[stream] = self.busy.get(stream, False) or reads_kv
