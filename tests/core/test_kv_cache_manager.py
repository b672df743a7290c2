import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from elasticserve.core import kv_cache_manager
from elasticserve.core.block_pool import BlockPool, NoFreeBlocksError
from elasticserve.core.kv_cache_manager import KVCacheManager

BS = 4


def make(num_blocks: int = 16, swap: int = 8, caching: bool = True) -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks), BS, swap, enable_prefix_caching=caching)


def run_prompt(kv: KVCacheManager, seq_id: int, tokens: list[int]) -> int:
    """Schedule and "compute" a whole prompt, then register its full blocks."""
    hit = kv.allocate_prompt(seq_id, tokens)
    kv.append_slots(seq_id, hit, len(tokens) - hit)
    kv.cache_blocks(seq_id, tokens, len(tokens))
    return hit


def test_prompt_miss_then_hit_after_free() -> None:
    kv = make()
    prompt = list(range(10))
    assert run_prompt(kv, 1, prompt) == 0
    assert len(kv.block_table(1)) == 3
    first_two = kv.block_table(1)[:2]
    kv.free(1)
    assert kv.pool.num_cached_free == 2
    assert kv.allocate_prompt(2, prompt + [99]) == 8
    assert kv.block_table(2) == first_two
    assert kv.pool.num_cached_free == 0 and kv.pool.num_used == 2
    kv.check_integrity()


def test_free_queues_tail_blocks_for_eviction_first() -> None:
    kv = make(num_blocks=3)
    prompt = list(range(12))
    run_prompt(kv, 1, prompt)
    kv.free(1)
    kv.allocate_prompt(2, [99])
    kv.append_slots(2, 0, 1)  # evicts one cached block: the deepest one
    assert kv.allocate_prompt(3, prompt + [0]) == 8


def test_prompt_hit_shares_blocks_with_running_sequence() -> None:
    kv = make()
    run_prompt(kv, 1, list(range(9)))
    assert kv.allocate_prompt(2, list(range(8)) + [50, 51]) == 8
    assert [kv.pool.ref_count(b) for b in kv.block_table(2)] == [2, 2]


def test_full_prompt_hit_leaves_last_block_to_compute() -> None:
    kv = make()
    prompt = list(range(8))
    run_prompt(kv, 1, prompt)
    assert kv.allocate_prompt(2, prompt) == 4  # never the whole prompt
    assert kv.num_blocks_needed(2, 8) == 1
    assert kv.append_slots(2, 4, 4) == []
    assert kv.block_table(2)[1] != kv.block_table(1)[1]


def test_caching_off_never_hits() -> None:
    kv = make(caching=False)
    run_prompt(kv, 1, list(range(9)))
    kv.free(1)
    assert kv.allocate_prompt(2, list(range(9))) == 0
    assert kv.pool.num_cached_free == 0


def test_forced_hash_collision_is_verified(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_cache_manager, "hash_block", lambda parent, tokens: 7)
    kv = make()
    a, b, x, y = [1] * BS, [2] * BS, [3] * BS, [4] * BS
    run_prompt(kv, 1, a + x + [0])
    run_prompt(kv, 2, b + y + [0])
    assert kv.allocate_prompt(3, a + y + [0]) == BS  # block A only; Y followed B
    assert kv.allocate_prompt(4, b + x + [0]) == BS  # X is cached, but after A
    assert kv.allocate_prompt(5, x + x + [0]) == 0
    assert kv.allocate_prompt(6, a + x + [0]) == 2 * BS
    assert kv.block_table(6) == kv.block_table(1)[:2]
    kv.check_integrity()


def test_append_slots_allocates_lazily_and_reports_need() -> None:
    kv = make()
    kv.allocate_prompt(1, [0] * 5)
    assert kv.num_blocks_needed(1, 5) == 2
    assert kv.append_slots(1, 0, 5) == [] and len(kv.block_table(1)) == 2
    assert kv.num_blocks_needed(1, 8) == 0
    for pos in range(5, 8):
        assert kv.append_slots(1, pos, 1) == []
    assert len(kv.block_table(1)) == 2
    assert kv.num_blocks_needed(1, 9) == 1
    kv.append_slots(1, 8, 1)
    assert len(kv.block_table(1)) == 3 and kv.usage == 3 / 16


