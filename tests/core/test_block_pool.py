import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from elasticserve.core.block_pool import BlockPool, IntegrityError, NoFreeBlocksError

A, B, C = (1, 1), (2, 2), (3, 3)


def cached_free_pool(n: int, contents: list[tuple[int, ...]]) -> tuple[BlockPool, list[int]]:
    """Pool whose first blocks hold ``contents`` as root entries, then are freed in order."""
    pool = BlockPool(n)
    blocks = pool.allocate_many(len(contents))
    for block, tokens in zip(blocks, contents, strict=True):
        pool.set_hash(block, hash(tokens), tokens)
    for block in blocks:
        pool.free(block)
    return pool, blocks


def test_lowest_id_first_and_counts() -> None:
    pool = BlockPool(8)
    assert [pool.allocate() for _ in range(3)] == [0, 1, 2]
    pool.free(1)
    assert pool.allocate() == 1
    pool.incref(2)
    assert (pool.num_used, pool.num_free, pool.ref_count(2)) == (3, 5, 2)
    pool.free(2)
    assert pool.ref_count(2) == 1 and pool.num_used == 3


def test_uncached_blocks_go_before_cached_ones() -> None:
    pool, blocks = cached_free_pool(4, [A])
    assert blocks == [0] and pool.num_cached_free == 1
    assert pool.allocate_many(3) == [1, 2, 3]
    assert pool.lookup(hash(A), A) == 0  # still reusable
    assert pool.allocate() == 0  # only now evicted
    assert pool.lookup(hash(A), A) is None and pool.num_cached_free == 0


def test_eviction_is_least_recently_freed_first() -> None:
    pool = BlockPool(3)
    blocks = pool.allocate_many(3)
    for block, tokens in zip(blocks, [A, B, C], strict=True):
        pool.set_hash(block, hash(tokens), tokens)
    for block in (1, 0, 2):
        pool.free(block)
    assert [pool.allocate() for _ in range(3)] == [1, 0, 2]
    with pytest.raises(NoFreeBlocksError):
        pool.allocate()


def test_incref_revives_cached_block_and_protects_it() -> None:
    pool, _ = cached_free_pool(2, [A, B])
    hit = pool.lookup(hash(A), A)
    assert hit == 0
    pool.incref(hit)
    assert pool.num_cached_free == 1 and pool.num_used == 1
    assert pool.allocate() == 1  # evicts B, not the revived A
    with pytest.raises(NoFreeBlocksError):
        pool.allocate()
    pool.free(0)
    assert pool.lookup(hash(A), A) == 0


def test_misuse_is_rejected() -> None:
    pool = BlockPool(2)
    with pytest.raises(ValueError):
        pool.incref(0)  # free and uncached: nothing to revive
    with pytest.raises(ValueError):
        pool.free(1)
    with pytest.raises(ValueError):
        pool.set_hash(0, 1, A)  # free block
    with pytest.raises(ValueError):
        pool.ref_count(5)
    block = pool.allocate()
    pool.set_hash(block, 1, A)
    pool.set_hash(block, 1, A)  # idempotent
    with pytest.raises(ValueError):
        pool.set_hash(block, 1, B)


def test_allocate_many_is_all_or_nothing() -> None:
    pool, _ = cached_free_pool(4, [A])
    pool.allocate()
    with pytest.raises(NoFreeBlocksError):
        pool.allocate_many(4)
    assert pool.num_free == 3 and pool.num_cached_free == 1
    assert sorted(pool.allocate_many(3)) == [0, 2, 3]


def test_lookup_verifies_tokens_under_hash_collision() -> None:
    pool = BlockPool(4)
    x, y = pool.allocate_many(2)
    pool.set_hash(x, 42, A)
    pool.set_hash(y, 42, B)
    assert pool.lookup(42, A) == x and pool.lookup(42, B) == y
    assert pool.lookup(42, C) is None and pool.lookup(43, A) is None


def test_lookup_verifies_parent_chain_under_hash_collision() -> None:
    pool = BlockPool(4)
    a, x, b = pool.allocate_many(3)
    pool.set_hash(a, 0, A)
    pool.set_hash(x, 0, C, parent_block=a)
    pool.set_hash(b, 0, B)
    assert pool.lookup(0, C, parent_block=a) == x
    # Same tokens and hash, but after a different prefix: must miss.
    assert pool.lookup(0, C, parent_block=b) is None
    assert pool.lookup(0, C) is None
    with pytest.raises(ValueError):
        pool.set_hash(pool.allocate(), 0, C, parent_block=3)  # uncached parent


