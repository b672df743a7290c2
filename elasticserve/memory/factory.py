"""Backends by name: ``get_backend("host" | "cuda" | "auto")`` and a registry for more."""

from __future__ import annotations

from collections.abc import Callable

from elasticserve.memory.backend import DEFAULT_PAGE_SIZE, BackendUnavailableError, MemoryBackend
from elasticserve.memory.cuda import CudaBackend, is_available
from elasticserve.memory.host import HostBackend


def _make_host(page_size: int | None) -> MemoryBackend:
    return HostBackend(page_size=page_size or DEFAULT_PAGE_SIZE)


def _make_cuda(page_size: int | None) -> MemoryBackend:
    if not is_available():
        raise BackendUnavailableError("CUDA VMM backend needs a GPU, libcuda and cuda-bindings")
    return CudaBackend(page_size=page_size)


_REGISTRY: dict[str, Callable[[int | None], MemoryBackend]] = {
    "host": _make_host,
    "cuda": _make_cuda,
}


def register_backend(name: str, factory: Callable[[int | None], MemoryBackend]) -> None:
    """Make ``get_backend(name)`` build backends with ``factory(page_size)``."""
    _REGISTRY[name] = factory


def get_backend(name: str = "auto", page_size: int | None = None) -> MemoryBackend:
    """A new backend by name: "host", "cuda", or "auto" (cuda if usable, else host)."""
    if name == "auto":
        name = "cuda" if is_available() else "host"
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown memory backend {name!r}; known: {sorted(_REGISTRY)}")
    return factory(page_size)
