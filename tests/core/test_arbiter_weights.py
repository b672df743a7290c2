"""Replicas of one model (one weights_key) are charged their shared weights once."""

from __future__ import annotations

import pytest

from elasticserve.core.arbiter import Arbiter, ArbiterPolicy
from tests.core.test_arbiter import PAGE, FakeModel


def books(arb: Arbiter) -> tuple[int, int]:
    """(used pages, what the snapshot's parts add up to); check_integrity must agree."""
    arb.check_integrity()
    snap = arb.snapshot()
    return snap.used_pages, sum(m.kv_pages for m in snap.models.values()) + snap.weights_pages


def replicas(arb: Arbiter, n: int, weights: int = 30, key: str | None = "m") -> list[FakeModel]:
    fakes = [FakeModel() for _ in range(n)]
    for i, fake in enumerate(fakes):
        arb.register(f"r{i}", weights * PAGE, reclaimer=fake, weights_key=key)
    return fakes


def test_replicas_charge_weights_once_until_the_last_sleeps() -> None:
    arb = Arbiter(100 * PAGE, PAGE)
    fakes = replicas(arb, 3)
    assert books(arb) == (30, 30)
    assert arb.snapshot().models["r1"].weights_key == "m"
    assert arb.request("r0", 10) == 10 and arb.request("r2", 5) == 5
    fakes[0].used, fakes[2].used = 10, 5
    assert books(arb) == (45, 45)
    assert arb.sleep("r0") == 10  # others of the key awake: only its KV goes
    assert arb.sleep("r1") == 0
    assert books(arb) == (35, 35)
    assert arb.sleep("r2") == 35  # the last awake replica takes the weights with it
    assert books(arb) == (0, 0)
    assert arb.wake("r1") and books(arb) == (30, 30)  # the first wake charges them
    assert arb.wake("r0") and books(arb) == (30, 30)  # the next ones do not
    arb.cancel_wake("r0")
    assert books(arb) == (30, 30)
    arb.cancel_wake("r1")  # the last one awake: its weights go
    assert books(arb) == (0, 0)


def test_unregister_frees_the_weights_with_the_last_replica() -> None:
    arb = Arbiter(100 * PAGE, PAGE)
    replicas(arb, 2)
    arb.unregister("r0")
    assert books(arb) == (30, 30)
    arb.unregister("r1")
    assert books(arb) == (0, 0)


def test_no_key_is_one_copy_each_and_keys_do_not_mix() -> None:
    arb = Arbiter(100 * PAGE, PAGE)
    replicas(arb, 2, weights=20, key=None)
    arb.register("x", 20 * PAGE, reclaimer=FakeModel(), weights_key="other")
    assert books(arb) == (60, 60)


def test_replicas_must_agree_on_the_weights_size() -> None:
    arb = Arbiter(100 * PAGE, PAGE)
    replicas(arb, 1)
    with pytest.raises(ValueError, match="weights_bytes"):
        arb.register("odd", 31 * PAGE, reclaimer=FakeModel(), weights_key="m")
    assert books(arb) == (30, 30)


def test_a_replica_fits_where_a_second_copy_would_not() -> None:
    arb = Arbiter(70 * PAGE, PAGE)
    replicas(arb, 2, weights=30)  # 60 pages if each were charged
    assert arb.request("r1", 30) == 30
    with pytest.raises(Exception, match="no room"):
        arb.register("copy", 30 * PAGE, reclaimer=FakeModel())


def test_sleeping_a_replica_frees_only_its_kv_for_a_requester() -> None:
    arb = Arbiter(60 * PAGE, PAGE, ArbiterPolicy(reclaim_free=False, reclaim_cached=False,
                                                 preempt=False))
    a, b = replicas(arb, 2, weights=30)
    a.idle = True
    assert arb.request("r0", 20) == 20
    a.used = 20
    # 10 free: r1 wants 35, and sleeping r0 would free its 20 KV pages, not the shared weights
    # (r1 uses them): the arbiter does not even try
    assert arb.request("r1", 35) == 0
    assert books(arb) == (50, 50) and arb.is_awake("r0")
    assert arb.request("r1", 30) == 30
    assert not arb.is_awake("r0") and books(arb) == (60, 60)
