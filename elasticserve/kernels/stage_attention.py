"""Decode attention for sequences whose KV lives in the host tier (LayerKV residency).

Before layer i the runner (worker/layer_stream.py) has copied layer i of every streamed
sequence's host blocks into a one-layer stage, `[stage_blocks, 1, 2, block_size, kv_heads,
head_dim]`, one stage row per distinct host block. Here the new token's K/V is written into its
stage slot (so the attention sees it) and into its host block's slot for layer i (so the next
step's stage copy sees it), then the native decode kernel attends over the stage as a one-layer
cache (layer 0, block tables remapped to stage rows), writing the same output rows as a
resident sequence would. Bit-identical to resident decoding: same kernel, same values, same
summation order; only the block addresses differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from elasticserve.kernels import native

__all__ = ["StagedDecode", "attend_staged"]


@dataclass(slots=True)
class StagedDecode:
    """The streamed decode rows of one step (built once, shared by every layer)."""

    rows: torch.Tensor  # [S] int64: flat token row of each streamed sequence's new token
    resident_rows: torch.Tensor  # [T - S] int64: every other row (paged cache as usual)
    stage_blocks: torch.Tensor  # [S] stage row of each new token's slot
    host_blocks: torch.Tensor  # [S] host block of each new token's slot
    offsets: torch.Tensor  # [S] slot offset inside its block
    work: native.NativeDecode  # the streamed rows, block tables in stage rows
    host: torch.Tensor  # the host tier, [rows, layers, 2, block_size, kv_heads, head_dim]
    stage: torch.Tensor | None = None  # the current layer's stage; set before each layer


def attend_staged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int,
                  staged: StagedDecode, scale: float, out: torch.Tensor) -> None:
    """Write the streamed rows' new K/V (stage and host) and attend them over the stage."""
    stage = staged.stage
    assert stage is not None, "the stage of this layer was not set"
    kr = k.index_select(0, staged.rows).to(stage.dtype)
    vr = v.index_select(0, staged.rows).to(stage.dtype)
    stage[staged.stage_blocks, 0, 0, staged.offsets] = kr
    stage[staged.stage_blocks, 0, 1, staged.offsets] = vr
    staged.host[staged.host_blocks, layer_idx, 0, staged.offsets] = kr
    staged.host[staged.host_blocks, layer_idx, 1, staged.offsets] = vr
    native.decode(q, stage, 0, staged.work, scale, out)
