"""Arbiter tests with fake reclaimers: grants, reclaim order, limits, sleep/wake, a state machine."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from elasticserve.core.arbiter import Arbiter, ArbiterError, ArbiterPolicy, ReclaimTier

PAGE = 1 << 20


class FakeModel:
    """A model's KV pages split into live (``used``), cached-only and free pages."""

    def __init__(self) -> None:
        self.used = self.cached = self.free = 0
        self.idle = False
        self.starved = False
        self.calls: list[tuple[str, int]] = []

    @property
    def mapped(self) -> int:
        return self.used + self.cached + self.free

    def reclaimable(self) -> tuple[int, int]:
        return self.free, self.cached

    def _take(self, n: int, order: tuple[str, ...]) -> int:
        got = 0
        for attr in order:
            k = min(n - got, getattr(self, attr))
            setattr(self, attr, getattr(self, attr) - k)
            got += k
        return got

    def free_pages(self, n: int) -> int:
        self.calls.append(("free", n))
        return self._take(n, ("free",))

    def drop_cached(self, n: int) -> int:
        self.calls.append(("cached", n))
        return self._take(n, ("free", "cached"))

    def preempt(self, n: int) -> int:
        self.calls.append(("preempt", n))
        return self._take(n, ("free", "cached", "used"))

    def sleep(self) -> int:
        self.calls.append(("sleep", self.mapped))
        n = self.mapped
        self.used = self.cached = self.free = 0
        return n

    def is_idle(self) -> bool:
        return self.idle

    def is_starved(self) -> bool:
        return self.starved


def make(budget_pages: int = 100, policy: ArbiterPolicy | None = None,
         clock: list[float] | None = None) -> Arbiter:
    t = clock if clock is not None else [0.0]
    return Arbiter(budget_pages * PAGE, PAGE, policy, clock=lambda: t[0])


def add(arb: Arbiter, name: str, weights: int = 10, used: int = 0, cached: int = 0, free: int = 0,
        priority: int = 0, min_pages: int = 0, max_pages: int | None = None) -> FakeModel:
    fake = FakeModel()
    arb.register(name, weights * PAGE, min_pages * PAGE,
                 None if max_pages is None else max_pages * PAGE, priority, fake)
    total = used + cached + free
    if total:
        assert arb.request(name, total) == total
        fake.used, fake.cached, fake.free = used, cached, free
    return fake


def test_import_is_torch_free() -> None:
    code = "import sys, elasticserve.core.arbiter; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_register_charges_weights_and_grants_fit_the_budget() -> None:
    arb = make(100)
    add(arb, "a", weights=30)
    assert arb.used_pages == 30 and arb.free_pages == 70
    assert arb.request("a", 50) == 50
    assert arb.request("a", 30) == 0  # all or nothing by default
    assert arb.request("a", 30, at_least=10) == 20  # partial: whatever is free
    arb.release("a", 40)
    assert arb.kv_pages("a") == 30 and arb.used_pages == 60
    arb.check_integrity()
    with pytest.raises(ArbiterError):
        arb.release("a", 31)
    with pytest.raises(ArbiterError):
        arb.register("a", 0, reclaimer=FakeModel())
    with pytest.raises(ArbiterError):
        add(arb, "huge", weights=200)
    assert "huge" not in arb.names()


def test_max_limit_caps_grants_and_min_must_not_exceed_max() -> None:
    arb = make(100)
    add(arb, "a", weights=0, max_pages=20)
    assert arb.request("a", 25) == 0
    assert arb.request("a", 25, at_least=5) == 20
    with pytest.raises(ValueError):
        arb.set_limits("a", min_bytes=30 * PAGE, max_bytes=20 * PAGE)
    # a ceiling below one page leaves the model no KV page: its requests would wait forever
    for tiny in (0, 1, PAGE - 1):
        with pytest.raises(ValueError, match="one KV page"):
            arb.set_limits("a", max_bytes=tiny)
        with pytest.raises(ValueError, match="one KV page"):
            arb.register(f"b{tiny}", 0, max_bytes=tiny, reclaimer=FakeModel())
    assert arb.snapshot().models["a"].max_bytes == 20 * PAGE


