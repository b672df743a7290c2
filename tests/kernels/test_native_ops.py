"""Fused C element-wise ops against the torch expressions they replace."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from elasticserve.kernels import native, native_ops
from elasticserve.models.layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rope

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler for the kernels")


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("rows", [3, 4096])  # 4096 x 96 crosses the thread-split threshold
def test_rms_norm_matches_torch(threads: int, rows: int) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-6)
    norm.weight.data = torch.randn(96)
    x = torch.randn(rows, 96) * 3
    expect = norm(x)
    norm.native = True
    torch.testing.assert_close(norm(x), expect, atol=1e-5, rtol=1e-5)
    # a strided per-head view (Qwen3's q_norm input) is copied dense first
    qkv = torch.randn(rows, 4 * 96)
    heads = qkv[:, : 2 * 96].view(rows, 2, 96)
    torch.testing.assert_close(norm(heads), expect_norm(heads, norm), atol=1e-5, rtol=1e-5)


def expect_norm(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)


@pytest.mark.parametrize("tokens", [5, 3000])
def test_rope_in_place_matches_torch(threads: int, tokens: int) -> None:
    torch.manual_seed(1)
    rotary = RotaryEmbedding(64, 10000.0, None)
    cos, sin = rotary(torch.randint(0, 4000, (tokens,)), torch.float32)
    qkv = torch.randn(tokens, (8 + 2 * 2) * 64)
    q = qkv[:, : 8 * 64].view(tokens, 8, 64)  # token rows strided, as in the model
    expect = apply_rope(q, cos, sin)
    out = apply_rope(q, cos, sin, native=True)
    assert out.data_ptr() == q.data_ptr()  # rotated in place
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [7, 2048])
def test_silu_mul_matches_torch(threads: int, rows: int) -> None:
    torch.manual_seed(2)
    gate_up = torch.randn(rows, 2 * 176) * 4
    gate, up = gate_up.split(176, dim=-1)
    torch.testing.assert_close(native_ops.silu_mul(gate_up), F.silu(gate) * up,
                               atol=1e-5, rtol=1e-5)


def test_mlp_switches_path_and_other_dtypes_keep_torch() -> None:
    torch.manual_seed(3)
    mlp = GatedMLP(32, 48, bias=False)
    for p in mlp.parameters():
        p.data = torch.randn_like(p)
    x = torch.randn(4, 32)
    expect = mlp(x)
    mlp.native = True
    torch.testing.assert_close(mlp(x), expect, atol=1e-4, rtol=1e-5)
    norm = RMSNorm(32, 1e-6).bfloat16()
    norm.native = True
    xb = torch.randn(4, 32).bfloat16()
    assert not native_ops.fits(xb, norm.weight)
    torch.testing.assert_close(norm(xb), expect_norm(xb.float(), norm.float()).bfloat16())


def test_fits_takes_only_fp32_cpu_tensors_with_a_dense_last_dimension() -> None:
    x, w = torch.randn(4, 32), torch.randn(32)
    assert native_ops.fits(x, w) and native_ops.fits(x) and native_ops.fits()
    assert native_ops.fits(x[:, :16])  # rows may be strided
    assert not native_ops.fits(x, w.double())
    assert not native_ops.fits(x.t())  # last dimension not dense
    assert not native_ops.fits(torch.empty(4, 32, device="meta"))
