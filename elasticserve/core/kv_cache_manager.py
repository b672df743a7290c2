"""Per-sequence block tables over a device BlockPool and a host swap pool.

Copy lists returned by ``append_slots``, ``swap_out``, ``swap_in`` and
``relocate`` must be applied before the next forward pass, in list order, and
swap-outs before anything else in the same step: a source freed here may be
handed out again as a destination later in the same step.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from elasticserve.core.block_pool import BlockPool, IntegrityError
from elasticserve.core.host_blocks import HostBlocks
from elasticserve.core.prefix_hash import hash_block


@dataclass(slots=True)
class _Seq:
    table: list[int] = field(default_factory=list)
    on_host: bool = False
    # Chained hashes of the sequence's leading full blocks (content-derived,
    # so they survive swaps and relocation).
    hashes: list[int] = field(default_factory=list)
    # Leading table entries registered in the device prefix cache.
    num_hashed: int = 0
    # Token slots written so far; a write below this rewrites content.
    num_written: int = 0


class KVCacheManager:
    """Maps sequence ids to KV blocks: allocation, prefix reuse, COW, swap, compaction."""

    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        num_swap_blocks: int = 0,
        enable_prefix_caching: bool = True,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self._pool = pool
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching and pool.enable_caching
        self._seqs: dict[int, _Seq] = {}
        self._host = HostBlocks(num_swap_blocks)

    @property
    def pool(self) -> BlockPool:
        """The device block pool."""
        return self._pool

    @property
    def num_free_blocks(self) -> int:
        """Free device blocks (cached-free included)."""
        return self._pool.num_free

    @property
    def host_blocks(self) -> HostBlocks:
        """The host pool's accounting (swap area or host KV tier)."""
        return self._host

    @property
    def num_free_swap_blocks(self) -> int:
        """Free host swap blocks."""
        return self._host.num_free

    @property
    def usage(self) -> float:
        """Fraction of device capacity in use."""
        cap = self._pool.num_blocks
        return self._pool.num_used / cap if cap else 0.0

    def block_table(self, seq_id: int) -> list[int]:
        """The live block table (host ids while swapped). Do not mutate."""
        return self._get(seq_id).table

    def has_seq(self, seq_id: int) -> bool:
        """Whether the manager tracks ``seq_id``."""
        return seq_id in self._seqs

    def is_swapped(self, seq_id: int) -> bool:
        """Whether ``seq_id`` currently lives in the host swap pool."""
        return self._get(seq_id).on_host

    def allocate_prompt(self, seq_id: int, token_ids: Sequence[int]) -> int:
        """Start a sequence, reusing cached prompt blocks; return tokens already computed.

        At least one prompt token is always left to compute, so that the
        runner produces logits for the last one.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} already exists")
        seq = _Seq()
        self._seqs[seq_id] = seq
        if not self.enable_prefix_caching:
            return 0
        bs, pool = self.block_size, self._pool
        parent: int | None = None
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = hash_block(seq.hashes[-1] if seq.hashes else None, tokens)
            seq.hashes.append(h)
            hit = pool.lookup(h, tokens, parent)
            if hit is None:
                break
            seq.table.append(hit)
            parent = hit
        for block in seq.table:
            pool.incref(block)
        seq.num_hashed = len(seq.table)
        seq.num_written = len(seq.table) * bs
        return seq.num_written

    def num_blocks_needed(self, seq_id: int, num_total_tokens: int, num_computed: int | None = None) -> int:
        """Extra device blocks (COW copies included) to hold ``num_total_tokens``.

        Writes start at ``num_computed``, defaulting to the slots written so far.
        """
        seq = self._device(seq_id)
        start = seq.num_written if num_computed is None else num_computed
        if self._tail_append_ok(seq, start, num_total_tokens):
            return 0
        new = -(-num_total_tokens // self.block_size) - len(seq.table)
        return max(new, 0) + len(self._cow_indices(seq, start, num_total_tokens))

    def append_slots(self, seq_id: int, num_computed: int, num_new: int) -> list[tuple[int, int]]:
        """Make room for tokens ``[num_computed, num_computed + num_new)``.

        Returns ``(src, dst)`` copy-on-write copies for written blocks that were
        shared or held prefix-cache content. All or nothing.
        """
        seq = self._device(seq_id)
        end = num_computed + num_new
        if num_new <= 0:
            return []
        if self._tail_append_ok(seq, num_computed, end):
            seq.num_written = end
            return []
        return self._append_slow(seq, num_computed, end)

    def cache_blocks(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        """Register blocks made full and computed by ``num_computed`` in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        seq = self._device(seq_id)
        bs, table, hashes = self.block_size, seq.table, seq.hashes
        full = min(num_computed // bs, len(table), len(token_ids) // bs)
        if full <= seq.num_hashed:
            return
        for i in range(seq.num_hashed, full):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            if i == len(hashes):
                hashes.append(hash_block(hashes[i - 1] if i else None, tokens))
            parent = table[i - 1] if i else None
            self._pool.set_hash(table[i], hashes[i], tokens, parent)
        seq.num_hashed = full

    def fork(self, parent_id: int, child_id: int) -> None:
        """Make ``child_id`` share every block of ``parent_id``."""
        parent = self._device(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id} already exists")
        for block in parent.table:
            self._pool.incref(block)
        self._seqs[child_id] = _Seq(
            list(parent.table), False, list(parent.hashes), parent.num_hashed, parent.num_written
        )

    def free(self, seq_id: int) -> None:
        """Release every block of the sequence and forget it."""
        seq = self._get(seq_id)
        del self._seqs[seq_id]
        if seq.on_host:
            self._host.decref(seq.table)
            return
        # Tail first, so the LRU evicts a prefix's deepest blocks before its root.
        for block in reversed(seq.table):
            self._pool.free(block)

    def can_swap_out(self, seq_ids: Sequence[int]) -> bool:
        """Whether the host pool can take every distinct block of ``seq_ids``."""
        seqs = [self._device(s) for s in seq_ids]
        return len(_distinct(s.table for s in seqs)) <= self._host.num_free

    def swap_out(self, seq_ids: Sequence[int]) -> list[tuple[int, int]]:
        """Move sequences to host; returns ``(device, host)`` copies. All or nothing."""
        seqs = self._unique(seq_ids, on_host=False)
        mapping = self._host.take(_distinct(s.table for s in seqs))
        for seq in seqs:
            for block in reversed(seq.table):
                self._pool.free(block)
            seq.table[:] = [mapping[b] for b in seq.table]
            self._host.incref(seq.table)
            # The device copies may be evicted while we are away; the next
            # cache_blocks re-registers whatever device blocks we come back to.
            seq.on_host, seq.num_hashed = True, 0
        return list(mapping.items())

    def append_host_slots(self, seq_id: int, end: int) -> bool:
        """Room for a swapped-out sequence's tokens up to ``end`` in host blocks (it decodes
        from the host tier, core/sched_stream.py); False, and no change, if the pool is full."""
        seq = self._get(seq_id)
        need = -(-end // self.block_size) - len(seq.table)
        if need > self._host.num_free or not seq.on_host:
            return False
        if need > 0:
            fresh = list(self._host.take(list(range(-need, 0))).values())
            self._host.incref(fresh)
            seq.table.extend(fresh)
        return True

    def num_blocks_needed_for_swap_in(self, seq_ids: Sequence[int]) -> int:
        """Device blocks ``swap_in(seq_ids)`` would allocate (shared blocks count once)."""
        seqs = [self._get(s) for s in seq_ids]
        if not all(s.on_host for s in seqs):
            raise ValueError("swap-in needs swapped-out sequences")
        return len(_distinct(s.table for s in seqs))

    def can_swap_in(self, seq_ids: Sequence[int]) -> bool:
        """Whether the device pool can take every distinct host block of ``seq_ids``."""
        return self.num_blocks_needed_for_swap_in(seq_ids) <= self._pool.num_free

    def swap_in(self, seq_ids: Sequence[int]) -> list[tuple[int, int]]:
        """Bring sequences back; returns ``(host, device)`` copies. All or nothing."""
        seqs = self._unique(seq_ids, on_host=True)
        refs = Counter(h for s in seqs for h in s.table)
        mapping = dict(zip(refs, self._pool.allocate_many(len(refs)), strict=True))
        for host, count in refs.items():
            for _ in range(count - 1):
                self._pool.incref(mapping[host])
        for seq in seqs:
            self._host.decref(seq.table)
            seq.table[:] = [mapping[h] for h in seq.table]
            seq.on_host = False
        return list(mapping.items())

    def relocate(self, min_block_id: int) -> list[tuple[int, int]]:
        """Move live device blocks >= ``min_block_id`` below it; returns ``(src, dst)``.

        Raises NoFreeBlocksError (no change) when there is no room below.
        Shrink the pool right after: the vacated ids are free again.
        """
        mapping = self._pool.relocate(min_block_id)
        if mapping:
            for seq in self._seqs.values():
                if not seq.on_host and any(b >= min_block_id for b in seq.table):
                    seq.table[:] = [mapping.get(b, b) for b in seq.table]
        return list(mapping.items())

    def _get(self, seq_id: int) -> _Seq:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise KeyError(f"unknown sequence {seq_id}")
        return seq

    def _device(self, seq_id: int) -> _Seq:
        seq = self._get(seq_id)
        if seq.on_host:
            raise ValueError(f"sequence {seq_id} is swapped out")
        return seq

    def _unique(self, seq_ids: Sequence[int], on_host: bool) -> list[_Seq]:
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"duplicate sequence ids in {list(seq_ids)}")
        seqs = [self._get(s) for s in seq_ids]
        if any(s.on_host != on_host for s in seqs):
            where = "host" if on_host else "device"
            raise ValueError(f"every sequence must be on the {where}")
        return seqs

    def _tail_append_ok(self, seq: _Seq, start: int, end: int) -> bool:
        """Typical decode: fresh slots inside the private, uncached tail block."""
        table = seq.table
        n = len(table)
        return (
            n > 0
            and seq.num_written <= start
            and (n - 1) * self.block_size <= start
            and end <= n * self.block_size
            and self._pool.is_private(table[-1])
        )

    def _cow_indices(self, seq: _Seq, start: int, end: int) -> list[int]:
        """Table positions in the write range that must be made private first."""
        pool, table, bs = self._pool, seq.table, self.block_size
        stop = min(len(table), -(-end // bs))
        return [i for i in range(start // bs, stop) if not pool.is_private(table[i])]

    def _append_slow(self, seq: _Seq, start: int, end: int) -> list[tuple[int, int]]:
        table, bs = seq.table, self.block_size
        cow = self._cow_indices(seq, start, end)
        new = max(-(-end // bs) - len(table), 0)
        fresh = self._pool.allocate_many(len(cow) + new)  # raises before any change
        copies = []
        for i, dst in zip(cow, fresh, strict=False):
            src = table[i]
            table[i] = dst
            self._pool.free(src)
            copies.append((src, dst))
        table.extend(fresh[len(cow) :])
        if start < seq.num_written:
            # Rewriting earlier slots invalidates their hashes from here on.
            first = start // bs
            del seq.hashes[first:]
            seq.num_hashed = min(seq.num_hashed, first)
        seq.num_written = max(seq.num_written, end) if start >= seq.num_written else end
        return copies

    def check_integrity(self) -> None:
        """Raise IntegrityError unless ref counts equal table references."""
        pool = self._pool
        pool.check_integrity()
        device, host = Counter[int](), Counter[int]()
        for sid, seq in self._seqs.items():
            (host if seq.on_host else device).update(seq.table)
            hashed = seq.table[: seq.num_hashed]
            if seq.num_hashed > len(seq.table) or seq.num_hashed > len(seq.hashes):
                raise IntegrityError(f"seq {sid}: num_hashed exceeds its table or hashes")
            if not seq.on_host and not all(pool.is_cached(b) for b in hashed):
                raise IntegrityError(f"seq {sid}: a hashed block lost its cache entry")
        if any(b >= pool.num_blocks for b in device):
            raise IntegrityError("a block table references an id beyond capacity")
        for b in range(pool.num_blocks):
            if pool.ref_count(b) != device[b]:
                raise IntegrityError(f"block {b}: ref {pool.ref_count(b)} != {device[b]} refs")
        self._host.check_integrity(host + self._other_host_refs())

    def _other_host_refs(self) -> Counter[int]:
        """Host block references held outside block tables (a subclass's host prefix cache)."""
        return Counter()


def _distinct(tables: Iterable[list[int]]) -> list[int]:
    return list(dict.fromkeys(b for table in tables for b in table))