def test_reclaims_free_then_cached_then_preempts_lower_priority() -> None:
    arb = make(100)
    low = add(arb, "low", weights=10, used=20, cached=10, free=10, priority=0)
    high = add(arb, "high", weights=10, priority=1)
    assert arb.free_pages == 40
    assert arb.request("high", 45) == 45  # 5 pages short: the free pages of "low" are enough
    assert low.calls == [("free", 5)] and arb.kv_pages("low") == 35
    assert arb.request("high", 10) == 10  # 10 short: 5 free, then 5 cached
    assert [c[0] for c in low.calls[1:]] == ["free", "cached"]
    assert (low.used, low.cached, low.free) == (20, 5, 0)
    assert arb.request("high", 10) == 10  # the last 5 cached pages, then preempt for 5 more
    assert [c[0] for c in low.calls[3:]] == ["cached", "preempt"] and low.used == 15
    assert high.calls == []  # a requester is never reclaimed from for its own request
    arb.check_integrity()


def test_equal_priority_busy_model_is_not_preempted_without_fair_share() -> None:
    arb = make(100, ArbiterPolicy(fair_share=False))
    a = add(arb, "a", weights=10, used=80)
    add(arb, "b", weights=10)
    assert arb.free_pages == 0
    assert arb.request("b", 5) == 0
    assert a.calls == [] and a.used == 80  # nothing disturbed for a request that must fail


def test_fair_share_preempts_a_hog_down_to_its_share_only() -> None:
    arb = make(100)  # fair share: (100 - 20 weights) / 2 = 40 pages each
    a = add(arb, "a", weights=10, used=70)
    add(arb, "b", weights=10)
    assert arb.request("b", 30) == 30  # 10 free + 20 preempted from "a" (only the shortfall)
    assert a.used == 50
    assert arb.request("b", 20) == 0  # would put "b" above its share of 40
    assert a.used == 50
    assert arb.request("b", 10) == 10  # "b" at exactly its share: "a" goes down to 40
    assert a.used == 40
    arb.check_integrity()


def test_min_bytes_is_never_reclaimed() -> None:
    arb = make(100)
    low = add(arb, "low", weights=10, free=50, min_pages=40)
    add(arb, "high", weights=10, priority=5)
    assert arb.free_pages == 30
    assert arb.request("high", 40) == 40  # 10 short: "low" gives the 10 pages above its floor
    assert low.mapped == 40
    assert arb.request("high", 5) == 0  # "low" is at its floor and not idle
    assert low.mapped == 40


def test_sleeps_idle_models_least_popular_first() -> None:
    clock = [0.0]
    arb = make(100, clock=clock)
    pop = add(arb, "popular", weights=30)
    rare = add(arb, "rare", weights=30)
    busy = add(arb, "busy", weights=20)
    for _ in range(5):
        arb.note_request("popular")
    arb.note_request("rare")
    clock[0] = 10.0
    pop.idle = rare.idle = True
    assert arb.request("busy", 40) == 40  # 20 free + the weights of one idle model
    snap = arb.snapshot()
    assert not snap.models["rare"].awake and snap.models["popular"].awake
    assert rare.calls == [("sleep", 0)] and pop.calls == []
    assert arb.stats["sleeps"] == 1
    busy.used = 40
    pop.idle = False
    assert not arb.wake("rare")  # 10 free + 15 above busy's fair share < 30 weights pages
    assert busy.used == 40 and pop.calls == []
    arb.release("busy", 30)
    busy.used = 10
    assert arb.wake("rare") and arb.stats["wakes"] == 1
    with pytest.raises(ArbiterError):
        arb.sleep("nobody")
    arb.check_integrity()


