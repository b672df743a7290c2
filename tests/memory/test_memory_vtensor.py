"""VirtualTensor on every usable backend."""

from __future__ import annotations

import pytest
import torch

from elasticserve.memory import MemoryBackend, VirtualTensor


def test_shape_and_fixed_address(backend: MemoryBackend) -> None:
    ps = backend.page_size
    vt = VirtualTensor(backend, 8 * ps, torch.float16, (4, 32))
    row = 4 * 32 * 2
    assert vt.max_rows == 8 * ps // row and vt.tensor.shape == (vt.max_rows, 4, 32)
    assert vt.tensor.device.type == torch.device(backend.device).type
    ptr = vt.tensor.data_ptr()
    assert ptr == vt.vrange.base
    for grow, shrink in ((3, 1), (5, 4), (1, 0)):
        vt.map_pages(grow)
        assert vt.tensor.data_ptr() == ptr
        vt.unmap_pages(shrink)
        assert vt.tensor.data_ptr() == ptr
    assert vt.mapped_pages == 4 and vt.mapped_bytes == 4 * ps
    vt.close()


def test_rows_straddling_pages(backend: MemoryBackend) -> None:
    ps = backend.page_size
    vt = VirtualTensor(backend, 4 * ps, torch.float32, (3, 7))  # 84-byte rows
    assert vt.rows_mapped == 0
    vt.map_pages(1)
    assert vt.rows_mapped == ps // 84
    vt.map_pages(1)
    assert vt.rows_mapped == 2 * ps // 84  # the straddling row is now whole
    vt.tensor[: vt.rows_mapped] = 1.0
    assert float(vt.tensor[: vt.rows_mapped].sum()) == vt.rows_mapped * 21
    assert float(vt.tensor[vt.rows_mapped + 1 :].abs().sum()) == 0.0  # beyond: zeros
    assert vt.pages_for_rows(vt.rows_mapped + 1) == 3
    vt.close()


def test_growth_keeps_data_and_shrink_frees(backend: MemoryBackend) -> None:
    ps = backend.page_size
    vt = VirtualTensor(backend, 6 * ps, torch.int32, (16,))
    vt.ensure_rows(10)
    assert vt.mapped_pages == 1
    rows = vt.rows_mapped
    vt.tensor[:rows] = torch.arange(rows, dtype=torch.int32).unsqueeze(1)
    vt.resize_pages(6)
    assert torch.equal(vt.tensor[:rows, 0].cpu(), torch.arange(rows, dtype=torch.int32))
    vt.tensor[rows:] = -1
    assert backend.stats().pages_live == 6
    vt.resize_pages(2)
    assert backend.stats().pages_live == 2
    assert int(vt.tensor[vt.rows_mapped + 1 :].count_nonzero()) == 0  # released: zeros
    assert torch.equal(vt.tensor[:rows, 0].cpu(), torch.arange(rows, dtype=torch.int32))
    vt.map_pages(1)
    if backend.name == "host":  # a punched-out page comes back zero-filled
        assert int(vt.tensor[2 * ps // 64 : 3 * ps // 64].count_nonzero()) == 0
    vt.close()


def test_bounds_and_close(backend: MemoryBackend) -> None:
    ps = backend.page_size
    vt = VirtualTensor(backend, 2 * ps, torch.uint8, ())
    assert vt.tensor.shape == (2 * ps,)
    with pytest.raises(ValueError):
        vt.map_pages(3)
    assert vt.mapped_pages == 0  # rejected up front, nothing half-done
    with pytest.raises(ValueError):
        vt.unmap_pages(1)
    with pytest.raises(ValueError):
        vt.ensure_rows(2 * ps + 1)
    vt.map_pages(2)
    with vt:
        pass
    s = backend.stats()
    assert (s.pages_live, s.ranges_live) == (0, 0)
    with pytest.raises(RuntimeError, match="closed"):
        _ = vt.tensor
    vt.close()  # idempotent
    with pytest.raises(ValueError, match="at least one row"):
        VirtualTensor(backend, 10, torch.float32, (8,))