def test_duplicate_content_survives_eviction_of_one_copy() -> None:
    pool = BlockPool(3)
    first, second = pool.allocate_many(2)
    pool.set_hash(first, 5, A)
    pool.set_hash(second, 5, A)
    child = pool.allocate()
    pool.set_hash(child, 6, B, parent_block=second)
    pool.free(first)
    assert pool.lookup(5, A) == second  # the in-use copy is preferred
    assert pool.evict_cached() == 1
    assert pool.lookup(5, A) == second
    # Both copies share one content id, so the child is reachable via either.
    assert pool.lookup(6, B, parent_block=second) == child
    pool.check_integrity()


def test_evict_cached_respects_limit() -> None:
    pool, _ = cached_free_pool(4, [A, B, C])
    assert pool.evict_cached(2) == 2
    assert pool.lookup(hash(A), A) is None and pool.lookup(hash(C), C) == 2
    assert pool.evict_cached() == 1 and pool.num_free == 4
    assert pool.allocate() == 0


def test_caching_disabled() -> None:
    pool = BlockPool(2, enable_caching=False)
    block = pool.allocate()
    pool.set_hash(block, 1, A)
    pool.free(block)
    assert pool.lookup(1, A) is None and pool.num_cached_free == 0
    pool.check_integrity()


def test_resize_grow_shrink_and_refusal() -> None:
    pool, _ = cached_free_pool(4, [A, B])
    pool.resize(6)
    assert pool.num_blocks == 6 and pool.num_free == 6
    held = pool.allocate_many(4)
    assert held == [2, 3, 4, 5]
    with pytest.raises(ValueError, match=r"4, 5"):
        pool.resize(4)
    assert pool.used_blocks_at_or_above(3) == [3, 4, 5]
    for block in held:
        pool.free(block)
    pool.resize(1)  # drops cached B at id 1; A at id 0 stays
    assert pool.num_blocks == 1 and pool.lookup(hash(B), B) is None
    assert pool.lookup(hash(A), A) == 0
    pool.check_integrity()
    pool.resize(3)
    assert pool.allocate_many(2) == [1, 2]
    pool.check_integrity()


def test_relocate_moves_refs_and_cache_entries_down() -> None:
    pool = BlockPool(6)
    blocks = pool.allocate_many(6)
    for block in (0, 2, 3):
        pool.free(block)
    pool.incref(5)
    pool.set_hash(5, 9, A)
    mapping = pool.relocate(4)
    assert mapping == {4: 0, 5: 2}
    assert pool.ref_count(2) == 2 and pool.ref_count(5) == 0
    assert pool.lookup(9, A) == 2
    pool.resize(4)
    pool.check_integrity()
    assert blocks and pool.used_blocks_at_or_above(0) == [0, 1, 2]


def test_relocate_without_room_changes_nothing() -> None:
    pool = BlockPool(4)
    pool.allocate_many(4)
    pool.free(0)
    with pytest.raises(NoFreeBlocksError):
        pool.relocate(2)
    assert pool.num_used == 3 and pool.ref_count(3) == 1
    pool.check_integrity()


def test_relocate_evicts_cached_blocks_below_when_needed() -> None:
    pool, _ = cached_free_pool(3, [A])
    pool.allocate_many(2)  # ids 1, 2
    assert pool.relocate(2) == {2: 0}
    assert pool.lookup(hash(A), A) is None
    pool.check_integrity()


def test_check_integrity_catches_corruption() -> None:
    pool = BlockPool(3)
    pool.allocate()
    pool._ref[1] = 1  # noqa: SLF001 - deliberate corruption
    with pytest.raises(IntegrityError):
        pool.check_integrity()


# (the parent's content chain id or -1 for a first block, hash, tokens)
ModelKey = tuple[int, int, tuple[int, ...]]


