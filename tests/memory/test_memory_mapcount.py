"""Host backend vs vm.max_map_count: exact mapping model, coalescing, the guard."""

from __future__ import annotations

import errno
import gc
from collections.abc import Iterator

import pytest
import torch

from elasticserve.memory import HostBackend, MapCountLimitError, PagePlacement, VirtualTensor
from elasticserve.memory.linux import MapCountGuard, count_process_maps
from tests.memory.memory_helpers import kernel_vmas

PS = 16 * 1024


@pytest.fixture
def host() -> Iterator[HostBackend]:
    with HostBackend(PS) as b:
        yield b


def test_model_matches_kernel_mappings(host: HostBackend) -> None:
    vr = host.reserve(32 * PS)
    assert host.map_entries(vr) == kernel_vmas(vr) == 1

    def placed(i: int) -> None:
        host.map(vr, i * PS, host.create_page(PagePlacement(vr, i * PS)))
        assert host.map_entries(vr) == kernel_vmas(vr), f"after mapping page {i}"

    for i in range(8):  # a growing prefix stays ONE mapping (plus the reserved rest)
        placed(i)
    assert kernel_vmas(vr) == 2
    placed(20)  # an island splits the reservation: +2
    assert kernel_vmas(vr) == 4
    host.unmap(vr, 3 * PS)  # a hole splits the prefix: +2
    assert host.map_entries(vr) == kernel_vmas(vr) == 6
    host.map(vr, 3 * PS, host.create_page())  # shared-file slot: cannot merge
    assert host.map_entries(vr) == kernel_vmas(vr) == 6
    host.release_page(host.unmap(vr, 3 * PS))
    placed(21)
    host.unmap(vr, 20 * PS)
    assert host.map_entries(vr) == kernel_vmas(vr)
    # Reading zero space (kernel zero page) must not break merges either.
    assert float(host.as_tensor(vr, torch.float32).sum()) == 0.0
    assert host.map_entries(vr) == kernel_vmas(vr)


def test_interleaved_growth_still_coalesces(host: HostBackend) -> None:
    """Layers grow in lock-step; per-range page files keep each prefix one mapping."""
    tensors = [VirtualTensor(host, 64 * PS, torch.float16, (64,)) for _ in range(3)]
    for _ in range(16):
        for t in tensors:
            t.map_pages(1)
    for t in tensors:
        assert host.map_entries(t.vrange) == kernel_vmas(t.vrange) == 2
    # Without placement, slots interleave across ranges and nothing merges.
    vr = host.reserve(16 * PS)
    other = host.reserve(16 * PS)
    for i in range(8):
        host.map(vr, i * PS, host.create_page())
        host.map(other, i * PS, host.create_page())
    assert host.map_entries(vr) == kernel_vmas(vr) == 9
    for t in tensors:
        t.close()


def test_guard_names_the_limit_and_allows_merging_maps() -> None:
    gc.collect()
    limit = count_process_maps() + 10
    with HostBackend(PS, max_map_count=limit, map_headroom=0) as b:
        vr = b.reserve(64 * PS)  # +1

        def put(i: int) -> None:
            b.map(vr, i * PS, b.create_page(PagePlacement(vr, i * PS)))

        mapped = 0
        with pytest.raises(MapCountLimitError, match=rf"vm\.max_map_count is {limit}") as info:
            for i in range(0, 64, 2):  # islands: +2 mappings each
                put(i)
                mapped += 1
        assert isinstance(info.value, MemoryError)
        assert mapped >= 3
        # Stopped at the limit, not long before it: one more island (+2) would not fit.
        # Measured against the kernel's count now, since the rest of the process moves.
        assert limit - 2 < count_process_maps() <= limit
        put(1)  # fills the gap between islands 0 and 2: merges, needs no new mapping
        assert b.map_entries(vr) == kernel_vmas(vr)
        for i in sorted([1, *range(0, 2 * mapped, 2)], reverse=True):  # still possible
            b.release_page(b.unmap(vr, i * PS))
        assert b.map_entries(vr) == kernel_vmas(vr) == 1


def test_guard_refuses_reservations_too(steady_process: int) -> None:
    with HostBackend(PS, max_map_count=steady_process, map_headroom=0) as b:
        with pytest.raises(MapCountLimitError):
            b.reserve(PS)
        assert b.stats().ranges_live == 0


def test_failed_growth_rolls_back_the_page(steady_process: int) -> None:
    with HostBackend(PS, max_map_count=steady_process + 1, map_headroom=0) as b:
        vt = VirtualTensor(b, 8 * PS, torch.uint8)  # takes the last free mapping
        with pytest.raises(MapCountLimitError):
            vt.map_pages(1)  # the first page splits the reservation
        assert vt.mapped_pages == 0 and b.stats().pages_live == 0
        vt.close()


def test_kernel_enomem_is_reported_as_limit() -> None:
    guard = MapCountGuard(limit=100, headroom=0)
    err = guard.translate(OSError(errno.ENOMEM, "mmap"))
    assert isinstance(err, MapCountLimitError) and "vm.max_map_count is 100" in str(err)
    other = OSError(errno.EINVAL, "mmap")
    assert guard.translate(other) is other


def test_default_limit_is_the_sysctl() -> None:
    with open("/proc/sys/vm/max_map_count") as f:
        assert MapCountGuard(None, None).limit == int(f.read())
