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


@pytest.mark.parametrize("read_only_ok", [True, False])
def test_unmapped_pages_show_the_zero_page(fake: FakeDriver, read_only_ok: bool) -> None:
    fake.read_only_ok = read_only_ok
    with CudaBackend() as b:
        vr = b.reserve(3 * GRAN)
        assert all(zeros(fake, vr, i) for i in range(3))
        if read_only_ok:  # read-only where the driver allows it: stray writes fault
            with pytest.raises(PermissionError):
                fake.write(vr.base, b"x")
    assert not fake.allocs


def test_map_write_unmap_remap(fake: FakeDriver, cb: CudaBackend) -> None:
    vr = cb.reserve(4 * GRAN)
    page = cb.create_page()
    cb.map(vr, GRAN, page)
    fake.write(vr.base + GRAN + 10, b"kv!")
    assert fake.read(vr.base + GRAN + 10, 3) == b"kv!"
    fake.launch()
    assert cb.unmap(vr, GRAN) == page  # synchronizes first, or the fake would refuse
    assert zeros(fake, vr, 1)
    cb.map(vr, 3 * GRAN, page)
    assert fake.read(vr.base + 3 * GRAN + 10, 3) == b"kv!"
    fake.launch()
    with pytest.raises(CudaError, match="ILLEGAL_STATE"):
        cb.unmap(vr, 3 * GRAN, sync=False)  # the caller promised a sync it never did


def test_shrink_synchronizes_once_and_frees(fake: FakeDriver, cb: CudaBackend,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
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


def test_release_waits_for_exported_fds(fake: FakeDriver, cb: CudaBackend) -> None:
    vr = cb.reserve(2 * GRAN)
    page = cb.create_page()
    cb.map(vr, 0, page)
    fake.write(vr.base, b"shared")
    handle = cb.export_page(page)
    twin = cb.import_page(handle)
    cb.map(vr, GRAN, twin)
    assert fake.read(vr.base + GRAN, 6) == b"shared"
    for off in (0, GRAN):
        cb.release_page(cb.unmap(vr, off))
    assert len(fake.allocs) == 2  # zero page + the page, still held by the open fd
    fake.close_fd(handle.fd)
    handle.close()
    assert len(fake.allocs) == 1


def test_failed_map_restores_zero_page(fake: FakeDriver, cb: CudaBackend,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
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
