"""MemoryBackend contract, run against every usable backend."""

from __future__ import annotations

import pickle
import socket

import pytest
import torch

from elasticserve.memory import (
    BackendUnavailableError,
    HostBackend,
    MemoryBackend,
    PagePlacement,
    PhysicalPage,
    VirtualRange,
    cuda_available,
    get_backend,
    recv_page_handle,
    send_page_handle,
)
from tests.memory.memory_helpers import host_bytes

SMALL = 16 * 1024


def fill(b: MemoryBackend, vr: VirtualRange, offset: int, value: int) -> None:
    b.as_tensor(vr, torch.uint8)[offset : offset + b.page_size].fill_(value)


def page_is(b: MemoryBackend, vr: VirtualRange, offset: int, value: int) -> bool:
    return bool((host_bytes(b, vr, offset, b.page_size) == value).all())


def test_satisfies_protocol(backend: MemoryBackend) -> None:
    assert isinstance(backend, MemoryBackend)


def test_reserve_rounds_up_and_aligns(backend: MemoryBackend) -> None:
    ps = backend.page_size
    vr = backend.reserve(3 * ps + 1)
    assert vr.size == 4 * ps
    assert vr.base % ps == 0
    view = backend.as_tensor(vr, torch.float32)
    assert view.data_ptr() == vr.base and view.numel() == vr.size // 4
    assert backend.as_tensor(vr, torch.bfloat16).numel() == vr.size // 2


def test_unmapped_range_reads_zero(backend: MemoryBackend) -> None:
    vr = backend.reserve(4 * backend.page_size)
    assert int(host_bytes(backend, vr).count_nonzero()) == 0
    assert backend.stats().pages_mapped == 0


def test_map_write_unmap_round_trip(backend: MemoryBackend) -> None:
    ps = backend.page_size
    vr = backend.reserve(4 * ps)
    page = backend.create_page()
    backend.map(vr, ps, page)
    fill(backend, vr, ps, 7)
    assert page_is(backend, vr, ps, 7)
    assert page_is(backend, vr, 0, 0) and page_is(backend, vr, 2 * ps, 0)
    assert backend.unmap(vr, ps) == page
    assert page_is(backend, vr, ps, 0)  # unmapped offset reads zeros again
    backend.map(vr, 3 * ps, page)  # the same physical page, somewhere else
    assert page_is(backend, vr, 3 * ps, 7)


def test_data_survives_neighbour_churn(backend: MemoryBackend) -> None:
    ps = backend.page_size
    vr = backend.reserve(6 * ps)
    keep = backend.create_page()
    backend.map(vr, 2 * ps, keep)
    fill(backend, vr, 2 * ps, 0x5A)
    for _ in range(3):
        others = [backend.create_page() for _ in range(4)]
        for off, p in zip((0, ps, 3 * ps, 5 * ps), others, strict=True):
            backend.map(vr, off, p)
            fill(backend, vr, off, 0xFF)
        for off in (0, ps, 3 * ps, 5 * ps):
            backend.release_page(backend.unmap(vr, off))
    assert page_is(backend, vr, 2 * ps, 0x5A)
    assert page_is(backend, vr, ps, 0) and page_is(backend, vr, 3 * ps, 0)


def test_one_page_mapped_twice_aliases(backend: MemoryBackend) -> None:
    ps = backend.page_size
    vr = backend.reserve(2 * ps)
    page = backend.create_page()
    backend.map(vr, 0, page)
    backend.map(vr, ps, page)
    backend.as_tensor(vr, torch.uint8)[123] = 42
    assert int(host_bytes(backend, vr, ps + 123, 1)[0]) == 42
    with pytest.raises(ValueError, match="still mapped"):
        backend.release_page(page)
    backend.unmap(vr, 0)
    with pytest.raises(ValueError, match="still mapped"):
        backend.release_page(page)
    backend.unmap(vr, ps)
    backend.release_page(page)