def test_asleep_model_cannot_request_and_busy_models_are_not_slept() -> None:
    arb = make(60)
    a = add(arb, "a", weights=20, used=10)
    add(arb, "b", weights=20)
    a.idle = False
    assert arb.request("b", 20) == 0  # "a" is busy: not slept, not preempted (equal priority)
    assert arb.sleep("a") == 30 and a.mapped == 0
    with pytest.raises(ArbiterError):
        arb.request("a", 1)
    assert arb.request("b", 20) == 20


def test_set_limits_lower_max_takes_pages_back_from_the_model_itself() -> None:
    arb = make(100)
    a = add(arb, "a", weights=10, used=30, cached=10, free=10)
    arb.set_limits("a", max_bytes=25 * PAGE)
    assert arb.kv_pages("a") == 25 and a.mapped == 25 and a.used == 25
    assert [c[0] for c in a.calls] == ["free", "cached", "preempt"]
    arb.set_limits("a", priority=3)
    assert arb.snapshot().models["a"].priority == 3
    arb.check_integrity()


def test_set_limits_restores_limits_when_the_model_cannot_shrink() -> None:
    arb = make(100)

    class Stubborn(FakeModel):
        def preempt(self, n: int) -> int:
            return 0

    s = Stubborn()
    arb.register("s", 0, reclaimer=s)
    assert arb.request("s", 30) == 30
    s.used = 30
    with pytest.raises(ArbiterError):
        arb.set_limits("s", max_bytes=10 * PAGE)
    assert arb.snapshot().models["s"].max_bytes is None
    arb.check_integrity()


def test_lying_reclaimer_is_caught() -> None:
    arb = make(100)

    class Liar(FakeModel):
        def free_pages(self, n: int) -> int:
            return n + 100

    liar = Liar()
    arb.register("liar", 10 * PAGE, reclaimer=liar)
    assert arb.request("liar", 50) == 50
    liar.free = 50
    add(arb, "b", weights=10)
    with pytest.raises(ArbiterError):
        arb.request("b", 40)


