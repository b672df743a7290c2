"""Reference-counted pool of KV block ids with an LRU prefix cache.

Block ids are ``0..num_blocks-1``. The elastic memory layer backs a *prefix*
of the id space with physical pages, so capacity grows by appending ids and
shrinks by removing the highest ones. Allocation therefore hands out the
lowest free id first, which keeps free blocks gathered at the top.

A block is in exactly one state:

* used: ``ref_count > 0`` (it may also carry a prefix-cache entry);
* cached-free: ``ref_count == 0`` with a cache entry, queued in LRU order;
* free: ``ref_count == 0`` without an entry, in a min-heap of ids.

Cache entries live in a ``PrefixIndex`` (see ``prefix_hash``), which verifies
tokens and parent identity on every hit.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable

from elasticserve.core.errors import IntegrityError, NoFreeBlocksError
from elasticserve.core.prefix_hash import CacheEntry, PrefixIndex

__all__ = ["BlockPool", "IntegrityError", "NoFreeBlocksError"]


class BlockPool:
    """Allocator for block ids with ref counts and a verified prefix cache."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.enable_caching = enable_caching
        self._ref: list[int] = [0] * num_blocks
        self._entry: list[CacheEntry | None] = [None] * num_blocks
        # Min-heap of free uncached ids; _in_heap stops an id being pushed twice.
        self._heap: list[int] = list(range(num_blocks))
        self._in_heap = bytearray(b"\x01" * num_blocks)
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._index = PrefixIndex()
        self._num_used = 0
        # called with a block's cache entry just before the block drops it (LRU, drop, shrink,
        # compaction: KV intact, the host tier keeps a copy, core/tiered_kv.py; `forget`: not)
        self.on_evict: Callable[[CacheEntry, bool], None] | None = None

    @property
    def num_blocks(self) -> int:
        """Current capacity in blocks."""
        return len(self._ref)

    @property
    def num_free(self) -> int:
        """Free blocks, counting cached-free ones (they are reclaimable)."""
        return len(self._ref) - self._num_used

    @property
    def num_cached_free(self) -> int:
        """Free blocks that still hold a reusable prefix-cache entry."""
        return len(self._lru)

    @property
    def num_used(self) -> int:
        """Blocks with ``ref_count > 0``."""
        return self._num_used

    def ref_count(self, block_id: int) -> int:
        """Return the reference count of ``block_id``."""
        self._check_id(block_id)
        return self._ref[block_id]

    def is_cached(self, block_id: int) -> bool:
        """Whether ``block_id`` carries a prefix-cache entry (used or free)."""
        self._check_id(block_id)
        return self._entry[block_id] is not None

    def is_private(self, block_id: int) -> bool:
        """Whether exactly one owner holds the block and no cache entry pins its content.

        Hot path for the manager: ids come from block tables, so no range check.
        """
        return self._ref[block_id] == 1 and self._entry[block_id] is None

    def cached_tokens(self, block_id: int) -> tuple[int, ...] | None:
        """Tokens a block is registered under in the prefix cache, if any."""
        self._check_id(block_id)
        entry = self._entry[block_id]
        return None if entry is None else entry.key[2]

    def allocate(self) -> int:
        """Take the lowest free uncached id, else evict the LRU cached block."""
        block = self._pop_free()
        if block is None:
            if not self._lru:
                raise NoFreeBlocksError("no free blocks")
            block, _ = self._lru.popitem(last=False)
            self._drop_entry(block)
        self._ref[block] = 1
        self._num_used += 1
        return block

    def allocate_many(self, n: int) -> list[int]:
        """Allocate ``n`` blocks, all or nothing."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_free:
            raise NoFreeBlocksError(f"need {n} blocks, {self.num_free} free")
        return [self.allocate() for _ in range(n)]

    def incref(self, block_id: int) -> None:
        """Add a reference; revives a cached-free block on a prefix hit."""
        self._check_id(block_id)
        if self._ref[block_id] == 0:
            if block_id not in self._lru:
                raise ValueError(f"block {block_id} is free and uncached; allocate it instead")
            del self._lru[block_id]
            self._num_used += 1
        self._ref[block_id] += 1

    def free(self, block_id: int) -> None:
        """Drop a reference; at zero the block becomes cached-free or free."""
        self._check_id(block_id)
        ref = self._ref[block_id]
        if ref <= 0:
            raise ValueError(f"double free of block {block_id}")
        self._ref[block_id] = ref - 1
        if ref == 1:
            self._num_used -= 1
            if self._entry[block_id] is not None:
                self._lru[block_id] = None
            else:
                self._push_free(block_id)

    def set_hash(
        self,
        block_id: int,
        block_hash: int,
        token_ids: tuple[int, ...],
        parent_block: int | None = None,
    ) -> None:
        """Register a full, computed, in-use block in the prefix cache.

        ``parent_block`` is the cached block holding the previous block of the
        same sequence (``None`` for a sequence's first block).
        """
        if not self.enable_caching:
            return
        self._check_id(block_id)
        if self._ref[block_id] == 0:
            raise ValueError(f"block {block_id} is free; only in-use blocks can be cached")
        key = self._index.make_key(self._parent_entry(parent_block), block_hash, token_ids)
        current = self._entry[block_id]
        if current is not None:
            if current.key != key:
                raise ValueError(f"block {block_id} is already cached with different content")
            return
        self._entry[block_id] = self._index.add(key, block_id)

    def lookup(
        self, block_hash: int, token_ids: tuple[int, ...], parent_block: int | None = None
    ) -> int | None:
        """Return a cached block with this content after ``parent_block``, or None."""
        if not self.enable_caching:
            return None
        try:
            parent = self._parent_entry(parent_block)
        except ValueError:
            return None
        entry = self._index.get(self._index.make_key(parent, block_hash, token_ids))
        if entry is None:
            return None
        # Prefer a copy that is already in use: sharing it keeps free blocks free.
        return next((b for b in entry.blocks if self._ref[b]), next(iter(entry.blocks)))

    def evict_cached(self, max_blocks: int | None = None) -> int:
        """Drop entries of up to ``max_blocks`` cached-free blocks, oldest first."""
        count = len(self._lru) if max_blocks is None else min(max_blocks, len(self._lru))
        for _ in range(count):
            block, _ = self._lru.popitem(last=False)
            self._drop_entry(block)
            self._push_free(block)
        return count

    def resize(self, new_num_blocks: int) -> None:
        """Grow (new ids are free) or shrink (removed ids must be free)."""
        old = len(self._ref)
        if new_num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {new_num_blocks}")
        if new_num_blocks >= old:
            added = new_num_blocks - old
            self._ref.extend([0] * added)
            self._entry.extend([None] * added)
            self._in_heap.extend(b"\x00" * added)
            for block in range(old, new_num_blocks):
                self._push_free(block)
            return
        blocking = self.used_blocks_at_or_above(new_num_blocks)
        if blocking:
            shown = ", ".join(map(str, blocking[:16])) + (" ..." if len(blocking) > 16 else "")
            raise ValueError(
                f"cannot shrink to {new_num_blocks} blocks: {len(blocking)} block(s) "
                f"in use at or above it: {shown}"
            )
        for block in range(new_num_blocks, old):
            if self._entry[block] is not None:
                self._lru.pop(block, None)
                self._drop_entry(block)
        del self._ref[new_num_blocks:], self._entry[new_num_blocks:]
        del self._in_heap[new_num_blocks:]
        self._heap = [b for b in self._heap if b < new_num_blocks]
        heapq.heapify(self._heap)

    def used_blocks_at_or_above(self, block_id: int) -> list[int]:
        """Live blocks with id >= ``block_id``: what stops a shrink there."""
        ref = self._ref
        return [b for b in range(max(block_id, 0), len(ref)) if ref[b] > 0]

    def relocate(self, min_block_id: int) -> dict[int, int]:
        """Move every live block >= ``min_block_id`` to a free id below it.

        Ref counts and cache entries move with the block; the old ids become
        free. Returns ``{src: dst}``. Raises NoFreeBlocksError (no change)
        when there is not enough room below ``min_block_id``.
        """
        live = self.used_blocks_at_or_above(min_block_id)
        if not live:
            return {}
        room = min_block_id - (self._num_used - len(live))
        if len(live) > room:
            raise NoFreeBlocksError(
                f"relocating {len(live)} blocks needs room below {min_block_id}; {room} free"
            )
        mapping = dict(zip(live, self._take_free_below(min_block_id, len(live)), strict=True))
        for src, dst in mapping.items():
            self._ref[dst], self._ref[src] = self._ref[src], 0
            entry = self._entry[src]
            if entry is not None:
                self._index.move(entry, src, dst)
                self._entry[dst], self._entry[src] = entry, None
            self._push_free(src)
        return mapping

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < len(self._ref):
            raise ValueError(f"block id {block_id} out of range [0, {len(self._ref)})")

    def _parent_entry(self, parent_block: int | None) -> CacheEntry | None:
        if parent_block is None:
            return None
        self._check_id(parent_block)
        entry = self._entry[parent_block]
        if entry is None:
            raise ValueError(f"parent block {parent_block} is not cached")
        return entry

    def _push_free(self, block: int) -> None:
        if not self._in_heap[block]:
            self._in_heap[block] = 1
            heapq.heappush(self._heap, block)

    def _pop_free(self) -> int | None:
        heap, n = self._heap, len(self._ref)
        while heap:
            block = heapq.heappop(heap)
            if block < n:
                self._in_heap[block] = 0
                if self._ref[block] == 0 and self._entry[block] is None:
                    return block
        return None

    def _take_free_below(self, limit: int, count: int) -> list[int]:
        """Claim ``count`` free ids < ``limit``; the caller checked they exist."""
        out: list[int] = []
        while len(out) < count:
            block = self._pop_free()
            if block is None:
                break
            if block >= limit:
                self._push_free(block)
                break
            out.append(block)
        if len(out) == count:
            return out
        # Not enough plain free ids below the limit: evict cached ones, oldest first.
        for block in [b for b in self._lru if b < limit][: count - len(out)]:
            del self._lru[block]
            self._drop_entry(block)
            out.append(block)
        return out

    def forget(self, block_id: int) -> None:
        """Drop a used block's prefix-cache entry: its content is leaving this pool (its page
        was handed to another process), so no later prompt may hit it here."""
        self._check_id(block_id)
        if self._ref[block_id] <= 0:
            raise ValueError(f"block {block_id} is not in use")
        self._drop_entry(block_id, intact=False)  # not to be offloaded: it is not ours now

    def parent_entry(self, entry: CacheEntry) -> CacheEntry | None:
        """The entry cached for the block before ``entry``'s (None: a root, or it is gone)."""
        return self._index.parent(entry)

    def _drop_entry(self, block: int, intact: bool = True) -> None:
        entry = self._entry[block]
        if entry is not None:
            if self.on_evict is not None:
                self.on_evict(entry, intact)
            self._index.remove(entry, block)
            self._entry[block] = None

    def check_integrity(self) -> None:
        """Raise IntegrityError describing the first inconsistency found."""
        n = len(self._ref)
        if len(self._entry) != n or len(self._in_heap) != n:
            raise IntegrityError("per-block arrays disagree on capacity")
        used = sum(1 for r in self._ref if r > 0)
        if used != self._num_used or any(r < 0 for r in self._ref):
            raise IntegrityError(f"num_used={self._num_used} but {used} blocks have refs")
        heap_set = set(self._heap)
        if len(heap_set) != len(self._heap) or any(b >= n for b in heap_set):
            raise IntegrityError("free heap holds duplicate or out-of-range ids")
        if sum(self._in_heap) != len(heap_set):
            raise IntegrityError("heap membership flags disagree with the heap")
        if any(b >= n for b in self._lru):
            raise IntegrityError("LRU queue holds out-of-range ids")
        if not self.enable_caching and len(self._index):
            raise IntegrityError("prefix cache holds entries while caching is disabled")
        self._index.check(self._entry)
        for b in range(n):
            self._check_block(b, b in heap_set)

    def _check_block(self, b: int, in_heap: bool) -> None:
        entry, ref = self._entry[b], self._ref[b]
        if (b in self._lru) != (ref == 0 and entry is not None):
            raise IntegrityError(f"block {b} (ref={ref}) has wrong LRU membership")
        if in_heap != (ref == 0 and entry is None):
            raise IntegrityError(f"block {b} (ref={ref}) has wrong free-heap membership")
