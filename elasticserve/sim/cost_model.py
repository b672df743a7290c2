"""Per-step cost of one model on one device: a roofline over FLOPs and bytes moved.

For a step that computes ``tokens`` new tokens across ``num_seqs`` sequences:

* FLOPs = 2 x matmul params x tokens + attention FLOPs, where attention counts every
  (new query token, key token it attends to) pair: a chunk of ``n`` tokens starting at
  position ``s`` attends to ``n*s + n*(n+1)/2`` pairs.
* bytes = all weights read once + KV read per sequence (its context length x KV bytes per
  token; decode reads the whole cache once per step, and so does a prefill chunk to first order).
* time = max(FLOPs / FLOP/s, bytes / bandwidth) + fixed overhead (+ tensor-parallel
  all-reduces: two per layer over the new tokens' activations).

Transfers (swap, weights load) go over the host link; compaction copies over HBM; mapping or
unmapping a page costs ``page_map_s``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from elasticserve.sim.gpu_specs import DeviceSpec
from elasticserve.sim.model_shapes import ModelShape


@dataclass(frozen=True, slots=True)
class StepWork:
    """What one step computes, summed over its sequences."""

    tokens: int
    attn_pairs: int
    kv_tokens_read: int
    num_seqs: int

    @staticmethod
    def from_chunks(chunks: Iterable[tuple[int, int]]) -> StepWork:
        """From ``(start_pos, num_new)`` per scheduled sequence."""
        tokens = pairs = read = seqs = 0
        for start, n in chunks:
            tokens += n
            pairs += n * start + n * (n + 1) // 2
            read += start + n
            seqs += 1
        return StepWork(tokens, pairs, read, seqs)


class CostModel:
    """Step, transfer and mapping times of ``shape`` on ``device``."""

    def __init__(self, device: DeviceSpec, shape: ModelShape) -> None:
        self.device = device
        self.shape = shape
        self.tp = shape.tp
        # hoisted out of the per-step path: the simulator calls step_time once per step
        self._flops_per_token = 2 * shape.matmul_params
        self._attn_flops = shape.attn_flops_per_pair
        self._weights = shape.weights_bytes
        self._kv_per_token = shape.kv_bytes_per_token
        # two all-reduces per layer, each of one token's hidden activations
        self._ar_bytes_per_token = shape.hidden_size * shape.dtype_bytes
        self._ar_calls = 2 * shape.num_layers

    def flops(self, tokens: int, attn_pairs: int) -> float:
        return float(self._flops_per_token * tokens + self._attn_flops * attn_pairs)

    def bytes_moved(self, kv_tokens_read: int) -> float:
        return float(self._weights + self._kv_per_token * kv_tokens_read)

    def step_time(self, tokens: int, attn_pairs: int, kv_tokens_read: int, num_seqs: int) -> float:
        """Seconds for one forward step (0 when nothing is computed)."""
        if tokens <= 0:
            return 0.0
        dev = self.device
        t = dev.step_seconds(self.flops(tokens, attn_pairs), self.bytes_moved(kv_tokens_read),
                             num_seqs, self.tp, weights_bytes=self._weights)
        if self.tp > 1:
            t += self._ar_calls * dev.allreduce_seconds(self._ar_bytes_per_token * tokens, self.tp)
        return t

    def work_time(self, work: StepWork) -> float:
        return self.step_time(work.tokens, work.attn_pairs, work.kv_tokens_read, work.num_seqs)

    def swap_time(self, num_blocks: int, block_bytes: int) -> float:
        """Copy ``num_blocks`` KV blocks between device and host."""
        return self.device.transfer_seconds(num_blocks * block_bytes, self.tp)

    def copy_time(self, num_blocks: int, block_bytes: int) -> float:
        """Copy ``num_blocks`` KV blocks within device memory (compaction, copy-on-write)."""
        return self.device.copy_seconds(num_blocks * block_bytes, self.tp)

    def page_map_time(self, pages: int) -> float:
        """Map or unmap ``pages`` pages (driver calls; every GPU of a TP group in parallel)."""
        return pages * self.device.page_map_s

    def load_weights_time(self) -> float:
        """Wake from sleep: copy every weight from host memory."""
        return self.device.transfer_seconds(self._weights, self.tp)
