"""The host KV tier in the simulator: group offload (as the engine) and layer-wise spill
(LayerKV), as a cost and capacity model. Torch-free.

Two parts, two host budgets (``SimConfig.host_kv_bytes`` and ``SimConfig.layer_offload_bytes``):

* **Group offload** is the engine's tier (engine/host_tier.py): ``CacheConfig.host_kv_cache_bytes``
  sizes the core ``HostBlocks`` pool and makes the core scheduler (core/sched_preempt.py,
  ``choose_swap``) offload every preemption victim instead of recomputing it; it comes back by
  the scheduler's swap-in. Policy and accounting are the core's; the simulator only prices the
  copies: bytes / host link (``GpuSpec.host_bw x host_eff``, ~51 GB/s on an H100's PCIe 5
  x16), **not overlapped** with compute, because the engine applies offload/onload copies
  before the forward pass (``ModelRunner.apply_block_ops``).
* **Layer-wise spill** (this module's :class:`LayerSpill`): when the arbiter has no device page
  left for a grow, the pages the core ``ElasticPages`` asks for are granted from host memory
  instead, so a long prefill starts (and decodes keep running) without waiting for device KV.
  Convention: the top ``host_pages`` of a model's mapped range are host-backed. The block pool
  hands out the lowest free id first and ``ElasticPages`` compacts before unmapping, so live
  blocks fill device rows first and spill pages are the first to go back. Every step, the KV of
  the scheduled sequences' blocks in host rows crosses the link layer by layer just ahead of
  the layer that reads it (context read by attention: host -> device; a chunk's new KV in host
  rows: device -> host), on a copy stream **overlapped** with compute: a step takes
  ``max(compute, link time)`` (the link is full duplex: the larger direction counts).

Assumptions (not measured): the device working space of the streamed layers (double-buffered,
``2/num_layers`` of the streamed bytes) is not charged; a chunked prefill re-reads its spilled
context every chunk (a one-shot prefill, as LayerKV's, would write each layer once and never
read it back); pages move back to the device (promotion, overlapped with the next step) as soon
as the arbiter has free pages; a spilling model offers no pages to neighbours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from elasticserve.core.arbiter import Arbiter
from elasticserve.core.block_pool import BlockPool
from elasticserve.outputs import ScheduledSeq
from elasticserve.sim.cost_model import CostModel


class LayerSpill:
    """Host-backed pages on top of a model's device pages, and the link time they cost.

    Also the ``PageBroker`` of the model's ``ElasticPages``: device pages from the arbiter
    first, then up to ``max_host_pages`` from host memory."""

    def __init__(self, arbiter: Arbiter, name: str, cost: CostModel, block_bytes: int,
                 block_size: int, max_host_pages: int) -> None:
        if max_host_pages < 0:
            raise ValueError(f"layer_offload_bytes must be >= 0, got {max_host_pages} pages")
        self.arbiter, self.name, self.cost = arbiter, name, cost
        self.block_bytes, self.block_size = block_bytes, block_size
        self.max_host_pages = max_host_pages
        self.host_pages = 0
        self.pool: BlockPool | None = None
        self.mapped: Callable[[], int] = lambda: 0  # the model's mapped pages (set by attach)
        self.pending_link_bytes = 0  # promotions: copied beside the next step
        self.peak_host_pages = 0
        self.streamed_bytes = 0  # every byte a step moved over the link for spilled KV
        self.promoted_blocks = 0

    # ---- PageBroker -------------------------------------------------------------------------
    def grant(self, pages: int, at_least: int) -> int:
        got = self.arbiter.request(self.name, pages, at_least=at_least)
        if got:
            self._promote(got)
            return got
        device = self.arbiter.request(self.name, pages, at_least=0)
        host = min(pages - device, self.max_host_pages - self.host_pages)
        if device + host < at_least or host <= 0:
            if device:
                self.arbiter.release(self.name, device)
            return 0
        self._promote(device)
        self.host_pages += host
        self.peak_host_pages = max(self.peak_host_pages, self.host_pages)
        return device + host

    def release(self, pages: int) -> None:
        """The top pages go first: host-backed ones, then device pages to the arbiter."""
        host = min(pages, self.host_pages)
        self.host_pages -= host
        if pages > host:
            self.arbiter.release(self.name, pages - host)

    # ---- rows and costs ---------------------------------------------------------------------
    @property
    def device_rows(self) -> int:
        """Rows below this id are device memory; the rest of the pool is host-backed."""
        if self.pool is None:
            return 0
        page = self.arbiter.page_size
        return min(self.pool.num_blocks,
                   (self.mapped() - self.host_pages) * page // self.block_bytes)

    def _promote(self, device_pages: int) -> None:
        """New device pages at the top turn the lowest host-backed pages into device ones:
        their live blocks are copied to the device (beside the next step)."""
        moved = min(device_pages, self.host_pages)
        if moved <= 0 or self.pool is None:
            return
        lo = self.device_rows
        hi = min(self.pool.num_blocks, lo + moved * self.arbiter.page_size // self.block_bytes)
        live = sum(1 for b in range(lo, hi) if self.pool.ref_count(b))
        self.pending_link_bytes += live * self.block_bytes
        self.promoted_blocks += live
        self.host_pages -= moved

    def try_promote(self) -> None:
        """After a step: take free device pages from the arbiter in place of host-backed ones."""
        if self.host_pages and self.arbiter.free_pages > 0:
            self._promote(self.arbiter.request(
                self.name, min(self.host_pages, self.arbiter.free_pages), at_least=0))

    def link_time(self, scheduled: Iterable[ScheduledSeq]) -> float:
        """Seconds the link needs this step for spilled KV (plus pending promotions)."""
        pending, self.pending_link_bytes = self.pending_link_bytes, 0
        if not self.host_pages:
            if pending:
                self.streamed_bytes += pending
                return self.cost.device.transfer_seconds(pending, self.cost.tp)
            return 0.0
        edge, bs = self.device_rows, self.block_size
        read = written = 0
        for item in scheduled:
            table = item.block_table
            first_new = item.start_pos // bs
            end = -(-(item.start_pos + len(item.token_ids)) // bs)
            read += sum(1 for b in table[:first_new] if b >= edge)
            written += sum(1 for b in table[first_new:end] if b >= edge)
        nbytes = max(read * self.block_bytes + pending, written * self.block_bytes)
        self.streamed_bytes += read * self.block_bytes + written * self.block_bytes + pending
        return self.cost.device.transfer_seconds(nbytes, self.cost.tp)

    def stats(self) -> dict[str, float]:
        page = self.arbiter.page_size
        return {"spill_peak_gib": self.peak_host_pages * page / 2**30,
                "spill_streamed_gib": self.streamed_bytes / 2**30,
                "spill_promoted_blocks": self.promoted_blocks}

    def check_integrity(self) -> None:
        """Host-backed pages within budget; the arbiter granted exactly the device pages."""
        mapped = self.mapped()
        if not 0 <= self.host_pages <= min(self.max_host_pages, mapped):
            raise AssertionError(f"{self.name}: {self.host_pages} host-backed pages of "
                                 f"{mapped} mapped (max {self.max_host_pages})")
        granted = self.arbiter.kv_pages(self.name)
        if granted != mapped - self.host_pages:
            raise AssertionError(f"{self.name}: arbiter granted {granted} pages, "
                                 f"{mapped - self.host_pages} are device pages")


def tier_parts(arbiter: Arbiter, name: str, cost: CostModel, block_bytes: int, block_size: int,
               host_kv_bytes: int, layer_offload_bytes: int,
               policy: str) -> tuple[LayerSpill | None, int | None]:
    """The tier of one model: (its layer-wise spill, its ``CacheConfig.host_kv_cache_bytes``);
    (None, None) unless ``policy`` is "tiered" (and for a zero budget). ValueError names a
    negative budget."""
    for field, value in (("host_kv_bytes", host_kv_bytes),
                         ("layer_offload_bytes", layer_offload_bytes)):
        if value < 0:
            raise ValueError(f"{field} must be >= 0, got {value}")
    if policy != "tiered":
        return None, None
    spill = (LayerSpill(arbiter, name, cost, block_bytes, block_size,
                        layer_offload_bytes // arbiter.page_size)
             if layer_offload_bytes > 0 else None)
    return spill, host_kv_bytes or None
