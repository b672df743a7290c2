"""The host tier's prefix cache, torch-free: evicted device blocks are offloaded with their
chain, a later prompt onloads them, the host LRU evicts leaves first and yields to swaps, pinned
blocks are never handed out, and the books stay exact throughout."""

from __future__ import annotations

from elasticserve.core.block_pool import BlockPool
from elasticserve.core.prefix_hash import block_hashes
from elasticserve.core.tiered_kv import TieredKVCacheManager, tier_stats

BS = 4


def tokens(seed: int, n: int) -> list[int]:
    return [seed * 100 + i for i in range(n)]


def make(device: int, host: int) -> tuple[TieredKVCacheManager, list[tuple[int, int]]]:
    mgr = TieredKVCacheManager(BlockPool(device), BS, num_swap_blocks=host)
    copies: list[tuple[int, int]] = []
    mgr.copy_to_host = copies.extend
    return mgr, copies


def compute(mgr: TieredKVCacheManager, sid: int, toks: list[int]) -> int:
    """Admit a prompt, 'compute' it and publish its full blocks; returns the tokens it hit."""
    hit = mgr.allocate_prompt(sid, toks)
    mgr.append_slots(sid, hit, len(toks) - hit)
    mgr.cache_blocks(sid, toks, len(toks))
    mgr.check_integrity()
    return hit


def test_evicted_chain_is_offloaded_and_onloaded_back() -> None:
    mgr, copies = make(device=4, host=8)
    a = tokens(1, 13)  # three full blocks and one token
    compute(mgr, 1, a)
    device_a = mgr.block_table(1)[:3]
    mgr.free(1)
    compute(mgr, 2, tokens(2, 16))  # needs all four device blocks: A's three are evicted
    assert copies and sorted(d for d, _ in copies) == sorted(device_a)
    assert len(mgr.host_cache) == 3 and mgr.host_prefix_offloaded_blocks == 3
    mgr.free(2)
    hosts = {d: h for d, h in copies}
    assert mgr.allocate_prompt(3, a) == 12  # a device miss, a host hit on all three blocks
    mgr.check_integrity()  # the pinned sources count as references
    onloads = mgr.take_onloads()
    assert [h for h, _ in onloads] == [hosts[d] for d in device_a]
    assert [d for _, d in onloads] == mgr.block_table(3)[:3]
    mgr.end_step()
    mgr.check_integrity()
    stats = tier_stats(mgr)
    assert stats["host_prefix_hit_tokens"] == 12 and stats["host_prefix_onloaded_blocks"] == 3
    # once computed, the onloaded blocks are device prefix blocks again
    mgr.append_slots(3, 12, 1)
    mgr.cache_blocks(3, a, 13)
    assert all(mgr.pool.is_cached(b) for b in mgr.block_table(3)[:3])
    mgr.check_integrity()


def test_a_request_not_admitted_drops_its_onloads() -> None:
    mgr, _ = make(device=4, host=8)
    a = tokens(1, 9)
    compute(mgr, 1, a)
    mgr.free(1)
    compute(mgr, 2, tokens(2, 16))
    mgr.free(2)
    assert mgr.allocate_prompt(3, a) == 8
    onloaded = list(mgr.block_table(3))
    mgr.free(3)  # the scheduler un-admits it in the same step
    assert mgr.take_onloads() == [] and mgr.host_prefix_hit_tokens == 0
    mgr.end_step()
    mgr.check_integrity()
    # its device blocks went back uncached: no one can hit KV that never arrived
    assert not any(mgr.pool.is_cached(b) for b in onloaded)


def test_host_hit_needs_the_same_whole_prefix() -> None:
    mgr, _ = make(device=3, host=8)
    a = tokens(1, 9)
    compute(mgr, 1, a)
    mgr.free(1)
    compute(mgr, 2, tokens(2, 12))
    mgr.free(2)
    # same second block after a different first block: no hit past a root that differs
    assert mgr.allocate_prompt(3, tokens(3, 4) + a[4:]) == 0
    mgr.free(3)
    assert mgr.allocate_prompt(4, a[:4] + tokens(5, 5)) == 4  # the root alone matches
    mgr.check_integrity()
    mgr.end_step()
    mgr.check_integrity()


def host_hits(mgr: TieredKVCacheManager, toks: list[int]) -> int:
    blocks = [tuple(toks[i:i + BS]) for i in range(0, len(toks) - BS + 1, BS)]
    return len(mgr.host_cache.lookup(list(zip(block_hashes(toks, BS), blocks, strict=True))))


def test_full_host_cache_evicts_least_recent_leaves_first() -> None:
    mgr, _ = make(device=3, host=4)
    a, c = tokens(1, 12), tokens(3, 12)
    compute(mgr, 1, a)
    mgr.free(1)
    compute(mgr, 2, c)  # evicts A from the device: its chain (3 blocks) goes to host
    mgr.free(2)
    assert host_hits(mgr, a) == 3 and mgr.host_blocks.num_free == 1
    compute(mgr, 3, tokens(2, 8))  # evicts C: the full tier drops A's leaves for it
    mgr.check_integrity()
    assert mgr.host_blocks.num_used == 4 and mgr.host_blocks.num_free == 0  # the budget
    assert host_hits(mgr, c) == 3 and host_hits(mgr, a) == 1  # A's root outlived its leaves
    assert mgr.host_cache.evict() == 4 and mgr.host_blocks.num_free == 4
    mgr.check_integrity()


def test_pinned_host_blocks_hold_and_the_cache_yields_to_swap_out() -> None:
    mgr, _ = make(device=4, host=4)
    a = tokens(1, 8)
    compute(mgr, 1, a)
    mgr.free(1)
    compute(mgr, 2, tokens(2, 16))  # A's two blocks go to host
    mgr.free(2)
    assert mgr.allocate_prompt(6, a + [0]) == 8  # onloads A, evicting seq 2's chain
    pinned = [h for h, _ in mgr.take_onloads()]
    assert [mgr.host_blocks.ref_count(h) for h in pinned] == [2, 2]
    # seq 2's chain found two free host blocks and no more: the pinned A blocks were skipped
    assert len(mgr.host_cache) == 4 and host_hits(mgr, a) == 2
    mgr.check_integrity()
    mgr.end_step()
    assert [mgr.host_blocks.ref_count(h) for h in pinned] == [1, 1]
    mgr.append_slots(6, 8, 1)
    mgr.cache_blocks(6, a + [0], 9)
    assert mgr.host_blocks.num_free == 0 and mgr.host_cache.evictable() == 4
    assert mgr.can_swap_out([6])  # three blocks: the cache makes room
    assert len(mgr.swap_out([6])) == 3 and len(mgr.host_cache) == 1
    mgr.check_integrity()


def test_evicting_a_long_chain_walks_each_link_once() -> None:
    mgr, copies = make(device=200, host=200)
    long = tokens(7, 200 * BS)
    compute(mgr, 1, long[: 199 * BS + 1])
    mgr.free(1)  # tail first: the LRU evicts the deepest block first
    walked: list[int] = []
    offload = mgr.host_cache.offload

    def counting(anchor, links):  # type: ignore[no-untyped-def]
        walked.append(len(links))
        return offload(anchor, links)

    mgr.host_cache.offload = counting  # type: ignore[method-assign]
    compute(mgr, 2, tokens(8, 200 * BS))  # evicts all 199 cached blocks
    assert len(copies) == 199 and sum(walked) == 199  # not 199 * 200 / 2
    assert mgr.host_prefix_offloaded_blocks == 199
