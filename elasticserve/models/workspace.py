"""A step's workspace: where the largest intermediates of one forward pass are written.

The engine maps pages of a reserved range for a step (engine/workspace.py, granted by the
same budget as KV pages) and hands the model this view of it; the model writes its largest
buffers into it with `out=` instead of asking the allocator. Which buffers, and why those:

- the MLP's fused gate/up output `[tokens, 2 * intermediate]` and its activation
  `[tokens, intermediate]`: the largest per-layer tensors (intermediate is ~2.7-3.5x hidden;
  q/k/v, attention and o_proj outputs are about `[tokens, hidden]`), one buffer reused by every
  layer, since a layer's MLP scratch is dead once its down projection has run;
- the sampled rows' logits `[rows, vocab]` (fp32): after the last layer, so they reuse the
  MLP's bytes (the need is the larger of the two, not the sum).

A oneDNN-packed linear (`linear_backend` mkldnn) has no `out=` form: its output stays with
the allocator and is not counted in the need (`gate_up_placed` / `logits_placed` False).
"""

from __future__ import annotations

from typing import Protocol

import torch

ALIGN = 256  # bytes: every region starts on a cache-line and GPU-friendly boundary


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class StepWorkspace:
    """Views of one byte buffer, valid while `active` (set by the runner for a step)."""

    def __init__(self, buffer: torch.Tensor, hidden: int, intermediate: int, vocab: int,
                 dtype: torch.dtype, gate_up_placed: bool, logits_placed: bool) -> None:
        if buffer.dtype != torch.uint8 or buffer.dim() != 1:
            raise ValueError("buffer must be a flat uint8 tensor")
        self.buffer = buffer
        self.hidden, self.intermediate, self.vocab = hidden, intermediate, vocab
        self.dtype = dtype
        self.gate_up_placed = gate_up_placed
        self.logits_placed = logits_placed
        self.active = False
        self.limit = 0  # bytes usable in this step (mapped and asked for)

    # ---- sizes ----------------------------------------------------------------------------
    def mlp_bytes(self, tokens: int) -> int:
        size = self.dtype.itemsize
        gate_up = _align(tokens * 2 * self.intermediate * size) if self.gate_up_placed else 0
        return gate_up + _align(tokens * self.intermediate * size)

    def logits_bytes(self, rows: int) -> int:
        if not self.logits_placed or rows <= 0:
            return 0
        fp32 = _align(rows * self.vocab * 4)
        # a non-fp32 model writes its logits in its dtype first, then widens them
        return fp32 + (0 if self.dtype == torch.float32 else _align(rows * self.vocab *
                                                                     self.dtype.itemsize))

    def need_bytes(self, tokens: int, rows: int) -> int:
        """Bytes a step of `tokens` new tokens sampling `rows` rows writes here."""
        return max(self.mlp_bytes(tokens) if tokens > 0 else 0, self.logits_bytes(rows))

    # ---- views (None: not placed here; the caller allocates as usual) ------------------------
    def _view(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype
              ) -> torch.Tensor | None:
        n = dtype.itemsize
        for dim in shape:
            n *= dim
        if not self.active or offset + n > self.limit:
            return None
        return self.buffer[offset:offset + n].view(dtype).view(shape)

    def gate_up(self, tokens: int) -> torch.Tensor | None:
        if not self.gate_up_placed:
            return None
        return self._view(0, (tokens, 2 * self.intermediate), self.dtype)

    def activation(self, tokens: int) -> torch.Tensor | None:
        size = self.dtype.itemsize
        offset = _align(tokens * 2 * self.intermediate * size) if self.gate_up_placed else 0
        return self._view(offset, (tokens, self.intermediate), self.dtype)

    def logits(self, rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(where the projection writes, the fp32 logits): the same tensor for fp32."""
        if not self.logits_placed:
            return None
        out = self._view(0, (rows, self.vocab), torch.float32)
        if out is None or self.dtype == torch.float32:
            return None if out is None else (out, out)
        raw = self._view(_align(rows * self.vocab * 4), (rows, self.vocab), self.dtype)
        return None if raw is None else (raw, out)


class WorkspaceSource(Protocol):
    """What the runner asks of the engine's workspace arena (engine/workspace.py)."""

    def begin(self, tokens: int, rows: int) -> StepWorkspace | None:
        """Map (and have granted) the bytes a step needs; the active view, or None: the step
        allocates as usual (the refusal is counted)."""
        ...

    def end(self) -> None:
        """The step's views are dead (its pages are given back after the step)."""
        ...
