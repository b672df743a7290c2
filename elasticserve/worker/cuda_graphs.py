"""Decode steps through static buffers: one CUDA graph per bucketed batch size.

A graph replays fixed kernels on fixed addresses, so everything a decode forward pass reads
lives in buffers allocated once here (token ids, positions, KV slots, the Triton kernel's
sequence tables); the KV tensor's address never moves (it is a reserved virtual range), which
is what makes capturing it sound. A batch of ``n`` decode sequences is padded to the smallest
bucket ``b >= n`` with copies of its last sequence: a copy computes the same K/V and writes it
to the same slot as the original, so padding never touches another sequence's blocks (no
scratch block is needed), and its output rows are sliced off.

The class is plain torch: with ``capture=False`` (the CPU) it runs the model eagerly on the
same static buffers, which is how padding, copy-in and slice-out are tested without a GPU. With
``capture=True`` a bucket's graph is captured the first time the bucket runs (while the
buffers already hold that step's real inputs, so the capture's warm-up run writes the step's
own K/V) and replayed afterwards; ``_capture`` is the only CUDA-only code.
"""

from __future__ import annotations

from typing import Any

import torch

from elasticserve.config import EngineConfig
from elasticserve.kernels.attention import AttentionMetadata
from elasticserve.models.llama import CausalLM

__all__ = ["DecodeGraphs", "decode_buckets", "decode_graphs"]

_COLS = 5  # token, position, slot block, slot offset, context length; then the block table


def decode_buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then every 16 up to ``max_batch``."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sorted(set(sizes) | {max_batch})


class DecodeGraphs:
    """Static decode buffers for up to ``max_batch`` sequences of up to ``max_blocks`` blocks."""

    def __init__(self, max_batch: int, max_blocks: int, block_size: int,
                 device: torch.device | str, capture: bool = False) -> None:
        self.buckets = decode_buckets(max_batch)
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.device = torch.device(device)
        self.capture = capture
        top = self.buckets[-1]
        dev = self.device
        # one host -> device copy per step into `stage`, then typed copies on the device
        self.stage = torch.zeros((top, _COLS + max_blocks), dtype=torch.long, device=dev)
        self.input_ids = torch.zeros(top, dtype=torch.long, device=dev)
        self.positions = torch.zeros(top, dtype=torch.long, device=dev)
        self.slot_blocks = torch.zeros(top, dtype=torch.long, device=dev)
        self.slot_offsets = torch.zeros(top, dtype=torch.long, device=dev)
        self.slots = torch.zeros(top, dtype=torch.long, device=dev)
        self.seq_lens = torch.zeros(top, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros((top, max_blocks), dtype=torch.int32, device=dev)
        # decode: sequence i is token i, so these never change
        self.query_start = torch.arange(top + 1, dtype=torch.int32, device=dev)
        self.decode_seqs = torch.arange(top, dtype=torch.int32, device=dev)
        self.no_prefill = torch.zeros(0, dtype=torch.int32, device=dev)
        self._metas: dict[int, AttentionMetadata] = {}
        self.graphs: dict[int, Any] = {}  # bucket -> torch.cuda.CUDAGraph
        self.outputs: dict[int, torch.Tensor] = {}  # bucket -> the graph's hidden states
        self.runs = 0  # steps through these buffers (replayed or, without capture, eager)
        self.replays = 0

    def reset(self) -> None:
        """Drop every captured graph (their memory pools with them): the model changed."""
        self.graphs.clear()
        self.outputs.clear()

    def bucket_for(self, n: int) -> int | None:
        """The smallest bucket holding ``n`` sequences; None: run eagerly (too large)."""
        return next((b for b in self.buckets if b >= n), None)

    def load(self, seqs: list[tuple[int, int, list[int]]]) -> int:
        """Copy one decode step in: (token id, position, block table) per sequence, padded to
        its bucket with copies of the last sequence. Returns the bucket."""
        n = len(seqs)
        b = self.bucket_for(n)
        if n == 0 or b is None:
            raise ValueError(f"decode batch of {n} sequences: buckets go from 1 to "
                             f"{self.buckets[-1]}")
        rows: list[list[int]] = []
        for i, (token, pos, table) in enumerate(seqs):
            if len(table) > self.max_blocks or pos // self.block_size >= len(table):
                raise ValueError(f"seq {i}: block table of {len(table)} blocks cannot hold "
                                 f"position {pos} (at most {self.max_blocks} blocks)")
            rows.append([token, pos, table[pos // self.block_size], pos % self.block_size,
                         pos + 1, *table, *[0] * (self.max_blocks - len(table))])
        host = torch.tensor(rows + [rows[-1]] * (b - n), dtype=torch.long)
        # padding above: the last sequence again (same K/V into the same slot)
        stage = self.stage[:b]
        stage.copy_(host, non_blocking=True)
        for dst, col in ((self.input_ids, 0), (self.positions, 1), (self.slot_blocks, 2),
                         (self.slot_offsets, 3), (self.seq_lens, 4)):
            dst[:b].copy_(stage[:, col])
        self.block_tables[:b].copy_(stage[:, _COLS:])
        torch.add(self.slot_offsets[:b], self.slot_blocks[:b], alpha=self.block_size,
                  out=self.slots[:b])
        return b

    def meta(self, b: int) -> AttentionMetadata:
        """The metadata over bucket ``b``'s views of the static buffers (the Triton path reads
        only tensors; the host lists say where each sequence's one token is)."""
        if b not in self._metas:
            from elasticserve.kernels.triton_attention import TritonWork

            work = TritonWork(self.query_start[:b + 1], self.seq_lens[:b], self.block_tables[:b],
                              self.decode_seqs[:b], self.no_prefill, 0)
            self._metas[b] = AttentionMetadata(
                slot_mapping=self.slots[:b], query_start_loc=list(range(b + 1)), seq_lens=[],
                block_tables=self.block_tables[:b], block_size=self.block_size,
                slot_blocks=self.slot_blocks[:b], slot_offsets=self.slot_offsets[:b],
                decode_only=True, decode_tokens=self.decode_seqs[:b], decode_chunks=[],
                prefills=[], triton_work=work)
        return self._metas[b]

    def run(self, model: CausalLM, kv_cache: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """Hidden states [n, hidden] of the step loaded into bucket ``b``: replayed from its
        graph (captured now if new) or, without capture, run eagerly on the same buffers."""
        self.runs += 1
        if not self.capture:
            return model.forward(self.input_ids[:b], self.positions[:b], kv_cache,
                                 self.meta(b))[:n]
        if b not in self.graphs:
            self._capture(model, kv_cache, b)
        self.graphs[b].replay()
        self.replays += 1
        return self.outputs[b][:n]

    def _capture(self, model: CausalLM, kv_cache: torch.Tensor, b: int) -> None:
        """Warm up on a side stream (Triton compiles, RoPE moves its table), then capture."""
        args = (self.input_ids[:b], self.positions[:b], kv_cache, self.meta(b))
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            model.forward(*args)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.outputs[b] = model.forward(*args)
        self.graphs[b] = graph


def decode_graphs(config: EngineConfig) -> DecodeGraphs | None:
    """The engine's static decode buffers when `cuda_graphs` is on (captured on a GPU only)."""
    if not config.device.cuda_graphs:
        return None
    sched = config.scheduler
    block_size = config.cache.block_size
    return DecodeGraphs(sched.max_num_seqs, -(-sched.max_model_len // block_size), block_size,
                        config.device.device, capture=config.device.device == "cuda")