class PoolMachine(RuleBasedStateMachine):
    """Checks BlockPool against a plain-dict model, with colliding hashes and chained
    entries: a block's content is its tokens *after its parent's content*, so the same tokens
    cached after two different parents are two entries, and a lookup after one parent must
    never answer with the block cached after the other."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(6)
        self.n = 6
        self.ref: dict[int, int] = {}
        self.key: dict[int, ModelKey] = {}
        # a content chain's id lives while some block holds it; identical content cached again
        # later is a new chain, so children keyed on the old one no longer match
        self.chain: dict[ModelKey, int] = {}
        self.next_chain = 0
        self.lru: list[int] = []

    def _model_key(self, parent: int | None, tokens: tuple[int, ...]) -> ModelKey:
        chain = -1 if parent is None else self.chain[self.key[parent]]
        return (chain, sum(tokens) % 2, tokens)  # deliberately colliding hash

    def _forget(self, block: int) -> None:
        """`block` no longer holds its content: the chain ends with its last holder."""
        key = self.key.pop(block, None)
        if key is not None and key not in self.key.values():
            del self.chain[key]

    def _parent(self, i: int | None) -> int | None:
        return None if i is None or not self.key else self._pick(list(self.key), i)

    def _free_uncached(self) -> list[int]:
        return [b for b in range(self.n) if not self.ref.get(b) and b not in self.key]

    def _pick(self, items: list[int], i: int) -> int:
        return sorted(items)[i % len(items)]

    @rule()
    def allocate(self) -> None:
        free = self._free_uncached()
        if not free and not self.lru:
            with pytest.raises(NoFreeBlocksError):
                self.pool.allocate()
            return
        expected = min(free) if free else self.lru.pop(0)
        self._forget(expected)
        assert self.pool.allocate() == expected
        self.ref[expected] = 1

    @precondition(lambda self: any(self.ref.values()))
    @rule(i=st.integers(0, 99))
    def free(self, i: int) -> None:
        block = self._pick([b for b, r in self.ref.items() if r], i)
        self.pool.free(block)
        self.ref[block] -= 1
        if self.ref[block] == 0 and block in self.key:
            self.lru.append(block)

    @precondition(lambda self: any(self.ref.values()) or self.lru)
    @rule(i=st.integers(0, 99))
    def incref(self, i: int) -> None:
        block = self._pick([b for b, r in self.ref.items() if r] + self.lru, i)
        if block in self.lru:
            self.lru.remove(block)
        self.pool.incref(block)
        self.ref[block] = self.ref.get(block, 0) + 1

    @precondition(lambda self: any(r and b not in self.key for b, r in self.ref.items()))
    @rule(i=st.integers(0, 99), tokens=st.tuples(st.integers(0, 2), st.integers(0, 2)),
          parent=st.none() | st.integers(0, 99))
    def set_hash(self, i: int, tokens: tuple[int, ...], parent: int | None) -> None:
        block = self._pick([b for b, r in self.ref.items() if r and b not in self.key], i)
        parent_block = self._parent(parent)
        key = self._model_key(parent_block, tokens)
        self.pool.set_hash(block, key[1], tokens, parent_block)
        self.key[block] = key
        if key not in self.chain:
            self.chain[key], self.next_chain = self.next_chain, self.next_chain + 1

    @rule(tokens=st.tuples(st.integers(0, 2), st.integers(0, 2)),
          parent=st.none() | st.integers(0, 99))
    def lookup(self, tokens: tuple[int, ...], parent: int | None) -> None:
        parent_block = self._parent(parent)
        key = self._model_key(parent_block, tokens)
        hit = self.pool.lookup(key[1], tokens, parent_block)
        holders = [b for b, k in self.key.items() if k == key]
        assert (hit is None) == (not holders) and (hit is None or hit in holders), \
            f"lookup {key} after block {parent_block} gave {hit}, holders {holders}"

    @rule(k=st.integers(0, 3))
    def evict(self, k: int) -> None:
        gone, self.lru = self.lru[:k], self.lru[k:]
        for block in gone:
            self._forget(block)
        assert self.pool.evict_cached(k) == len(gone)

    @rule(new=st.integers(0, 10), compact=st.booleans())
    def resize(self, new: int, compact: bool) -> None:
        if compact and self.pool.num_used <= new:
            for src, dst in self.pool.relocate(new).items():
                assert src >= new > dst and not self.ref.get(dst)
                self.ref[dst] = self.ref.pop(src)
                if dst in self.lru:
                    self.lru.remove(dst)
                self._forget(dst)
                if src in self.key:
                    self.key[dst] = self.key.pop(src)
        if any(self.ref.get(b) for b in range(new, self.n)):
            with pytest.raises(ValueError):
                self.pool.resize(new)
            return
        self.pool.resize(new)
        for block in range(new, self.n):
            self._forget(block)
            self.ref.pop(block, None)
        self.lru = [b for b in self.lru if b < new]
        self.n = new

    @invariant()
    def consistent(self) -> None:
        self.pool.check_integrity()
        used = sum(1 for r in self.ref.values() if r)
        assert (self.pool.num_used, self.pool.num_free) == (used, self.n - used)
        assert self.pool.num_cached_free == len(self.lru)

    def teardown(self) -> None:
        for block, ref in self.ref.items():
            for _ in range(ref):
                self.pool.free(block)
        assert self.pool.num_used == 0
        self.pool.check_integrity()


PoolMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_pool_state_machine = PoolMachine.TestCase