def test_concurrent_requests_and_releases_keep_the_books() -> None:
    arb = make(1000)
    names = [f"m{i}" for i in range(4)]
    for n in names:
        add(arb, n, weights=10)

    def worker(name: str) -> None:
        held = 0
        for i in range(2000):
            if i % 3 == 2 and held:
                arb.release(name, 1)
                held -= 1
            else:
                held += arb.request(name, 1)
        arb.release(name, held)

    threads = [threading.Thread(target=worker, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    arb.check_integrity()
    assert arb.used_pages == 40


class ArbiterMachine(RuleBasedStateMachine):
    """Random register/request/release/sleep/wake/limits; books always balance."""

    NAMES = ("a", "b", "c", "d")

    def __init__(self) -> None:
        super().__init__()
        self.clock = [0.0]
        self.arb = make(120, clock=self.clock)
        self.fakes: dict[str, FakeModel] = {}

    @rule(name=st.sampled_from(NAMES), weights=st.integers(0, 40), prio=st.integers(0, 2),
          lo=st.integers(0, 20), span=st.none() | st.integers(0, 60),
          key=st.none() | st.just("replicas"))
    def register(self, name: str, weights: int, prio: int, lo: int, span: int | None,
                 key: str | None) -> None:
        if name in self.fakes:
            return
        fake = FakeModel()
        hi = None if span is None else (lo + span) * PAGE
        if hi is not None and hi < PAGE:  # a ceiling below one KV page is refused outright
            with pytest.raises(ValueError, match="one KV page"):
                self.arb.register(name, weights * PAGE, lo * PAGE, hi, prio, fake)
            assert name not in self.arb.names()
            return
        if key is not None:
            weights = 8  # replicas share one copy: the same size
        try:
            self.arb.register(name, weights * PAGE, lo * PAGE, hi, prio, fake, weights_key=key)
        except ArbiterError:
            assert name not in self.arb.names()
            return
        self.fakes[name] = fake

    @precondition(lambda self: self.fakes)
    @rule(data=st.data(), pages=st.integers(0, 50), partial=st.booleans())
    def request(self, data: st.DataObject, pages: int, partial: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.fakes)))
        if not self.arb.is_awake(name):
            with pytest.raises(ArbiterError):
                self.arb.request(name, pages)
            return
        got = self.arb.request(name, pages, at_least=pages // 2 if partial else None)
        assert got == 0 or (pages // 2 if partial else pages) <= got <= pages
        self.fakes[name].used += got

    @precondition(lambda self: self.fakes)
    @rule(data=st.data(), frac=st.floats(0, 1))
    def finish_work(self, data: st.DataObject, frac: float) -> None:
        """Model side: live pages become cached or free (requests finished)."""
        fake = self.fakes[data.draw(st.sampled_from(sorted(self.fakes)))]
        k = int(fake.used * frac)
        fake.used -= k
        fake.cached += k // 2
        fake.free += k - k // 2

    @precondition(lambda self: self.fakes)
    @rule(data=st.data())
    def release_free(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.fakes)))
        fake = self.fakes[name]
        self.arb.release(name, fake.free)
        fake.free = 0

    @precondition(lambda self: self.fakes)
    @rule(data=st.data(), idle=st.booleans(), dt=st.floats(0, 30))
    def idle_or_busy(self, data: st.DataObject, idle: bool, dt: float) -> None:
        self.fakes[data.draw(st.sampled_from(sorted(self.fakes)))].idle = idle
        self.clock[0] += dt

    @precondition(lambda self: self.fakes)
    @rule(data=st.data(), wake=st.booleans())
    def sleep_or_wake(self, data: st.DataObject, wake: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.fakes)))
        if wake:
            self.arb.wake(name)
        else:
            self.arb.sleep(name)
            assert self.fakes[name].mapped == 0

    @precondition(lambda self: self.fakes)
    @rule(data=st.data(), hi=st.none() | st.integers(0, 80), prio=st.integers(0, 2))
    def limits(self, data: st.DataObject, hi: int | None, prio: int) -> None:
        name = data.draw(st.sampled_from(sorted(self.fakes)))
        lo = self.arb.snapshot().models[name].min_bytes
        if hi is not None and hi * PAGE < lo:
            return
        if hi == 0:  # a ceiling below one KV page is refused outright, nothing changes
            with pytest.raises(ValueError, match="one KV page"):
                self.arb.set_limits(name, max_bytes=0, priority=prio)
            return
        try:
            self.arb.set_limits(name, max_bytes=None if hi is None else hi * PAGE, priority=prio)
        except ArbiterError:
            pass  # could not shrink enough: limits restored, books still balance

    @invariant()
    def books_balance(self) -> None:
        self.arb.check_integrity()
        snap = self.arb.snapshot()
        for name, fake in self.fakes.items():
            assert fake.mapped == snap.models[name].kv_pages, name  # nothing leaked
        awake = [m for m in snap.models.values() if m.awake]
        # replicas (one weights_key, 8 pages each) are charged once while any is awake
        weights = sum(m.weights_pages for m in awake if m.weights_key is None) + \
            (8 if any(m.weights_key for m in awake) else 0)
        assert snap.weights_pages == weights
        assert snap.used_pages == weights + sum(f.mapped for f in self.fakes.values())


ArbiterMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                            deadline=None)
TestArbiterMachine = ArbiterMachine.TestCase


def test_free_pages_of_a_starved_peer_within_its_share_are_protected() -> None:
    arb = make(100)  # fair share (100 - 20) / 2 = 40
    a = add(arb, "a", weights=10, used=50)
    b = add(arb, "b", weights=10, used=20, free=10)
    assert arb.free_pages == 0
    b.starved = True  # b's free pages are about to serve its queue
    assert arb.request("a", 5) == 0 and b.free == 10
    b.starved = False  # nobody waits: free pages are fair game
    assert arb.request("a", 5) == 5 and b.free == 5
    a.used += 5
    arb.check_integrity()


