"""A KV cache manager whose prefix cache lives on in the host KV tier.

With a host tier (``host_kv_cache_bytes``) and prefix caching on, the engine uses this subclass
of ``KVCacheManager``. A cached device block that the device pool evicts (LRU on allocation, a
reclaim's ``drop_cached``, a shrink, a compaction) is copied to the tier with its hash chain
(``HostPrefixCache``); a prompt whose prefix misses on the device but hits on host gets those
blocks onloaded instead of recomputed.

When the copies happen, and why that is safe:

- Offload (device -> host) is done *at once*, through ``copy_to_host``, from the pool's
  ``on_evict`` hook: the evicted block is cached-free, so its KV is intact, and it is about to
  be handed out (or unmapped, or overwritten by a compaction copy). Its host destination is a
  free host block; host blocks that a pending copy of this step still reads (swap-in and onload
  sources) are pinned until the step's copies ran (``end_step``), so none is handed out here.
- Onload (host -> device) is queued and joins the step's swap-ins (``take_onloads``): the
  destination may be a block a pending swap-out of this step still reads, and swap-outs run
  first. The onloaded blocks stay out of the device prefix cache until the step computed
  (``cache_blocks`` registers them as usual); a request not admitted after all (its blocks
  freed in the same step) drops its onloads, and no one can have hit blocks whose KV never
  arrived.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from elasticserve.core.block_pool import BlockPool
from elasticserve.core.host_prefix import BlockKey, HostPrefixCache
from elasticserve.core.kv_cache_manager import KVCacheManager, _distinct, _Seq
from elasticserve.core.prefix_hash import NO_PARENT, CacheEntry, hash_block

Pairs = list[tuple[int, int]]


class TieredKVCacheManager(KVCacheManager):
    """``KVCacheManager`` plus a host-tier prefix cache (offload on evict, onload on hit)."""

    def __init__(self, pool: BlockPool, block_size: int, num_swap_blocks: int = 0,
                 enable_prefix_caching: bool = True) -> None:
        super().__init__(pool, block_size, num_swap_blocks, enable_prefix_caching)
        self.host_cache = HostPrefixCache(self._host)
        # the engine's device -> host copy, applied at once; None: bookkeeping only (tests)
        self.copy_to_host: Callable[[Pairs], None] | None = None
        self.offload_enabled = True  # off while sleeping: dropping the cache must not fill host
        # elastic storage maps pages for n more device blocks (the scheduler's `grow`): an
        # onload needs its blocks at admission, before the scheduler would grow for the prefill
        self.grow: Callable[[int], bool] | None = None
        # device entry uid -> its host copy: an eviction whose chain is on host stops there
        self._host_of: dict[int, CacheEntry] = {}
        self._onloads: dict[int, Pairs] = {}  # seq id -> (host, device) not yet handed out
        self._pins: list[int] = []  # host blocks read by this step's pending copies
        self.host_prefix_hit_tokens = 0
        self.host_prefix_offloaded_blocks = 0
        self.host_prefix_onloaded_blocks = 0
        if self.enable_prefix_caching:
            pool.on_evict = self._on_evict

    # ---- offload ----------------------------------------------------------------------------
    def _on_evict(self, entry: CacheEntry, intact: bool) -> None:
        try:
            if intact and self.offload_enabled:
                self._offload(entry)
        finally:
            if len(entry.blocks) == 1:  # the device entry dies with this block
                self._host_of.pop(entry.uid, None)

    def _offload(self, entry: CacheEntry) -> None:
        """Keep ``entry``'s chain on host: walk up the device chain only as far as the first
        entry already there (so evicting a long prompt tail first costs O(its length), not
        O(length^2)), then copy the links below it."""
        below: list[CacheEntry] = []
        anchor: CacheEntry | None = None
        device: CacheEntry | None = entry
        while device is not None:
            host = self._host_of.get(device.uid)
            if host is not None and self.host_cache.holds(host):
                anchor = host
                break
            below.append(device)
            if device.key[0] == NO_PARENT:
                break
            device = self._pool.parent_entry(device)
            if device is None:
                return  # a broken chain: no lookup reaches this block, nobody would hit it
        if not below:
            return
        below.reverse()
        links = [(next(iter(d.blocks)), d.key[1], d.key[2]) for d in below]
        copies, kept = self.host_cache.offload(anchor, links)
        for dev_entry, host_entry in zip(below, kept, strict=False):
            self._host_of[dev_entry.uid] = host_entry
        if copies:
            if self.copy_to_host is not None:
                self.copy_to_host(copies)
            self.host_prefix_offloaded_blocks += len(copies)

    # ---- onload -----------------------------------------------------------------------------
    def allocate_prompt(self, seq_id: int, token_ids: Sequence[int]) -> int:
        """As the base class, then extend the device hit with blocks cached on host (queued
        onloads, see ``take_onloads``)."""
        cached = super().allocate_prompt(seq_id, token_ids)
        seq = self._seqs[seq_id]
        limit = (len(token_ids) - 1) // self.block_size  # one token is always left to compute
        if not self.enable_prefix_caching or len(seq.table) >= limit or not len(self.host_cache):
            return cached
        hosts = self.host_cache.lookup(self._prompt_keys(seq, token_ids, limit))[len(seq.table):]
        short = len(hosts) - self._pool.num_free
        if short > 0 and self.grow is not None:
            self.grow(short)
        hosts = hosts[: self._pool.num_free]
        if not hosts:
            return cached
        # pinned first: allocating may evict device blocks, whose offload may evict host ones
        self._pin(hosts)
        devices = self._pool.allocate_many(len(hosts))
        seq.table.extend(devices)
        self._onloads[seq_id] = list(zip(hosts, devices, strict=True))
        seq.num_written = len(seq.table) * self.block_size
        return seq.num_written

    def take_onloads(self) -> Pairs:
        """This step's ``(host, device)`` onloads, to apply with (after) its swap-ins; counts
        them. Call once per step, after ``Scheduler.schedule``."""
        out: Pairs = []
        for seq_id, pairs in self._onloads.items():
            if seq_id in self._seqs:  # else not admitted after all: its blocks went back
                out.extend(pairs)
        self._onloads.clear()
        self.host_prefix_onloaded_blocks += len(out)
        self.host_prefix_hit_tokens += len(out) * self.block_size
        return out

    def end_step(self) -> None:
        """The step's copies ran: unpin the host blocks they read."""
        self._onloads.clear()
        if self._pins:
            self._host.decref(self._pins)
            self._pins.clear()

    def _prompt_keys(self, seq: _Seq, token_ids: Sequence[int], limit: int) -> list[BlockKey]:
        bs, hashes = self.block_size, seq.hashes
        blocks = [tuple(token_ids[i * bs:(i + 1) * bs]) for i in range(limit)]
        for i in range(len(hashes), limit):  # content hashes: cache_blocks agrees with them
            hashes.append(hash_block(hashes[i - 1] if i else None, blocks[i]))
        return list(zip(hashes[:limit], blocks, strict=True))

    def _pin(self, hosts: list[int]) -> None:
        self._host.incref(hosts)
        self._pins.extend(hosts)

    # ---- swap: the host prefix cache yields to preempted sequences ------------------------
    def can_swap_out(self, seq_ids: Sequence[int]) -> bool:
        need = len(_distinct(self._device(s).table for s in seq_ids))
        return need <= self._host.num_free + self.host_cache.evictable()

    def swap_out(self, seq_ids: Sequence[int]) -> Pairs:
        need = len(_distinct(self._device(s).table for s in seq_ids))
        if need > self._host.num_free:
            self.host_cache.evict(need - self._host.num_free)
        return super().swap_out(seq_ids)

    def swap_in(self, seq_ids: Sequence[int]) -> Pairs:
        # the freed host blocks are read by this step's swap-in copies: pinned until end_step
        self._pin(_distinct(self._get(s).table for s in seq_ids if self._get(s).on_host))
        return super().swap_in(seq_ids)

    def append_host_slots(self, seq_id: int, end: int) -> bool:
        need = -(-end // self.block_size) - len(self._get(seq_id).table)
        if need > self._host.num_free:  # a streamed decode's next block: cached blocks yield
            self.host_cache.evict(need - self._host.num_free)
        return super().append_host_slots(seq_id, end)

    def drop_host_cache(self) -> int:
        """Forget every unpinned host prefix block (sleep); returns how many."""
        return self.host_cache.evict()

    def _other_host_refs(self) -> Counter[int]:
        return self.host_cache.refs() + Counter(self._pins)

    def check_integrity(self) -> None:
        super().check_integrity()
        self.host_cache.check_integrity()

    def tier_stats(self) -> dict[str, int]:
        """Host-tier prefix cache counters for ``stats()``."""
        return {"host_prefix_hit_tokens": self.host_prefix_hit_tokens,
                "host_prefix_offloaded_blocks": self.host_prefix_offloaded_blocks,
                "host_prefix_onloaded_blocks": self.host_prefix_onloaded_blocks,
                "host_prefix_cached_blocks": len(self.host_cache)}


def tier_stats(manager: KVCacheManager) -> dict[str, int]:
    """``manager``'s host prefix counters; zeros for a manager without a host tier."""
    if isinstance(manager, TieredKVCacheManager):
        return manager.tier_stats()
    return dict.fromkeys(("host_prefix_hit_tokens", "host_prefix_offloaded_blocks",
                          "host_prefix_onloaded_blocks", "host_prefix_cached_blocks"), 0)
