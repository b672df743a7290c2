"""Helpers shared by the memory tests (imported by name: tests/ has no packages)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from elasticserve.memory import CudaBackend, HostBackend, MemoryBackend, VirtualRange
from elasticserve.memory.cuda import is_available

SMALL_PAGE = 64 * 1024  # host tests use small pages: same code paths, less memory

BACKENDS = [
    "host",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not is_available(), reason="no CUDA GPU with VMM support")]),
]


def build_backend(name: str, page_size: int | None = None, **kw: Any) -> MemoryBackend:
    """A fresh backend; host defaults to SMALL_PAGE, CUDA to its granularity."""
    if name == "host":
        return HostBackend(page_size or SMALL_PAGE, **kw)
    # these contract tests read unmapped offsets (the engine never does): keep the zero page
    return CudaBackend(page_size, **{"zero_fill_unmapped": True, **kw})



def host_bytes(backend: MemoryBackend, vrange: VirtualRange, offset: int = 0,
               length: int | None = None) -> torch.Tensor:
    """Copy of ``[offset, offset+length)`` of a range as a CPU uint8 tensor."""
    view = backend.as_tensor(vrange, torch.uint8)
    end = vrange.size if length is None else offset + length
    return view[offset:end].cpu().clone()


def resident_bytes(backend: MemoryBackend) -> int:
    """Memory the backend's pages occupy: RssShmem (host) or used GPU memory (CUDA)."""
    if backend.name == "cuda":
        free, total = torch.cuda.mem_get_info()
        return int(total - free)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssShmem in /proc/self/status")


def kernel_vmas(vrange: VirtualRange) -> int:
    """VMAs of this process overlapping the range, per /proc/self/maps."""
    n = 0
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split(maxsplit=1)[0].split("-"))
            n += lo < vrange.base + vrange.size and hi > vrange.base
    return n
