"""Shared fixtures: every backend test runs on each usable backend (CUDA: GPU only)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from elasticserve.memory import MemoryBackend
from tests.memory.memory_helpers import BACKENDS, build_backend


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_backend(backend_name: str) -> Iterator[Callable[..., MemoryBackend]]:
    """Factory for backends of the parametrized kind, all closed after the test."""
    made: list[MemoryBackend] = []

    def make(page_size: int | None = None, **kw: Any) -> MemoryBackend:
        made.append(build_backend(backend_name, page_size, **kw))
        return made[-1]

    yield make
    for b in made:
        b.close()


@pytest.fixture
def backend(make_backend: Callable[..., MemoryBackend]) -> MemoryBackend:
    return make_backend()
