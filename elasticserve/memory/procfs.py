"""Shared-memory usage of a process, read from /proc (Linux)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ShmemUsage:
    """Bytes of shared memory (memfd, tmpfs, SysV) a process maps and has resident.

    `rss_shmem` counts every resident shared page in full; `pss_shmem` divides each page by
    the number of processes mapping it, so summing it over processes counts a page once."""

    rss_shmem: int
    pss_shmem: int


def _kib_field(path: str, field: str) -> int:
    with open(path, encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel writes "NNN kB"
    raise ValueError(f"{path}: no {field} line")


def shmem_usage(pid: int) -> ShmemUsage:
    """`RssShmem` (/proc/PID/status) and `Pss_Shmem` (/proc/PID/smaps_rollup), in bytes."""
    if pid <= 0:
        raise ValueError(f"pid must be positive, got {pid}")
    return ShmemUsage(rss_shmem=_kib_field(f"/proc/{pid}/status", "RssShmem"),
                      pss_shmem=_kib_field(f"/proc/{pid}/smaps_rollup", "Pss_Shmem"))