def test_append_slots_is_all_or_nothing() -> None:
    kv = make(num_blocks=3)
    kv.allocate_prompt(1, [0] * 4)
    kv.append_slots(1, 0, 4)
    kv.fork(1, 2)
    kv.allocate_prompt(3, [0])
    kv.append_slots(3, 0, 1)
    # Seq 1 wants 2 new blocks (tokens 4..11) but only 1 is free.
    with pytest.raises(NoFreeBlocksError):
        kv.append_slots(1, 4, 8)
    assert kv.block_table(1) == [0] and kv.pool.num_free == 1
    kv.check_integrity()


def test_fork_copy_on_write_of_partial_block() -> None:
    kv = make()
    kv.allocate_prompt(1, [0] * 6)
    kv.append_slots(1, 0, 6)
    kv.fork(1, 2)
    shared = kv.block_table(1)[1]
    assert kv.pool.ref_count(shared) == 2
    assert kv.num_blocks_needed(2, 7) == 1  # the COW copy
    copies = kv.append_slots(2, 6, 1)
    assert copies == [(shared, kv.block_table(2)[1])]
    assert kv.block_table(2)[0] == kv.block_table(1)[0]  # full block still shared
    assert kv.num_blocks_needed(1, 7) == 0
    assert kv.append_slots(1, 6, 1) == []  # parent is sole owner again
    assert kv.block_table(1)[1] == shared
    kv.check_integrity()


def test_fork_at_block_boundary_needs_no_copy() -> None:
    kv = make()
    kv.allocate_prompt(1, [0] * 8)
    kv.append_slots(1, 0, 8)
    kv.fork(1, 2)
    assert kv.append_slots(2, 8, 1) == [] and kv.append_slots(1, 8, 1) == []
    assert kv.block_table(1)[:2] == kv.block_table(2)[:2]
    assert kv.block_table(1)[2] != kv.block_table(2)[2]


def test_rewriting_a_cached_block_copies_it_first() -> None:
    kv = make()
    tokens = list(range(8))
    run_prompt(kv, 1, tokens)
    cached = kv.block_table(1)[1]
    copies = kv.append_slots(1, 6, 2)  # e.g. rejected speculative tokens
    assert copies == [(cached, kv.block_table(1)[1])]
    assert kv.pool.num_cached_free == 1
    kv.cache_blocks(1, tokens[:6] + [70, 71], 8)
    kv.check_integrity()
    assert kv.allocate_prompt(2, tokens + [0]) == 8  # old content still served
    assert kv.allocate_prompt(3, tokens[:6] + [70, 71, 0]) == 8  # and the new one
    assert kv.block_table(3) == kv.block_table(1)


def test_swap_out_preserves_sharing_and_swap_in_restores_it() -> None:
    kv = make()
    run_prompt(kv, 1, list(range(6)))
    kv.fork(1, 2)
    kv.append_slots(2, 6, 1)  # COW: seq 2 gets its own tail
    assert kv.can_swap_out([1, 2])
    out = kv.swap_out([1, 2])
    assert len(out) == 3 and kv.num_free_swap_blocks == 5
    assert kv.is_swapped(1) and kv.block_table(1)[0] == kv.block_table(2)[0]
    assert kv.pool.num_used == 0
    kv.check_integrity()
    assert kv.num_blocks_needed_for_swap_in([1, 2]) == 3
    back = kv.swap_in([1, 2])
    assert {h for h, _ in back} == {h for _, h in out}
    assert kv.block_table(1)[0] == kv.block_table(2)[0]
    assert kv.pool.ref_count(kv.block_table(1)[0]) == 2
    assert kv.num_free_swap_blocks == 8
    kv.check_integrity()


