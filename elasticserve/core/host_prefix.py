"""The host tier's prefix cache: content chains evicted from the device, kept in host blocks.

Torch-free bookkeeping; the copies are the engine's (engine/kv_storage.py). A host entry is
keyed like a device one (``PrefixIndex``: parent entry uid, chained hash, the block's own
tokens), but its parent is a *host* entry, so every host chain starts at a root and a hit is
verified over the whole prefix, as on the device. Offloading a block therefore brings its
ancestors along (once: a chain already on host is shared, e.g. a system prompt under many
conversations).

Each cached host block holds one reference in ``HostBlocks`` (so it is neither free nor lost
to the integrity check) and sits in an LRU queue. Every touch of a block touches its ancestors
after it, so a parent is always more recent than its children and LRU eviction takes leaves
first: a chain shrinks from its tail and never leaves unreachable blocks behind (except where
a pinned block had to be skipped; an orphan can never be hit and is evicted in turn).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence

from elasticserve.core.errors import IntegrityError
from elasticserve.core.host_blocks import HostBlocks
from elasticserve.core.prefix_hash import CacheEntry, PrefixIndex

# (a device block holding it, chained hash, tokens): one link of a chain, root first
ChainLink = tuple[int, int, tuple[int, ...]]
# (chained hash, tokens) of one full prompt block
BlockKey = tuple[int, tuple[int, ...]]


class HostPrefixCache:
    """Verified prefix-cache entries over host block ids, with LRU eviction."""

    def __init__(self, host: HostBlocks) -> None:
        self._host = host
        self._index = PrefixIndex()
        self._lru: OrderedDict[int, CacheEntry] = OrderedDict()  # host id -> its entry

    def __len__(self) -> int:
        return len(self._lru)

    def lookup(self, keys: Sequence[BlockKey]) -> list[int]:
        """Host blocks holding the longest cached prefix of ``keys`` (from the first block);
        touches them."""
        out: list[int] = []
        parent: CacheEntry | None = None
        for block_hash, tokens in keys:
            entry = self._index.get(self._index.make_key(parent, block_hash, tokens))
            if entry is None:
                break
            out.append(next(iter(entry.blocks)))
            parent = entry
        self._touch(out)
        return out

    def holds(self, entry: CacheEntry) -> bool:
        """Whether ``entry`` (one this cache returned) is still cached."""
        return bool(entry.blocks) and self._lru.get(next(iter(entry.blocks))) is entry

    def offload(self, anchor: CacheEntry | None, links: Sequence[ChainLink]
                ) -> tuple[list[tuple[int, int]], list[CacheEntry]]:
        """Keep ``links`` (root first, hanging under the cached host entry ``anchor``; None:
        from a root) on host. Returns the ``(device, host)`` copies for the links not there
        yet and the host entry of each link kept. Makes room by LRU eviction; stops early (a
        shorter chain is still a valid prefix) when the tier holds nothing it may evict."""
        copies: list[tuple[int, int]] = []
        kept: list[CacheEntry] = []
        protect = set() if anchor is None else set(anchor.blocks)
        parent = anchor
        for device, block_hash, tokens in links:
            key = self._index.make_key(parent, block_hash, tokens)
            entry = self._index.get(key)
            if entry is None:
                host = self._take(device, protect)
                if host is None:
                    break
                entry = self._index.add(key, host)
                self._lru[host] = entry
                copies.append((device, host))
            kept.append(entry)
            protect.update(entry.blocks)
            parent = entry
        self._touch([next(iter(e.blocks)) for e in kept])
        if anchor is not None:
            self._touch_up(anchor)
        return copies, kept

    def _take(self, device: int, protect: set[int]) -> int | None:
        if not self._host.num_free and not self._evict_one(protect):
            return None
        try:
            host = self._host.take([device])[device]
        except Exception:  # noqa: BLE001 - the tier could not map a page: keep a shorter chain
            return None
        self._host.incref([host])
        return host

    def evictable(self) -> int:
        """Cached host blocks that eviction could free now (not pinned, not shared)."""
        return sum(1 for h in self._lru if self._host.ref_count(h) == 1)

    def evict(self, n: int | None = None) -> int:
        """Free up to ``n`` (None: all) cached host blocks, least recently used first."""
        done = 0
        while (n is None or done < n) and self._evict_one(set()):
            done += 1
        return done

    def refs(self) -> Counter[int]:
        """The host references this cache holds (one per cached block)."""
        return Counter(self._lru.keys())

    def check_integrity(self) -> None:
        """Raise IntegrityError unless the index, the LRU queue and the host refs agree."""
        entry_of: list[CacheEntry | None] = [None] * self._host.num_blocks
        for host, entry in self._lru.items():
            if self._host.ref_count(host) < 1:
                raise IntegrityError(f"cached host block {host} holds no reference")
            entry_of[host] = entry
        self._index.check(entry_of)

    def _touch(self, path: list[int]) -> None:
        # deepest first, root last: a parent stays more recent than its children
        for host in reversed(path):
            self._lru.move_to_end(host)

    def _touch_up(self, entry: CacheEntry | None) -> None:
        """Touch ``entry`` and its cached ancestors, root last (new children hang under it)."""
        while entry is not None and self.holds(entry):
            self._lru.move_to_end(next(iter(entry.blocks)))
            entry = self._index.parent(entry)

    def _evict_one(self, protect: set[int]) -> bool:
        for host, entry in self._lru.items():
            # pinned (a pending onload reads it) or part of the chain being offloaded
            if host in protect or self._host.ref_count(host) > 1:
                continue
            del self._lru[host]
            self._index.remove(entry, host)
            self._host.decref([host])
            return True
        return False
