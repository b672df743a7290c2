"""Packed oneDNN linears (kernels/mkldnn_linear.py) against F.linear, and backend resolution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from elasticserve.kernels import mkldnn_linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="torch built without oneDNN")


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(rows: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(100, 48, generator=g)  # 100 rows: not a multiple of any block size
    b = torch.randn(100, generator=g) if bias else None
    x = torch.randn(rows, 96, generator=g)[:, ::2]  # a strided input too
    packed = mkldnn_linear.pack(w)
    assert packed.is_mkldnn and packed.shape == w.shape
    got = mkldnn_linear.linear(x, packed, b)
    assert got.layout == torch.strided
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_use_mkldnn_resolution() -> None:
    cpu = torch.device("cpu")
    assert mkldnn_linear.use_mkldnn("auto", torch.float32, cpu)
    assert mkldnn_linear.use_mkldnn("mkldnn", torch.float32, cpu)
    assert not mkldnn_linear.use_mkldnn("torch", torch.float32, cpu)
    assert not mkldnn_linear.use_mkldnn("auto", torch.bfloat16, cpu)
    assert not mkldnn_linear.use_mkldnn("auto", torch.float32, torch.device("meta"))
    with pytest.raises(ValueError, match="linear_backend='mkldnn' needs"):
        mkldnn_linear.use_mkldnn("mkldnn", torch.float16, cpu)
    with pytest.raises(ValueError, match="linear_backend must be one of"):
        mkldnn_linear.use_mkldnn("fast", torch.float32, cpu)
    with pytest.raises(ValueError, match="weight"):
        mkldnn_linear.pack(torch.zeros(4, 4, dtype=torch.float64))
