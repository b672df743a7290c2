"""The step workspace: the MLP and the logits write into it, with the same bits as without."""

from __future__ import annotations

import pytest
import torch

from elasticserve.models.layers import GatedMLP, Linear
from elasticserve.models.workspace import StepWorkspace

HIDDEN, INTER, VOCAB = 16, 40, 24


def _mlp(bias: bool, seed: int = 0) -> GatedMLP:
    torch.manual_seed(seed)
    mlp = GatedMLP(HIDDEN, INTER, bias)
    for p in mlp.parameters():
        p.data.normal_(0, 0.3)
    return mlp


def _workspace(nbytes: int, dtype: torch.dtype = torch.float32, placed: bool = True
               ) -> StepWorkspace:
    buf = torch.full((nbytes,), 0xAB, dtype=torch.uint8)  # a sentinel, so writes show
    return StepWorkspace(buf, HIDDEN, INTER, VOCAB, dtype, gate_up_placed=placed,
                         logits_placed=True)


@pytest.mark.parametrize("bias", [False, True])
def test_mlp_writes_into_the_workspace_with_identical_output(bias: bool) -> None:
    mlp = _mlp(bias)
    x = torch.randn(7, HIDDEN)
    ws = _workspace(1 << 16)
    ws.limit, ws.active = ws.need_bytes(7, 0), True
    with torch.inference_mode():
        expect = mlp(x)
        got = mlp(x, ws)
        assert torch.equal(got, expect)
        # the activation silu(gate) * up really lives in the workspace's bytes
        act = ws.activation(7)
        assert act is not None
        gate, up = mlp.gate_up_proj(x).split(INTER, dim=-1)
        assert torch.equal(act, torch.nn.functional.silu(gate) * up)
        assert act.data_ptr() >= ws.buffer.data_ptr()


def test_an_inactive_or_too_small_workspace_is_not_written() -> None:
    mlp = _mlp(False)
    x = torch.randn(5, HIDDEN)
    ws = _workspace(1 << 16)
    with torch.inference_mode():
        assert torch.equal(mlp(x, ws), mlp(x))  # not active
        ws.active, ws.limit = True, ws.need_bytes(5, 0)
        act = ws.activation(5)
        assert act is not None
        end = act.data_ptr() - ws.buffer.data_ptr() + act.numel() * 4
        ws.limit = end - 1  # one byte short of the activation
        assert ws.gate_up(5) is not None and ws.activation(5) is None
        ws.buffer.fill_(0xAB)
        assert torch.equal(mlp(x, ws), mlp(x))
        # the activation was allocated elsewhere: nothing past gate/up was written
        assert bool((ws.buffer[act.data_ptr() - ws.buffer.data_ptr():] == 0xAB).all())


def test_need_is_the_larger_of_the_mlp_and_the_logits() -> None:
    ws = _workspace(0)
    mlp = ws.mlp_bytes(10)
    assert mlp >= 10 * 3 * INTER * 4  # gate/up and the activation
    assert ws.need_bytes(10, 1) == mlp  # one row of logits fits in the MLP's bytes
    assert ws.need_bytes(0, 100) == ws.logits_bytes(100) >= 100 * VOCAB * 4
    assert _workspace(0, placed=False).mlp_bytes(10) < mlp  # a packed gate/up is not placed
    assert _workspace(0, torch.bfloat16).logits_bytes(4) > 4 * VOCAB * 4  # widened after


def test_forward_into_matches_linear() -> None:
    torch.manual_seed(1)
    for bias in (False, True):
        lin = Linear(HIDDEN, VOCAB, bias)
        for p in lin.parameters():
            p.data.normal_()
        x = torch.randn(9, HIDDEN)
        out = torch.empty(9, VOCAB)
        with torch.inference_mode():
            assert lin.forward_into(x, out).data_ptr() == out.data_ptr()
            assert torch.equal(out, lin(x))


def test_bad_buffer_is_refused() -> None:
    with pytest.raises(ValueError, match="buffer"):
        StepWorkspace(torch.zeros(4), HIDDEN, INTER, VOCAB, torch.float32, True, True)