def test_misuse_is_rejected(backend: MemoryBackend) -> None:
    ps = backend.page_size
    vr = backend.reserve(2 * ps)
    page = backend.create_page()
    backend.map(vr, 0, page)
    with pytest.raises(ValueError, match="already mapped"):
        backend.map(vr, 0, backend.create_page())
    with pytest.raises(ValueError, match="page-aligned"):
        backend.map(vr, 1, page)
    with pytest.raises(ValueError, match="page-aligned"):
        backend.map(vr, 2 * ps, page)
    with pytest.raises(ValueError, match="not mapped"):
        backend.unmap(vr, ps)
    with pytest.raises(KeyError):
        backend.map(VirtualRange(vr.base + ps, ps), 0, page)
    stranger = PhysicalPage(page_id=10**9, size=ps)
    with pytest.raises(KeyError):
        backend.map(vr, ps, stranger)
    assert page_is(backend, vr, ps, 0)  # failed calls changed nothing


def test_release_range_keeps_pages(backend: MemoryBackend) -> None:
    ps = backend.page_size
    vr = backend.reserve(2 * ps)
    page = backend.create_page()
    backend.map(vr, ps, page)
    fill(backend, vr, ps, 9)
    backend.release_range(vr)
    assert backend.stats().ranges_live == 0 and backend.stats().pages_live == 1
    vr2 = backend.reserve(ps)
    backend.map(vr2, 0, page)
    assert page_is(backend, vr2, 0, 9)


def test_stats_count_lifecycle(backend: MemoryBackend) -> None:
    ps = backend.page_size
    vr = backend.reserve(4 * ps)
    pages = [backend.create_page() for _ in range(3)]
    for i, p in enumerate(pages):
        backend.map(vr, i * ps, p)
    backend.release_page(backend.unmap(vr, 0))
    s = backend.stats()
    assert (s.pages_created, s.pages_released, s.pages_live) == (3, 1, 2)
    assert (s.pages_mapped, s.map_calls, s.unmap_calls) == (2, 3, 1)
    assert (s.ranges_live, s.bytes_reserved) == (1, 4 * ps)
    backend.close()
    s = backend.stats()
    assert (s.pages_live, s.ranges_live, s.pages_mapped) == (0, 0, 0)
    backend.close()  # idempotent


def test_export_import_shares_memory_in_process(backend: MemoryBackend) -> None:
    ps = backend.page_size
    vr = backend.reserve(2 * ps)
    page = backend.create_page()
    backend.map(vr, 0, page)
    fill(backend, vr, 0, 3)
    handle = pickle.loads(pickle.dumps(backend.export_page(page)))
    twin = backend.import_page(handle)
    handle.close()  # importing took its own reference
    assert twin.imported and backend.stats().pages_imported == 1
    backend.map(vr, ps, twin)
    assert page_is(backend, vr, ps, 3)
    backend.as_tensor(vr, torch.uint8)[ps + 5] = 99
    assert int(host_bytes(backend, vr, 5, 1)[0]) == 99
    backend.release_page(backend.unmap(vr, ps))  # drops only the import
    assert host_bytes(backend, vr, 4, 3).tolist() == [3, 99, 3]


def test_get_backend_registry() -> None:
    host = get_backend("host", page_size=SMALL)
    assert isinstance(host, HostBackend) and host.page_size == SMALL
    host.close()
    auto = get_backend("auto")
    assert auto.name == ("cuda" if cuda_available() else "host")
    auto.close()
    with pytest.raises(ValueError, match="unknown memory backend"):
        get_backend("tpu")
    if not cuda_available():
        with pytest.raises(BackendUnavailableError):
            get_backend("cuda")


def test_host_page_size_must_be_os_page_multiple() -> None:
    with pytest.raises(ValueError, match="multiple"):
        HostBackend(page_size=5000)



def test_handles_back_to_back_over_a_socket() -> None:
    with HostBackend(SMALL) as b:
        vr, vr2 = b.reserve(2 * SMALL), b.reserve(SMALL)
        pages = [b.create_page() for _ in range(2)]
        left, right = socket.socketpair()
        with left, right:
            for p in pages:  # two messages in a row must not run together
                h = b.export_page(p)
                send_page_handle(left, h)
                h.close()
            got = [recv_page_handle(right) for _ in pages]
        assert [g.offset for g in got] == [p.offset for p in pages]
        for i, g in enumerate(got):
            b.map(vr, i * SMALL, b.import_page(g))
            g.close()
        b.as_tensor(vr, torch.uint8)[SMALL] = 5  # through the import of page 1
        b.map(vr2, 0, pages[1])
        assert int(b.as_tensor(vr2, torch.uint8)[0]) == 5
        with pytest.raises(ValueError, match="page-aligned"):
            b.create_page(PagePlacement(vr, 3 * SMALL))