def test_reclaimer_that_is_never_starved_gives_all_its_free_pages() -> None:
    class Minimal:  # the least a Reclaimer does: never queues, so never starved
        def __init__(self, free: int) -> None:
            self.free = free

        def reclaimable(self) -> tuple[int, int]:
            return self.free, 0

        def free_pages(self, n: int) -> int:
            k = min(n, self.free)
            self.free -= k
            return k

        def drop_cached(self, n: int) -> int:
            return self.free_pages(n)

        def preempt(self, n: int) -> int:
            return self.free_pages(n)

        def sleep(self) -> int:
            return 0

        def is_idle(self) -> bool:
            return False

        def is_starved(self) -> bool:
            return False

    arb = make(100)
    arb.register("a", 10 * PAGE, reclaimer=Minimal(0))
    arb.register("b", 10 * PAGE, reclaimer=(b := Minimal(0)))
    assert arb.request("b", 80) == 80
    b.free = 30
    assert arb.request("a", 50, at_least=30) == 30  # b cannot say it is starved: all 30 go
    arb.check_integrity()


def test_tiers_run_cheapest_first_and_report_under_their_plain_names() -> None:
    assert list(ReclaimTier) == ["free", "cached", "preempt", "sleep"]
    arb = make(100)
    low = add(arb, "low", weights=10, used=10, free=10, cached=10, priority=0)
    add(arb, "high", weights=10, used=0, priority=1)
    assert arb.request("high", 70) == 70
    assert [c[0] for c in low.calls] == [ReclaimTier.FREE, ReclaimTier.CACHED]
    stats = json.loads(json.dumps(arb.stats))
    assert stats["free"] == 10 and stats["cached"] == 10 and stats["preempt"] == 0


class MidStepModel(FakeModel):
    """A model always in the middle of a step (its lock taken): a preemption is owed and paid
    at the end of its step, as ModelHost does."""

    def __init__(self) -> None:
        super().__init__()
        self.owed = 0

    def preempt(self, n: int) -> int:
        self.calls.append(("owe", n))
        self.owed = max(self.owed, n)
        return 0

    def end_step(self, arb: Arbiter, name: str) -> None:
        paid = self._take(self.owed, ("free", "cached", "used"))
        self.owed = 0
        if paid:
            arb.release(name, paid)


def test_a_starved_model_gets_a_page_within_a_time_slice_and_one_neighbour_step() -> None:
    # issue 10 item 9: with fewer KV pages than busy models the fair share rounds to 0, and a
    # model with no page waited for as long as its neighbour's burst lasted (93 s)
    t = [0.0]
    arb = make(11, clock=t)  # weights 5 + 5: one KV page for two busy models
    b = MidStepModel()
    arb.register("b", 5 * PAGE, reclaimer=b)
    assert arb.request("b", 1) == 1
    b.used = 1
    a = FakeModel()
    arb.register("a", 5 * PAGE, reclaimer=a)
    a.starved = b.starved = True
    hold = arb.policy.min_hold_s
    t[0] = hold / 2
    assert arb.request("a", 1) == 0 and b.owed == 0  # b's time slice is not over
    t[0] = hold
    got_at = None
    for call in range(1, 4):  # a asks every step; b is mid-step whenever asked
        if arb.request("a", 1):
            got_at = call
            break
        b.end_step(arb, "b")  # b pays what it owes at the end of its step...
        assert arb.request("b", 1) == 0  # ...and its burst asks again: the page is a's
    assert got_at == 2 and b.mapped == 0
    a.used = 1
    arb.check_integrity()
    # the turn passes back after a's slice, not before (no ping-pong every step)
    t[0] += hold / 2
    assert arb.request("b", 1) == 0 and a.used == 1
    t[0] += hold / 2
    assert arb.request("b", 1) == 1 and a.used == 0
    arb.check_integrity()