def test_swap_limits_are_all_or_nothing() -> None:
    kv = make(num_blocks=4, swap=2)
    kv.allocate_prompt(1, [0] * 12)
    kv.append_slots(1, 0, 12)
    assert not kv.can_swap_out([1])
    with pytest.raises(NoFreeBlocksError):
        kv.swap_out([1])
    assert not kv.is_swapped(1) and kv.num_free_swap_blocks == 2
    kv.free(1)
    kv.allocate_prompt(2, [0] * 8)
    kv.append_slots(2, 0, 8)
    kv.swap_out([2])
    kv.allocate_prompt(3, [0] * 12)
    kv.append_slots(3, 0, 12)
    assert not kv.can_swap_in([2])
    with pytest.raises(NoFreeBlocksError):
        kv.swap_in([2])
    assert kv.is_swapped(2)
    with pytest.raises(ValueError):
        kv.append_slots(2, 8, 1)
    kv.free(2)
    assert kv.num_free_swap_blocks == 2 and not kv.has_seq(2)
    kv.check_integrity()


def test_swapped_in_blocks_are_recached() -> None:
    kv = make()
    tokens = list(range(9))
    run_prompt(kv, 1, tokens)
    kv.swap_out([1])
    kv.pool.evict_cached()
    kv.swap_in([1])
    kv.cache_blocks(1, tokens, 9)
    kv.check_integrity()
    assert kv.allocate_prompt(2, tokens) == 8
    assert kv.block_table(2) == kv.block_table(1)[:2]


def test_relocate_keeps_sharing_and_cache_entries() -> None:
    kv = make(num_blocks=8)
    filler = [100 + i for i in range(5)]
    kv.allocate_prompt(9, filler)
    kv.append_slots(9, 0, 5)  # ids 0, 1
    tokens = list(range(9))
    run_prompt(kv, 1, tokens)  # ids 2, 3, 4
    kv.fork(1, 2)
    kv.free(9)
    copies = kv.relocate(3)
    assert sorted(copies) == [(3, 0), (4, 1)]
    assert kv.block_table(1) == kv.block_table(2) == [2, 0, 1]
    assert kv.pool.ref_count(0) == 2
    kv.pool.resize(3)
    kv.check_integrity()
    assert kv.allocate_prompt(3, tokens) == 8
    assert kv.block_table(3) == kv.block_table(1)[:2]


def test_relocate_without_room_changes_nothing() -> None:
    kv = make(num_blocks=4)
    kv.allocate_prompt(1, [0] * 16)
    kv.append_slots(1, 0, 16)
    with pytest.raises(NoFreeBlocksError):
        kv.relocate(2)
    assert kv.block_table(1) == [0, 1, 2, 3]
    kv.check_integrity()


def test_sequence_id_errors() -> None:
    kv = make()
    kv.allocate_prompt(1, [0])
    with pytest.raises(ValueError):
        kv.allocate_prompt(1, [0])
    with pytest.raises(ValueError):
        kv.fork(5, 1) if kv.has_seq(5) else kv.fork(1, 1)
    with pytest.raises(KeyError):
        kv.block_table(5)
    with pytest.raises(ValueError):
        kv.swap_out([1, 1])


BASES = [(0,) * 12, (1, 0) * 6, (0, 0, 1, 1) * 3]
# the fake KV of one slot: every token up to and including the slot's (None: never written)
Slot = tuple[int, ...] | None


