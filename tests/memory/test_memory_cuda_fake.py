"""CudaBackend's driver-call discipline, checked against a strict fake driver (no GPU).

The real-GPU behaviour is covered by the backend-parametrized tests (marked ``gpu``);
these run everywhere and catch wrong call order, missing cuMemSetAccess, unmapping
without synchronizing, leaks of allocations, handles or reservations.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from elasticserve.memory import PageHandle, VirtualRange, VirtualTensor, get_backend
from elasticserve.memory import cuda as cuda_mod
from elasticserve.memory.cuda import CudaBackend, CudaError
from tests.memory.fake_cuda_driver import GRAN, FakeDriver


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDriver]:
    drv = FakeDriver()
    cuda_mod.is_available.cache_clear()
    monkeypatch.setattr(cuda_mod, "_drv", drv)
    yield drv
    monkeypatch.undo()
    cuda_mod.is_available.cache_clear()


@pytest.fixture
def cb(fake: FakeDriver) -> Iterator[CudaBackend]:
    b = CudaBackend()
    yield b
    b.close()
    assert len(fake.allocs) == 0 and not fake.ranges and not fake.maps  # nothing leaked


def zeros(fake: FakeDriver, vr: VirtualRange, index: int) -> bool:
    return fake.read(vr.base + index * GRAN, GRAN) == bytes(GRAN)


def test_availability_never_raises(monkeypatch: pytest.MonkeyPatch, fake: FakeDriver) -> None:
    assert cuda_mod.is_available()
    backend = get_backend("auto")
    assert isinstance(backend, CudaBackend) and backend.page_size == GRAN
    backend.close()

    def broken(flags: int) -> None:
        raise RuntimeError("libcuda.so not found")

    monkeypatch.setattr(fake, "cuInit", broken)
    cuda_mod.is_available.cache_clear()
    assert cuda_mod.is_available() is False
    monkeypatch.setattr(cuda_mod, "_drv", None)
    cuda_mod.is_available.cache_clear()
    assert cuda_mod.is_available() is False


def test_reserving_80_gib_is_o1_driver_calls(fake: FakeDriver, cb: CudaBackend) -> None:
    """No zero page at every offset: 40,960 pages of address space cost one reservation, and
    unmapped offsets are never read by construction (reading one is an illegal address)."""
    before = fake.calls.copy()
    vr = cb.reserve(80 << 30)
    made = fake.calls - before
    assert made == {"cuMemAddressReserve": 1, "cuCtxSetCurrent": 1}, made
    with pytest.raises(PermissionError):
        fake.read(vr.base + 5 * GRAN, 1)
    cb.map(vr, 40_000 * GRAN, page := cb.create_page())
    before = fake.calls.copy()
    cb.release_range(vr)  # O(mapped pages), not O(offsets)
    assert sum((fake.calls - before).values()) <= 5
    cb.release_page(page)


@pytest.mark.parametrize("read_only_ok", [True, False])
def test_zero_page_is_read_only_or_absent(fake: FakeDriver, read_only_ok: bool,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """zero_fill_unmapped: a read-only zero page everywhere; where the driver refuses read-only,
    a log line and no zero page at all (never a shared writable page)."""
    fake.read_only_ok = read_only_ok
    with caplog.at_level("WARNING", logger="elasticserve.memory.cuda_pages"), \
            CudaBackend(zero_fill_unmapped=True, page_pool=0) as b:
        vr = b.reserve(3 * GRAN)
        assert (len(fake.maps) == 3) is read_only_ok
        assert all(flags == 1 for _, flags in fake.maps.values())  # nothing writable shared
        assert ("refuses read-only" in caplog.text) is not read_only_ok
        if read_only_ok:
            assert all(zeros(fake, vr, i) for i in range(3))
        with pytest.raises(PermissionError):  # a stray write faults either way
            fake.write(vr.base, b"x")
        page = b.create_page()
        b.map(vr, GRAN, page)
        fake.write(vr.base + GRAN, b"kv")
        b.release_page(b.unmap(vr, GRAN))
        if read_only_ok:  # the zero page is back under the unmapped offset
            assert zeros(fake, vr, 1)
        else:
            assert not fake.maps
    assert not fake.allocs


def test_map_write_unmap_remap(fake: FakeDriver, cb: CudaBackend) -> None:
    vr = cb.reserve(4 * GRAN)
    page = cb.create_page()
    cb.map(vr, GRAN, page)
    fake.write(vr.base + GRAN + 10, b"kv!")
    assert fake.read(vr.base + GRAN + 10, 3) == b"kv!"
    fake.launch()
    assert cb.unmap(vr, GRAN) == page  # synchronizes first, or the fake would refuse
    cb.map(vr, 3 * GRAN, page)
    assert fake.read(vr.base + 3 * GRAN + 10, 3) == b"kv!"
    fake.launch()
    with pytest.raises(CudaError, match="ILLEGAL_STATE"):
        cb.unmap(vr, 3 * GRAN, sync=False)  # the caller promised a sync it never did


def test_unmap_waits_for_its_own_stream_only(fake: FakeDriver, cb: CudaBackend) -> None:
    """cuStreamSynchronize on the backend's stream, not cuCtxSynchronize: another model's
    stream keeps running."""
    cb.set_stream(7)
    vr = cb.reserve(2 * GRAN)
    cb.map(vr, 0, cb.create_page())
    fake.launch(stream=7)
    fake.launch(stream=9, reads_kv=False)  # another model's kernels
    before = fake.calls.copy()
    cb.release_page(cb.unmap(vr, 0))
    made = fake.calls - before
    assert made["cuStreamSynchronize"] == 1 and made["cuCtxSynchronize"] == 0
    assert 9 in fake.busy and 7 not in fake.busy


def test_page_pool_keeps_create_off_the_step_path(fake: FakeDriver) -> None:
    with CudaBackend(page_pool=3) as b:
        assert fake.calls["cuMemCreate"] == 3 and len(b.pool) == 3  # created at start
        vr = b.reserve(8 * GRAN)
        pages = [b.create_page() for _ in range(2)]
        for i, page in enumerate(pages):
            b.map(vr, i * GRAN, page)
        assert fake.calls["cuMemCreate"] == 3  # the step path only mapped
        for i in range(len(pages)):
            b.release_page(b.unmap(vr, i * GRAN))
        assert fake.calls["cuMemRelease"] == 0 and len(b.pool) == 3  # kept for reuse
        more = [b.create_page() for _ in range(4)]
        assert fake.calls["cuMemCreate"] == 4 and b.pool.misses == 1 and len(b.pool) == 0
        assert b.fill_pool() == 3 and fake.calls["cuMemCreate"] == 7
        for page in more:
            b.release_page(page)
        assert fake.calls["cuMemRelease"] == 4 and len(b.pool) == 3  # full: the rest freed
        assert b.fill_pool() == 0
    assert not fake.allocs and fake.calls["cuMemRelease"] == 7
    with pytest.raises(ValueError, match="page_pool"):
        CudaBackend(page_pool=-1)


def test_shrink_synchronizes_once_and_frees(fake: FakeDriver,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cb = CudaBackend(page_pool=0)
    monkeypatch.setattr(cb, "as_tensor", lambda vr, dtype: torch.empty(
        vr.size, dtype=torch.uint8, device="meta").view(dtype))
    vt = VirtualTensor(cb, 8 * GRAN, torch.float16, (128,))
    vt.map_pages(5)
    allocs = len(fake.allocs)
    fake.launch()
    syncs = fake.syncs
    vt.unmap_pages(4)
    assert fake.syncs == syncs + 1
    assert len(fake.allocs) == allocs - 4  # memory went back to the driver
    vt.close()
    cb.close()


def test_shared_pages_never_enter_the_pool(fake: FakeDriver, cb: CudaBackend) -> None:
    vr = cb.reserve(2 * GRAN)
    page = cb.create_page()
    cb.map(vr, 0, page)
    fake.write(vr.base, b"shared")
    handle = cb.export_page(page)
    twin = cb.import_page(handle)
    cb.map(vr, GRAN, twin)
    assert fake.read(vr.base + GRAN, 6) == b"shared"
    pooled = len(cb.pool)
    for off in (0, GRAN):
        cb.release_page(cb.unmap(vr, off))
    assert len(cb.pool) == pooled and fake.calls["cuMemRelease"] == 2  # both released
    allocs = len(fake.allocs)  # the page is still held by the open fd
    fake.close_fd(handle.fd)
    handle.close()
    assert len(fake.allocs) == allocs - 1


def test_failed_map_restores_zero_page(fake: FakeDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    cb = CudaBackend(zero_fill_unmapped=True)
    vr = cb.reserve(2 * GRAN)
    page = cb.create_page()
    real = fake.cuMemSetAccess
    monkeypatch.setattr(fake, "cuMemSetAccess", lambda va, size, desc, n: (
        (fake.CUresult.CUDA_ERROR_OUT_OF_MEMORY,) if desc[0].flags == 3
        else real(va, size, desc, n)))
    with pytest.raises(CudaError, match="cuMemSetAccess"):
        cb.map(vr, 0, page)
    assert zeros(fake, vr, 0) and cb.stats().pages_mapped == 0
    monkeypatch.setattr(fake, "cuMemSetAccess", real)
    cb.map(vr, 0, page)  # the offset is usable again
    cb.close()
    assert not fake.allocs and not fake.maps


def test_release_range_unmaps_everything(fake: FakeDriver, cb: CudaBackend) -> None:
    vr = cb.reserve(3 * GRAN)
    pages = [cb.create_page() for _ in range(2)]
    cb.map(vr, 0, pages[0])
    cb.map(vr, 2 * GRAN, pages[1])
    fake.launch()
    cb.release_range(vr)
    assert not fake.ranges and not fake.maps
    assert cb.stats().pages_live == 2 and cb.stats().ranges_live == 0
    with pytest.raises(ValueError, match="cannot import"):
        cb.import_page(PageHandle("host", 0, 0, GRAN))
