"""Host memory as an elastic KV tier: a second page pool that preempted sequences' KV moves to
(offload) instead of being dropped for recompute, and comes back from (onload).

The tier is a `VirtualTensor` over its own host backend (memfd pages, memory/host.py), rows =
host block ids, the same `[layers, 2, block_size, kv_heads, head_dim]` block as the device
cache, so an offload or onload is one real indexed copy per step (the runner's swap-out and
swap-in; `ModelRunner.apply_block_ops`). It is elastic like the device cache: pages are mapped
when a block id beyond the mapped rows is taken (`HostBlocks.on_take`, before the copy is
applied) and unmapped after a step once no live host block lies in them (`shrink`). Host ids are
handed out lowest first, so live blocks gather at the bottom and freed tails really go back.
The accounting (which blocks, how many) is `core.host_blocks.HostBlocks`, the same object the
fixed swap area uses; the tier only replaces where the bytes live and how many there may be.

On CUDA the tier would be pinned host memory (`cudaHostRegister` of each page as it is mapped,
unregistered before unmap) so the copies are DMA over the link and may run on a copy stream;
not done: the device here is the CPU, where "host" and "device" are the same RAM and the copy
costs what a memcpy costs.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from elasticserve.config import CacheConfig
from elasticserve.core.host_blocks import HostBlocks
from elasticserve.core.scheduler import Scheduler
from elasticserve.errors import InvalidFieldError
from elasticserve.memory.backend import DEFAULT_PAGE_SIZE, round_up
from elasticserve.memory.factory import get_backend
from elasticserve.memory.vtensor import VirtualTensor
from elasticserve.outputs import SchedulerOutput
from elasticserve.worker.layer_stream import LayerStream
from elasticserve.worker.model_runner import ModelRunner


class HostKVTier:
    """Up to `nbytes` of host KV blocks, mapped page by page as they are used."""

    def __init__(self, nbytes: int, page_size: int | None, block_shape: tuple[int, ...],
                 dtype: torch.dtype) -> None:
        backend = get_backend("host", page_size or DEFAULT_PAGE_SIZE)
        block_bytes = math.prod(block_shape) * dtype.itemsize
        if nbytes < block_bytes:
            backend.close()
            raise InvalidFieldError("host_kv_cache_bytes",
                                    f"host_kv_cache_bytes={nbytes} must hold at least one KV "
                                    f"block ({block_bytes} bytes)")
        self.block_bytes = block_bytes
        self.vt = VirtualTensor(backend, round_up(nbytes, backend.page_size), dtype, block_shape)
        self.num_blocks = min(nbytes // block_bytes, self.vt.max_rows)
        self.blocks: HostBlocks | None = None
        self.grow_events = self.shrink_events = 0
        self.stream: LayerStream | None = None  # layerwise_residency's stage (attach_stream)

    @property
    def tensor(self) -> torch.Tensor:
        """`[rows, *block_shape]` over the reserved range; its address never changes."""
        return self.vt.tensor

    def attach(self, blocks: HostBlocks) -> None:
        """Map pages whenever `blocks` hands out an id beyond the mapped rows."""
        if blocks.num_blocks != self.num_blocks:
            raise ValueError(f"host pool has {blocks.num_blocks} blocks, tier {self.num_blocks}")
        self.blocks = blocks
        blocks.on_take = self.ensure_rows

    def ensure_rows(self, rows: int) -> None:
        need = self.vt.pages_for_rows(rows) - self.vt.mapped_pages
        if need > 0:
            self.vt.map_pages(need)
            self.grow_events += 1

    def shrink(self) -> None:
        """Unmap the pages above the highest live host block (after a step, under the lock)."""
        if self.blocks is None or not self.vt.mapped_pages:
            return
        live = self.blocks.high_water(self.vt.rows_mapped) if self.blocks.num_used else 0
        extra = self.vt.mapped_pages - self.vt.pages_for_rows(live)
        if extra > 0:
            self.vt.unmap_pages(extra)
            self.shrink_events += 1

    def check_integrity(self) -> None:
        """Every live host block lies in mapped memory."""
        assert self.blocks is not None
        live = self.blocks.high_water()
        assert live <= self.vt.rows_mapped, f"host block {live - 1} is not mapped"

    def memory_stats(self) -> dict[str, int]:
        used = self.blocks.num_used if self.blocks is not None else 0
        return {"host_kv_reserved_bytes": self.num_blocks * self.block_bytes,
                "host_kv_mapped_bytes": self.vt.mapped_bytes,
                "host_kv_used_bytes": used * self.block_bytes,
                "host_kv_grow_events": self.grow_events,
                "host_kv_shrink_events": self.shrink_events,
                "kv_stage_bytes": 0 if self.stream is None else self.stream.stage_bytes}

    def close(self) -> None:
        self.vt.close()
        self.vt.backend.close()


def attach_stream(cache: CacheConfig, tier: HostKVTier | None, runner: ModelRunner) -> None:
    """With `layerwise_residency`, give the runner a stage over the tier (worker/layer_stream.py);
    its bytes show in memory_stats (`kv_stage_bytes`)."""
    if not cache.layerwise_residency:
        return
    if tier is None:
        raise InvalidFieldError("layerwise_residency", "layerwise_residency needs the host KV "
                                "tier (host_kv_cache_bytes)")
    if not runner.native_decode:  # "auto" fell back to torch: no compiler here
        raise InvalidFieldError("layerwise_residency", "layerwise_residency needs the native "
                                "attention backend, which is unavailable here")
    tier.stream = runner.stream = LayerStream(tier.tensor)


def stream_stats(scheduler: Scheduler, runner: ModelRunner) -> dict[str, Any]:
    """`stats()` counters of layerwise residency (zeros when it is off)."""
    return {"kv_streamed_sequences": scheduler.num_streamed(),
            "kv_streamed_steps": scheduler.stats.kv_streamed_steps,
            "kv_streamed_prefill_tokens": scheduler.stats.kv_streamed_prefill_tokens,
            "kv_stream_guarded": scheduler.stats.kv_stream_guarded,
            "kv_streamed_layer_bytes": 0 if runner.stream is None else runner.stream.layer_bytes}


def observe_stream(scheduler: Scheduler, runner: ModelRunner, out: SchedulerOutput,
                   step_s: float) -> None:
    """After a step that ran something, tell the scheduler's TPOT guard (core/stream_guard.py)
    its seconds and what its stage copies cost (worker/layer_stream.py measures them); free the
    stage once no group is streamed."""
    if runner.stream is None or not out.scheduled:
        return  # no residency, or an idle step (its seconds say nothing of a decode's)
    copy_s, blocks = runner.stream.pop_cost()
    scheduler.observe_stream_cost(step_s, copy_s, blocks)
    if scheduler.num_streamed() == 0:
        runner.stream.release()  # nobody streams now: the stage's memory goes back


def stream_max_blocks(cache: CacheConfig, device_blocks: int, tier: HostKVTier | None) -> int:
    """The largest prompt (in blocks) a request may bring: the device's ceiling, or with
    layerwise_residency the tier's size if larger (a streamed prefill lives in the tier)."""
    if not cache.layerwise_residency or tier is None:
        return device_blocks
    return max(device_blocks, tier.num_blocks)
