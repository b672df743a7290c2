"""Opaque oneDNN tensors in a shared mapping: bytes out, a tensor over read-only pages back, the
mapping held as long as the tensor (and the parameter adopting it) lives, and no longer."""

from __future__ import annotations

import gc
import os

import pytest
import torch
from torch import nn

from elasticserve.kernels import mkldnn_linear
from elasticserve.memory import opaque_tensors
from elasticserve.memory.shared_weights import adopt_weights, map_weights, write_weights

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="torch built without oneDNN")


def _mapped(name: str) -> bool:
    with open("/proc/self/maps") as f:
        return any(f"memfd:{name}" in line for line in f)


def test_packed_weights_round_trip_through_a_read_only_mapping() -> None:
    w, b = torch.randn(100, 48), torch.randn(100)
    module = nn.Linear(48, 100)
    module.weight = nn.Parameter(mkldnn_linear.pack(w), requires_grad=False)
    module.bias = nn.Parameter(b, requires_grad=False)
    fd = os.memfd_create("opaque-test")
    try:
        manifest = write_weights(fd, module.state_dict())
        assert [name for name, _, _ in manifest.opaque] == ["weight"]
        views = map_weights(fd, manifest)
    finally:
        os.close(fd)
    skeleton = nn.Linear(48, 100, device="meta")
    adopt_weights(skeleton, views)
    del views
    gc.collect()
    assert skeleton.weight.is_mkldnn and _mapped("opaque-test")
    x = torch.randn(5, 48)
    want = mkldnn_linear.linear(x, module.weight, module.bias)
    assert torch.equal(mkldnn_linear.linear(x, skeleton.weight, skeleton.bias), want)
    del skeleton
    gc.collect()
    assert not _mapped("opaque-test")  # the last holder gone: the pages are unmapped


def test_from_blob_views_without_copying() -> None:
    packed = mkldnn_linear.pack(torch.randn(64, 32))
    buf = torch.empty(opaque_tensors.nbytes(packed) // 4)
    opaque_tensors.copy_to(packed, buf.data_ptr())
    view = opaque_tensors.from_blob(buf.data_ptr(), (64, 32), torch.float32,
                                    opaque_tensors.metadata(packed))
    assert opaque_tensors.data_ptr(view) == buf.data_ptr()
    assert view._use_count() == 1  # no handle left pinning it
    x = torch.randn(3, 32)
    assert torch.equal(mkldnn_linear.linear(x, view, None), mkldnn_linear.linear(x, packed, None))
    with pytest.raises(ValueError, match="dtype"):
        opaque_tensors.from_blob(buf.data_ptr(), (64, 32), torch.float64, b"")
