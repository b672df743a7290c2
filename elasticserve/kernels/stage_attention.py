"""Attention for sequences whose KV lives in the host tier (LayerKV residency).

Before layer i the runner (worker/layer_stream.py) has copied layer i of every streamed
sequence's host blocks into a one-layer stage, `[stage_blocks, 1, 2, block_size, kv_heads,
head_dim]`, one stage row per distinct host block. Here the new token's K/V is written into its
stage slot (so the attention sees it) and into its host block's slot for layer i (so the next
step's stage copy sees it), then the native decode kernel attends over the stage as a one-layer
cache (layer 0, block tables remapped to stage rows), writing the same output rows as a
resident sequence would. Bit-identical to resident decoding: same kernel, same values, same
summation order; only the block addresses differ. A streamed prefill chunk is written the same
way (every token of the chunk); its attention is kernels/attention.py's prefill path (SDPA,
causal in the chunk over the prefix) run over the stage, `StagedDecode.prefills`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from elasticserve.kernels import native

if TYPE_CHECKING:  # attention.py imports this module
    from elasticserve.kernels.attention import PrefillSeq

__all__ = ["StagedDecode", "attend_staged"]


@dataclass(slots=True)
class StagedDecode:
    """The streamed rows of one step (built once, shared by every layer)."""

    rows: torch.Tensor  # [S] int64: flat token row of each streamed new token
    resident_rows: torch.Tensor  # [T - S] int64: every other row (paged cache as usual)
    stage_blocks: torch.Tensor  # [S] stage row of each new token's slot
    host_blocks: torch.Tensor  # [S] host block of each new token's slot
    offsets: torch.Tensor  # [S] slot offset inside its block
    work: native.NativeDecode | None  # the streamed decode rows, block tables in stage rows
    host: torch.Tensor  # the host tier, [rows, layers, 2, block_size, kv_heads, head_dim]
    stage: torch.Tensor | None = None  # the current layer's stage; set before each layer
    # streamed prefill chunks, blocks in stage rows (attended by attention.py's prefill path)
    prefills: list[PrefillSeq] = field(default_factory=list)


def attend_staged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int,
                  staged: StagedDecode, scale: float, out: torch.Tensor) -> None:
    """Write the streamed rows' new K/V (stage and host) and attend the decode rows over the
    stage (the prefill rows are the caller's)."""
    stage = staged.stage
    assert stage is not None, "the stage of this layer was not set"
    kr = k.index_select(0, staged.rows).to(stage.dtype)
    vr = v.index_select(0, staged.rows).to(stage.dtype)
    stage[staged.stage_blocks, 0, 0, staged.offsets] = kr
    stage[staged.stage_blocks, 0, 1, staged.offsets] = vr
    staged.host[staged.host_blocks, layer_idx, 0, staged.offsets] = kr
    staged.host[staged.host_blocks, layer_idx, 1, staged.offsets] = vr
    if staged.work is not None:
        native.decode(q, stage, 0, staged.work, scale, out)
