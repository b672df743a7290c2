"""The page broker's protocol and books, with the worker's side played by this test."""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterator

import pytest

from elasticserve.procs.messages import (
    BrokerError,
    CancelWake,
    Grant,
    Granted,
    Reclaim,
    Reclaimed,
    Registered,
    RegisterWorker,
    Release,
    Wake,
)
from elasticserve.procs.page_broker import PageBroker
from elasticserve.procs.transport import Channel, channel_pair

PAGE = 64 << 10
GONE: list[str] = []  # workers the broker's on_worker_gone hook was told about


@pytest.fixture
def broker() -> Iterator[PageBroker]:
    b = PageBroker(10 * PAGE, PAGE, reclaim_deadline_s=0.3,
                   extra_handlers={tuple: lambda worker, msg: ((worker, msg), [])},
                   on_worker_gone=[GONE.append])
    yield b
    b.close()


def connect(broker: PageBroker, name: str) -> tuple[Channel, Channel]:
    pages, pages_w = channel_pair()
    reclaim, reclaim_w = channel_pair()
    broker.serve(name, pages, reclaim)
    return pages_w, reclaim_w


def register(ch: Channel, name: str, kv_pages: int = 4) -> int:
    reply, fds = ch.request(RegisterWorker(name, "m", 2 * PAGE, kv_pages * PAGE))
    assert reply == Registered(PAGE, kv_pages) and len(fds) == 1
    return fds[0]


def granted(pages: int, mapped: int) -> Granted:
    """A worker of its own group: the slots behind its pages are their indices."""
    return Granted(pages, tuple(range(mapped, mapped + pages)))


def touch(fd: int, pages: int) -> None:
    """Write every page of the prefix, as a worker's KV does once it is mapped."""
    with mmap.mmap(fd, pages * PAGE) as m:
        for i in range(pages):
            m[i * PAGE:(i + 1) * PAGE] = b"\1" * PAGE


def test_grants_releases_and_punching(broker: PageBroker) -> None:
    ch, _ = connect(broker, "w")
    assert isinstance(ch.request(Grant(1, 1, 0))[0], BrokerError)  # not registered yet
    fd = register(ch, "w")
    assert broker.arbiter.used_pages == 2  # weights
    assert ch.request(Grant(3, 1, 0))[0] == granted(3, 0)
    touch(fd, 3)
    assert os.fstat(fd).st_blocks * 512 >= 3 * PAGE
    broker.check_integrity()
    assert ch.request(Release(2, 1))[0] is None
    assert broker.held("w") == 1 and os.fstat(fd).st_blocks * 512 <= PAGE
    broker.check_integrity()
    assert ch.request(Grant(4, 4, 1))[0] == granted(0, 1)  # beyond the memfd's 4 slots
    assert ch.request(Grant(4, 2, 1))[0] == granted(3, 1)
    # a worker claiming to map more than it was granted is refused, books unchanged
    reply = ch.request(Grant(1, 1, 5))[0]
    assert isinstance(reply, BrokerError) and "maps 5" in reply.message
    assert ch.request(("weights?", 1))[0] == ("w", ("weights?", 1))  # extra handler
    # a Grant from a worker that maps fewer pages than booked (a late reclaim) books them
    # (held 4, maps 0)
    assert ch.request(Grant(1, 1, 0))[0] == granted(1, 0) and broker.held("w") == 1
    assert broker.arbiter.kv_pages("w") == 1
    os.close(fd)


def test_replicas_share_weights_and_a_death_returns_everything(broker: PageBroker) -> None:
    (a, reclaim_a), (b, _) = connect(broker, "a"), connect(broker, "b")
    fa, fb = register(a, "a"), register(b, "b", kv_pages=8)
    assert broker.arbiter.used_pages == 2  # one copy for both
    assert isinstance(b.request(RegisterWorker("b", "m", 2 * PAGE, PAGE))[0], BrokerError)
    assert a.request(Grant(4, 4, 0))[0] == granted(4, 0)
    touch(fa, 4)
    # 4 pages free: b's 5 would need a's pages and a does not answer reclaims
    assert b.request(Grant(5, 5, 0))[0] == granted(0, 0)
    assert broker.reclaim_timeouts == 1 and isinstance(reclaim_a.recv()[0], Reclaim)
    a.close()  # a dies
    for _ in range(200):
        if GONE[-1:] == ["a"]:  # the hook runs last in worker_died
            break
        threading.Event().wait(0.01)
    assert broker.dead == ["a"] == GONE[-1:] and os.fstat(fa).st_blocks == 0
    assert broker.arbiter.used_pages == 2  # b still holds the shared weights
    assert b.request(Grant(5, 5, 0))[0] == granted(5, 0)
    broker.check_integrity()
    assert b.request(Release(5, 0))[0] is None
    assert b.request(CancelWake())[0] is None and broker.arbiter.used_pages == 0
    assert b.request(Wake())[0] is True and broker.arbiter.used_pages == 2
    os.close(fa)
    os.close(fb)


def test_reclaim_books_what_the_worker_maps_after(broker: PageBroker) -> None:
    a, reclaim_a = connect(broker, "a")
    b, _ = connect(broker, "b")
    fa = register(a, "a", kv_pages=8)
    register(b, "b")
    assert a.request(Grant(8, 8, 0))[0] == granted(8, 0)
    touch(fa, 8)

    def worker_a() -> None:  # a probe, then a free_pages call that leaves 5 pages mapped
        for _ in range(2):
            msg, _ = reclaim_a.recv()
            assert isinstance(msg, Reclaim)
            if msg.op == "probe":
                reclaim_a.send(Reclaimed(msg.request_id, None, None, (3, 0, True, False)))
            else:
                reclaim_a.send(Reclaimed(msg.request_id, 3, 5))

    t = threading.Thread(target=worker_a)
    t.start()
    assert b.request(Grant(3, 3, 0))[0] == granted(3, 0)
    t.join(5)
    assert broker.held("a") == 5 and os.fstat(fa).st_blocks * 512 <= 5 * PAGE
    assert broker.arbiter.stats["free"] == 3
    broker.check_integrity()
    os.close(fa)
