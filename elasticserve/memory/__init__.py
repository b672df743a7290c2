"""Elastic memory: reserved address space backed by pages mapped on demand.

``get_backend("auto")`` picks the CUDA VMM backend when a GPU is usable and the host
(memfd + mmap) backend otherwise; ``VirtualTensor`` is the fixed-address, growable
tensor the KV cache is built from.
"""

from elasticserve.memory.backend import (
    DEFAULT_PAGE_SIZE,
    BackendStats,
    BackendUnavailableError,
    MapCountLimitError,
    MemoryBackend,
    PageHandle,
    PagePlacement,
    PhysicalPage,
    VirtualRange,
    recv_page_handle,
    send_page_handle,
)
from elasticserve.memory.cuda import CudaBackend
from elasticserve.memory.cuda import is_available as cuda_available
from elasticserve.memory.factory import get_backend, register_backend
from elasticserve.memory.host import HostBackend
from elasticserve.memory.vtensor import VirtualTensor

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "BackendStats",
    "BackendUnavailableError",
    "CudaBackend",
    "HostBackend",
    "MapCountLimitError",
    "MemoryBackend",
    "PageHandle",
    "PagePlacement",
    "PhysicalPage",
    "VirtualRange",
    "VirtualTensor",
    "cuda_available",
    "get_backend",
    "recv_page_handle",
    "register_backend",
    "send_page_handle",
]
