"""Linux system calls the host backend is built from (ctypes; the stdlib lacks MAP_FIXED
and fallocate) and the guard that keeps a process under vm.max_map_count."""

from __future__ import annotations

import ctypes
import errno
import os
import threading

from elasticserve.memory.backend import MapCountLimitError

# Linux values (identical on x86-64 and arm64); the stdlib mmap module lacks some.
PROT_READ, PROT_WRITE = 0x1, 0x2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_NORESERVE = 0x1, 0x2, 0x10, 0x20, 0x4000
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x1, 0x2
_ZERO_FLAGS = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _errno_error(call: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}")


def sys_mmap(addr: int | None, length: int, prot: int, flags: int, fd: int, off: int) -> int:
    """Raw mmap(2); MAP_FIXED replaces whatever was at ``addr`` atomically."""
    ret = _libc.mmap(addr, length, prot, flags, fd, off)
    if ret is None or ret == _MAP_FAILED:
        raise _errno_error(f"mmap({length} bytes, flags={flags:#x})")
    return int(ret)


def sys_munmap(addr: int, length: int) -> None:
    """Raw munmap(2)."""
    if _libc.munmap(addr, length) != 0:
        raise _errno_error("munmap")


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the file's memory in ``[offset, offset+length)``; reads then see zeros."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        raise _errno_error("fallocate(PUNCH_HOLE)")


def map_zero(addr: int, length: int) -> None:
    """Put the read-only zero mapping back over ``[addr, addr+length)``."""
    sys_mmap(addr, length, PROT_READ, _ZERO_FLAGS | MAP_FIXED, -1, 0)


def count_process_maps() -> int:
    """Kernel mappings (VMAs) of this process: one line each in /proc/self/maps."""
    with open("/proc/self/maps", "rb") as f:
        return sum(1 for _ in f)


_guard_lock = threading.Lock()
_tracked = [0]  # mappings all host backends of this process account for (modelled)


class MapCountGuard:
    """Refuses mappings that would pass vm.max_map_count, naming the limit.

    Counting /proc/self/maps on every map would cost O(mappings); instead the host
    backends keep an exact model of their own mappings and the rest of the process
    ("others") is measured once and re-measured only when the total nears the limit.
    """

    def __init__(self, limit: int | None, headroom: int | None) -> None:
        if limit is None:
            with open("/proc/sys/vm/max_map_count") as f:
                limit = int(f.read())
        self.limit = limit
        # Spare entries for torch, malloc and libraries; unmaps may dip into them.
        self.headroom = max(64, limit // 20) if headroom is None else headroom
        self._others: int | None = None

    def check(self, delta: int, hard: bool = False) -> None:
        """Raise :class:`MapCountLimitError` unless ``delta`` more mappings fit."""
        if delta <= 0:
            return
        budget = self.limit - (0 if hard else self.headroom)
        with _guard_lock:
            if self._others is None or _tracked[0] + self._others + delta > budget:
                self._others = count_process_maps() - _tracked[0]
            need = _tracked[0] + self._others + delta
        if need > budget:
            raise MapCountLimitError(self._message(need))

    def commit(self, delta: int) -> None:
        """Account for mappings that now exist (negative: that went away)."""
        with _guard_lock:
            _tracked[0] += delta

    def translate(self, exc: OSError) -> OSError | MapCountLimitError:
        """mmap fails with ENOMEM when the kernel's own count hits the limit."""
        if exc.errno == errno.ENOMEM:
            return MapCountLimitError(self._message(count_process_maps() + 1))
        return exc

    def _message(self, need: int) -> str:
        return (f"mapping one more page would need {need} memory mappings but "
                f"vm.max_map_count is {self.limit} ({self.headroom} kept spare for the "
                "rest of the process): raise it (sysctl -w vm.max_map_count=N), use a "
                "larger page_size, or keep each range's mapped pages contiguous")
