"""Chained content hashes of full KV blocks and the verified prefix-cache index.

The hash of block ``i`` folds in the hash of block ``i - 1``, so equal hashes
mean "same tokens after (probably) the same prefix". Collisions are harmless:
``PrefixIndex`` keys on the hash *and* the block's tokens *and* the identity
of the cached parent entry, so a hit is always verified. That lets us
use Python's built-in tuple hash (fast, deterministic for ints across
processes) instead of a cryptographic digest. It is not stable across Python
versions, so these hashes must not be persisted.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from elasticserve.core.errors import IntegrityError

# Distinguishes a first block from a block whose parent hash happens to be 0.
_ROOT_SEED = 0x5EED_B10C_CAFE


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Return the chained hash of one full block given its parent's hash."""
    parent = _ROOT_SEED if parent_hash is None else parent_hash
    return hash((parent, tuple(token_ids)))


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Return chained hashes for every *full* block of ``token_ids``."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes: list[int] = []
    parent: int | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


# (parent entry uid or NO_PARENT, block hash, block tokens)
CacheKey = tuple[int, int, tuple[int, ...]]
NO_PARENT = -1


@dataclass(slots=True)
class CacheEntry:
    """One cached content chain and the block ids currently holding it."""

    key: CacheKey
    # Never reused, so a child keyed on it can never match a different prefix,
    # even after this entry dies and identical content is cached again.
    uid: int
    # Several blocks can hold identical content when sequences computed the
    # same prefix concurrently; insertion order picks the lookup answer.
    blocks: dict[int, None] = field(default_factory=dict)


class PrefixIndex:
    """Verified prefix-cache index from content keys to the blocks holding them.

    Keys carry the parent's entry uid and the block's own tokens, so a hit
    verifies the whole prefix even when ``hash_block`` collides.
    """

    def __init__(self) -> None:
        self._entries: dict[CacheKey, CacheEntry] = {}
        self._uids = itertools.count()
        # uid -> live entry: walks a chain from a block up to its root (`parent`)
        self._by_uid: dict[int, CacheEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def make_key(parent: CacheEntry | None, block_hash: int, token_ids: tuple[int, ...]) -> CacheKey:
        """Key for a block whose previous block holds ``parent`` (None: first block)."""
        return (NO_PARENT if parent is None else parent.uid, block_hash, token_ids)

    def get(self, key: CacheKey) -> CacheEntry | None:
        """The entry for ``key``, if any block holds that content."""
        return self._entries.get(key)

    def add(self, key: CacheKey, block: int) -> CacheEntry:
        """Record that ``block`` holds ``key``'s content; returns its entry."""
        entry = self._entries.get(key)
        if entry is None:
            entry = CacheEntry(key, next(self._uids))
            self._entries[key] = entry
            self._by_uid[entry.uid] = entry
        entry.blocks[block] = None
        return entry

    def remove(self, entry: CacheEntry, block: int) -> None:
        """Forget that ``block`` holds ``entry``'s content."""
        del entry.blocks[block]
        if not entry.blocks:
            del self._entries[entry.key]
            del self._by_uid[entry.uid]

    def by_uid(self, uid: int) -> CacheEntry | None:
        """The live entry with this uid (a key's parent part), if any."""
        return self._by_uid.get(uid)

    def parent(self, entry: CacheEntry) -> CacheEntry | None:
        """``entry``'s parent entry; None for a root, or when the parent is gone (then no
        lookup from a root can reach ``entry`` any more)."""
        return None if entry.key[0] == NO_PARENT else self._by_uid.get(entry.key[0])

    @staticmethod
    def move(entry: CacheEntry, src: int, dst: int) -> None:
        """The content moved from block ``src`` to ``dst`` (compaction)."""
        del entry.blocks[src]
        entry.blocks[dst] = None

    def check(self, entry_of: Sequence[CacheEntry | None]) -> None:
        """Raise IntegrityError unless the index and ``entry_of[block]`` agree."""
        if len(self._by_uid) != len(self._entries) or any(
                self._by_uid.get(e.uid) is not e for e in self._entries.values()):
            raise IntegrityError("the uid map disagrees with the entries")
        for key, entry in self._entries.items():
            if entry.key != key or not entry.blocks:
                raise IntegrityError(f"cache entry {entry.uid} is empty or misfiled")
            for b in entry.blocks:
                if b >= len(entry_of) or entry_of[b] is not entry:
                    raise IntegrityError(f"block {b} listed under entry {entry.uid} it lacks")
        for b, held in enumerate(entry_of):
            if held is not None and (self._entries.get(held.key) is not held or b not in held.blocks):
                raise IntegrityError(f"block {b} holds an unindexed cache entry")
