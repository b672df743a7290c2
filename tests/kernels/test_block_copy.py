"""Block copies between the cache and host swap space: runs, pinning, index tensors."""

from __future__ import annotations

import pytest
import torch

from elasticserve.kernels.block_copy import copy_rows, host_empty, index_tensors, pin_for, runs


def test_consecutive_pairs_merge_into_runs():
    assert runs([]) == []
    assert runs([(3, 7), (4, 8), (5, 9), (9, 1), (10, 2), (0, 0)]) == [(3, 7, 3), (9, 1, 2),
                                                                       (0, 0, 1)]
    # consecutive on one side only is not a run
    assert runs([(1, 1), (2, 5)]) == [(1, 1, 1), (2, 5, 1)]


def test_copy_rows_equals_indexed_assignment():
    src = torch.randn(12, 3, 2)
    dst = torch.zeros(6, 3, 2)
    pairs = [(4, 0), (5, 1), (6, 2), (11, 5), (0, 3)]
    want = dst.clone()
    want[[d for _, d in pairs]] = src[[s for s, _ in pairs]]
    copy_rows(dst, src, pairs)
    assert torch.equal(dst, want)


def test_host_buffers_are_pinned_only_for_a_gpu():
    assert pin_for("cuda") and pin_for(torch.device("cuda", 1))
    assert not pin_for("cpu")
    buf = host_empty((2, 4), torch.float16, "cpu")
    assert buf.shape == (2, 4) and buf.dtype == torch.float16 and not buf.is_pinned()


def test_index_tensors_land_on_the_device():
    src, dst = index_tensors([(1, 2), (3, 4)], torch.device("cpu"))
    assert src.tolist() == [1, 3] and dst.tolist() == [2, 4] and src.dtype == torch.long


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_swap_round_trip_through_pinned_memory():
    dev = torch.randn(8, 4, device="cuda")
    host = host_empty((8, 4), dev.dtype, dev.device)
    assert host.is_pinned()
    copy_rows(host, dev, [(2, 0), (3, 1), (7, 5)])
    back = torch.zeros_like(dev)
    copy_rows(back, host, [(0, 2), (1, 3), (5, 7)])
    torch.cuda.synchronize()
    assert torch.equal(back[[2, 3, 7]], dev[[2, 3, 7]])