class ManagerMachine(RuleBasedStateMachine):
    """Random workloads against a shadow copy of every block's KV "content".

    Copies returned by the manager are replayed on the shadow and each write
    stores, like real attention KV, what the slot depends on: every token up to
    and including its own (the whole prefix, not just the block's tokens). A
    missed COW, a lost swap copy or a wrong prefix hit (the right tokens after
    another prefix) shows up as a sequence reading back foreign KV.
    """

    caching = True

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(BlockPool(16), BS, 12, enable_prefix_caching=self.caching)
        self.dev: dict[int, list[Slot]] = {}
        self.host: dict[int, list[Slot]] = {}
        self.tokens: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}
        self.next_id = 0

    def _ids(self, swapped: bool) -> list[int]:
        return [s for s in sorted(self.tokens) if self.kv.is_swapped(s) == swapped]

    def _slot(self, store: dict[int, list[Slot]], block: int) -> list[Slot]:
        return store.setdefault(block, [None] * BS)

    def _advance(self, sid: int, start: int, n: int, toks: list[int], cache: bool) -> bool:
        """Append slots for ``toks[start:start+n]``, replay copies, write; False if full."""
        need = self.kv.num_blocks_needed(sid, start + n, start)
        free, table = self.kv.num_free_blocks, list(self.kv.block_table(sid))
        try:
            copies = self.kv.append_slots(sid, start, n)
        except NoFreeBlocksError:
            assert need > free and self.kv.block_table(sid) == table
            return False
        assert need <= free and len(copies) + len(self.kv.block_table(sid)) - len(table) == need
        for src, dst in copies:
            self.dev[dst] = list(self._slot(self.dev, src))
        for pos in range(start, start + n):
            self._slot(self.dev, self.kv.block_table(sid)[pos // BS])[pos % BS] = tuple(toks[: pos + 1])
        self.tokens[sid], self.computed[sid] = toks, start + n
        if cache:
            self.kv.cache_blocks(sid, toks, start + n)
        return True

    def _add(self, prompt: list[int], prefill: bool) -> None:
        sid, self.next_id = self.next_id, self.next_id + 1
        hit = self.kv.allocate_prompt(sid, prompt)
        assert hit % BS == 0 and hit < len(prompt) and (self.caching or hit == 0)
        table = self.kv.block_table(sid)
        for pos in range(hit):  # a hit must hold exactly the KV of the prompt's prefix
            assert self._slot(self.dev, table[pos // BS])[pos % BS] == tuple(prompt[: pos + 1])
        self.tokens[sid], self.computed[sid] = prompt, hit
        if prefill:
            self._advance(sid, hit, len(prompt) - hit, prompt, cache=True)

    @initialize(bases=st.lists(st.sampled_from(BASES), min_size=2, max_size=3))
    def start(self, bases: list[tuple[int, ...]]) -> None:
        for base in bases:
            self._add(list(base), prefill=True)

    @precondition(lambda self: len(self.tokens) < 8)
    @rule(
        base=st.sampled_from(BASES),
        cut=st.integers(0, 12),
        suffix=st.lists(st.integers(0, 1), max_size=6),
        prefill=st.booleans(),
    )
    def add_prompt(self, base: tuple[int, ...], cut: int, suffix: list[int], prefill: bool) -> None:
        self._add(list(base[:cut]) + suffix or [0], prefill)

    @precondition(lambda self: self._ids(False))
    @rule(
        i=st.integers(0, 99),
        n=st.integers(1, 9),
        extra=st.lists(st.integers(0, 1), max_size=9),
        back=st.integers(0, 6),
    )
    def chunk(self, i: int, n: int, extra: list[int], back: int) -> None:
        sid = self._ids(False)[i % len(self._ids(False))]
        start = max(self.computed[sid] - back, 0)  # back > 0: rejected draft tokens
        toks = self.tokens[sid][:start] if back else list(self.tokens[sid])
        toks += (extra + [0] * n)[: max(start + n - len(toks), 0)]
        self._advance(sid, start, n, toks, cache=back < 4)

    @precondition(lambda self: self._ids(False))
    @rule(sampled=st.lists(st.integers(0, 1), min_size=8, max_size=8))
    def decode_all(self, sampled: list[int]) -> None:
        """One scheduler step: every device sequence computes one more token."""
        for sid, tok in zip(self._ids(False), sampled, strict=False):
            c = self.computed[sid]
            toks = self.tokens[sid] + [tok] * (c + 1 - len(self.tokens[sid]))
            if not self._advance(sid, c, 1, toks, cache=True):
                return

    @precondition(lambda self: self._ids(False) and len(self.tokens) < 8)
    @rule(i=st.integers(0, 99))
    def fork(self, i: int) -> None:
        parent = self._ids(False)[i % len(self._ids(False))]
        sid, self.next_id = self.next_id, self.next_id + 1
        self.kv.fork(parent, sid)
        self.tokens[sid], self.computed[sid] = list(self.tokens[parent]), self.computed[parent]

    @precondition(lambda self: self.tokens)
    @rule(i=st.integers(0, 99))
    def free(self, i: int) -> None:
        sid = sorted(self.tokens)[i % len(self.tokens)]
        self.kv.free(sid)
        del self.tokens[sid], self.computed[sid]

    @precondition(lambda self: self.tokens)
    @rule(swap_in=st.booleans(), picks=st.sets(st.integers(0, 7), min_size=1, max_size=3))
    def swap(self, swap_in: bool, picks: set[int]) -> None:
        pool_ids = self._ids(swap_in) or self._ids(not swap_in)
        swap_in = self.kv.is_swapped(pool_ids[0])
        ids = sorted({pool_ids[p % len(pool_ids)] for p in picks})
        can = self.kv.can_swap_in(ids) if swap_in else self.kv.can_swap_out(ids)
        try:
            copies = self.kv.swap_in(ids) if swap_in else self.kv.swap_out(ids)
        except NoFreeBlocksError:
            assert not can and all(self.kv.is_swapped(s) == swap_in for s in ids)
            return
        assert can
        src, dst = (self.host, self.dev) if swap_in else (self.dev, self.host)
        for a, b in copies:
            dst[b] = list(self._slot(src, a))

    @precondition(lambda self: self.tokens)
    @rule(delta=st.integers(-4, 4), evict=st.integers(0, 3))
    def resize(self, delta: int, evict: int) -> None:
        """Grow, or compact and shrink to just below the highest live block."""
        pool = self.kv.pool
        pool.evict_cached(evict)
        used, top = pool.num_used, max(pool.used_blocks_at_or_above(0), default=3)
        size = min(pool.num_blocks + delta, 24) if delta > 0 else max(top + 1 + delta, 4)
        try:
            copies = self.kv.relocate(size)
        except NoFreeBlocksError:
            assert used > size
            return
        for src, dst in copies:
            assert src >= size > dst
            self.dev[dst] = list(self._slot(self.dev, src))
        self.kv.pool.resize(size)

    @invariant()
    def reads_back_own_tokens(self) -> None:
        self.kv.check_integrity()
        pool = self.kv.pool
        for block in range(pool.num_blocks):  # cached content must never be overwritten
            cached = pool.cached_tokens(block)
            own = tuple(kv[-1] if kv else None for kv in self._slot(self.dev, block))
            assert cached is None or own == cached
        for sid, toks in self.tokens.items():
            store = self.host if self.kv.is_swapped(sid) else self.dev
            table = self.kv.block_table(sid)
            got = [self._slot(store, table[p // BS])[p % BS] for p in range(self.computed[sid])]
            want = [tuple(toks[: p + 1]) for p in range(self.computed[sid])]
            assert got == want, f"seq {sid} reads foreign KV"

    def teardown(self) -> None:
        for sid in list(self.tokens):
            self.kv.free(sid)
        self.kv.check_integrity()
        assert self.kv.pool.num_used == 0 and self.kv.num_free_swap_blocks == 12


class NoCacheMachine(ManagerMachine):
    caching = False


MACHINE_SETTINGS = settings(
    max_examples=50,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("machine", [ManagerMachine, NoCacheMachine])
def test_manager_state_machine(machine: type[ManagerMachine]) -> None:
    run_state_machine_as_test(machine, settings=MACHINE_SETTINGS)


def test_manager_state_machine_with_colliding_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_cache_manager, "hash_block", lambda parent, tokens: sum(tokens) % 2)
    run_state_machine_as_test(ManagerMachine, settings=MACHINE_SETTINGS)
