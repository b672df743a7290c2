"""Hypothesis state machine: random map/unmap/write/release against a checksum model."""

from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from elasticserve.memory import HostBackend, PagePlacement, PhysicalPage
from tests.memory.memory_helpers import build_backend, is_available, kernel_vmas

SLOTS = 6
slot = st.integers(0, SLOTS - 1)


def digest(t: torch.Tensor) -> str:
    return hashlib.blake2b(t.cpu().numpy().tobytes(), digest_size=16).hexdigest()


class PageMachine(RuleBasedStateMachine):
    """Model: which page sits in each slot, and every live page's expected bytes."""

    backend_name = "host"

    @initialize()
    def setup(self) -> None:
        page_size = 16 * 1024 if self.backend_name == "host" else None
        self.b = build_backend(self.backend_name, page_size)
        self.ps = self.b.page_size
        self.vr = self.b.reserve(SLOTS * self.ps)
        self.view = self.b.as_tensor(self.vr, torch.uint8)
        self.slots: dict[int, PhysicalPage] = {}
        self.loose: list[PhysicalPage] = []  # alive but unmapped, contents kept
        self.expected: dict[int, torch.Tensor] = {}  # page_id -> bytes
        self.sums: dict[int, str] = {}  # page_id -> checksum of expected bytes

    def _page_at(self, i: int) -> torch.Tensor:
        return self.view[i * self.ps : (i + 1) * self.ps]

    def _set(self, page: PhysicalPage, data: torch.Tensor) -> None:
        self.expected[page.page_id] = data
        self.sums[page.page_id] = digest(data)

    @rule(i=slot, value=st.integers(0, 255), placed=st.booleans())
    def map_new(self, i: int, value: int, placed: bool) -> None:
        if i in self.slots:
            return
        hint = PagePlacement(self.vr, i * self.ps) if placed else None
        page = self.b.create_page(hint)
        self.b.map(self.vr, i * self.ps, page)
        self._page_at(i).fill_(value)
        self.slots[i] = page
        self._set(page, torch.full((self.ps,), value, dtype=torch.uint8))

    @precondition(lambda self: bool(self.loose))
    @rule(i=slot, pick=st.integers(0, 100))
    def map_loose(self, i: int, pick: int) -> None:
        if i in self.slots:
            return
        page = self.loose.pop(pick % len(self.loose))
        self.b.map(self.vr, i * self.ps, page)
        self.slots[i] = page

    @rule(i=slot, release=st.booleans())
    def unmap(self, i: int, release: bool) -> None:
        if i not in self.slots:
            return
        page = self.b.unmap(self.vr, i * self.ps)
        assert page == self.slots.pop(i)
        if release:
            self.b.release_page(page)
            del self.expected[page.page_id], self.sums[page.page_id]
        else:
            self.loose.append(page)

    @rule(i=slot, start=st.integers(0, 1 << 20), length=st.integers(1, 4096),
          value=st.integers(0, 255))
    def write(self, i: int, start: int, length: int, value: int) -> None:
        if i not in self.slots:
            return
        start %= self.ps
        end = min(start + length, self.ps)
        self._page_at(i)[start:end] = value
        data = self.expected[self.slots[i].page_id].clone()
        data[start:end] = value
        self._set(self.slots[i], data)

    @invariant()
    def contents_match(self) -> None:
        if not hasattr(self, "b"):
            return
        for i in range(SLOTS):
            if i in self.slots:
                assert digest(self._page_at(i)) == self.sums[self.slots[i].page_id], i
            else:
                assert int(self._page_at(i).count_nonzero()) == 0, i
        s = self.b.stats()
        assert s.pages_mapped == len(self.slots)
        assert s.pages_live == len(self.expected) == len(self.slots) + len(self.loose)
        if isinstance(self.b, HostBackend):
            assert self.b.map_entries(self.vr) == kernel_vmas(self.vr)

    def teardown(self) -> None:
        if hasattr(self, "b"):
            self.b.close()


PageMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestHostPages = PageMachine.TestCase


class CudaPageMachine(PageMachine):
    backend_name = "cuda"


CudaPageMachine.TestCase.settings = PageMachine.TestCase.settings

TestCudaPages = pytest.mark.gpu(pytest.mark.skipif(
    not is_available(), reason="no CUDA GPU with VMM support")(CudaPageMachine.TestCase))
