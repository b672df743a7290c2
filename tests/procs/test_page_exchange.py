"""Pages change owner within a KV group (procs/kv_groups.py): a worker P lends pages, a worker D
takes them into its own KV range, zero bytes copied; real `PageBroker`, real channels, real
`RemotePageBroker` + host backends, and a real process for P where it dies with an open offer."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from elasticserve.core.arbiter import ArbiterError
from elasticserve.memory.vtensor import VirtualTensor
from elasticserve.procs.page_broker import PageBroker
from elasticserve.procs.page_client import PageBrokerError, RemotePageBroker
from elasticserve.procs.transport import Channel, channel_pair
from tests.memory.memory_helpers import kernel_vmas

ROOT = Path(__file__).resolve().parents[2]
PAGE = 64 << 10
KV = 8 * PAGE  # each member's KV reservation


class Member:
    """A worker's side played in this process: a RemotePageBroker and a KV range on it."""

    def __init__(self, broker: PageBroker, name: str, group: str | None = "g") -> None:
        pages, pages_w = channel_pair()
        reclaim, self.reclaim = channel_pair()
        broker.serve(name, pages, reclaim)
        self.client = RemotePageBroker(pages_w, name, KV, PAGE, kv_group=group)
        self.client.attach_model(0)
        self.vt = VirtualTensor(self.client.backend, KV, torch.uint8, (PAGE,))

    def grow(self, n: int) -> None:
        self.vt.map_pages(self.client.grant(n, n))

    def shrink(self, n: int) -> None:
        self.vt.unmap_pages(n)
        self.client.release(n)  # books what this process no longer maps

    def crc(self, index: int) -> int:
        return zlib.crc32(self.vt.tensor[index].numpy().tobytes())

    def vmas_exact(self) -> bool:
        return self.client.backend.map_entries(self.vt.vrange) == kernel_vmas(self.vt.vrange)

    def close(self) -> None:
        self.vt.close()
        self.client.backend.close()
        self.client.channel.close()
        self.reclaim.close()


def fill(page: torch.Tensor, seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    page.copy_(torch.randint(0, 256, (PAGE,), generator=gen, dtype=torch.uint8))
    return zlib.crc32(page.numpy().tobytes())


def blocks(broker: PageBroker, group: str = "g") -> int:
    """Bytes of memory the group's file has allocated."""
    return os.fstat(broker.groups[group].fd).st_blocks * 512


def wait_dead(broker: PageBroker, name: str) -> None:
    deadline = time.monotonic() + 10
    while name not in broker.dead:
        assert time.monotonic() < deadline, f"{name} not seen dying"
        time.sleep(0.01)


@pytest.fixture
def broker() -> Iterator[PageBroker]:
    b = PageBroker(64 * PAGE, PAGE)
    yield b
    b.close()


def test_a_page_changes_hands_with_zero_copies(broker: PageBroker) -> None:
    p, d = Member(broker, "P"), Member(broker, "D")
    p.grow(4)
    d.grow(4)
    group = broker.groups["g"]
    assert group.backing == {"P": [0, 1, 2, 3], "D": [4, 5, 6, 7]}
    for i in range(4):  # every page holds memory now
        fill(p.vt.tensor[i], i)
        d.vt.tensor[i].fill_(0xDD)
    assert blocks(broker) == 8 * PAGE
    want = p.crc(2)
    p.client.offer("h1", [2])
    broker.check_integrity()
    with pytest.raises(PageBrokerError, match="indices"):
        p.client.offer("h2", [2])  # offered already
    with pytest.raises(PageBrokerError, match="indices"):
        p.client.offer("h2", [4])  # not held
    with pytest.raises(PageBrokerError, match="mine"):
        d.client.take("P", "h1", [0, 1])  # not as many pages as offered
    d.client.take("P", "h1", [1])
    broker.check_integrity()
    assert group.backing == {"P": [0, 1, 5, 3], "D": [4, 2, 6, 7]}
    assert d.crc(1) == want == p.crc(2)  # P still maps it: the same page, read by both
    assert blocks(broker) == 7 * PAGE  # the slot D gave up was punched
    d.vt.tensor[1, :64].fill_(7)  # a write through D shows through P's mapping
    assert p.vt.tensor[2, :64].eq(7).all()
    want = d.crc(1)
    assert p.vmas_exact() and d.vmas_exact()
    assert d.client.backend.map_entries(d.vt.vrange) == 4  # [0] [1] [2, 3] rest
    with pytest.raises(PageBrokerError, match="taken already"):
        d.client.take("P", "h1", [0])
    assert p.client.withdraw("h1") == 1
    broker.check_integrity()
    assert int(p.vt.tensor[2].count_nonzero()) == 0  # the blank slot D gave up
    p.vt.tensor[2].fill_(1)  # P reuses its page: D's is untouched
    assert d.crc(1) == want
    assert p.vmas_exact() and d.vmas_exact()
    with pytest.raises(PageBrokerError, match="gone"):
        d.client.take("P", "h1", [0])  # Take after Withdraw
    with pytest.raises(PageBrokerError, match="not an open offer"):
        p.client.withdraw("h1")
    d.shrink(4)  # the taken page goes back with D's others: only P's 4 pages remain
    broker.check_integrity()
    assert blocks(broker) == 4 * PAGE and group.backing["D"] == [] and sorted(group.free) == [2, 4, 6, 7]
    d.grow(2)  # lowest free slots first
    assert group.backing["D"] == [2, 4] and broker.arbiter.kv_pages("D") == 2
    broker.check_integrity()
    p.close()
    d.close()


def test_an_offer_dies_with_a_released_page_and_self_take_is_refused(
        broker: PageBroker) -> None:
    p, d = Member(broker, "P"), Member(broker, "D")
    p.grow(3)
    d.grow(2)
    p.client.offer("h", [2, 0])
    with pytest.raises(PageBrokerError, match="is the taker"):
        p.client.take("P", "h", [1, 0])
    p.shrink(1)  # P gives up offered page 2 before anyone took it
    with pytest.raises(PageBrokerError, match="lost a page"):
        d.client.take("P", "h", [0, 1])
    assert p.client.withdraw("h") == 0
    broker.check_integrity()
    with pytest.raises(RuntimeError, match="no slot queued"):
        p.vt.map_pages(1)  # a page the broker did not grant
    group = broker.groups["g"]
    mine, group.backing["D"][1] = group.backing["D"][1], group.backing["P"][0]
    with pytest.raises(ArbiterError, match="a slot backs two pages"):
        broker.check_integrity()  # the books' check catches a slot behind two pages
    group.backing["D"][1] = mine
    broker.check_integrity()
    p.close()
    d.close()


def test_a_worker_without_a_group_keeps_one_mapping_and_cannot_trade(
        broker: PageBroker) -> None:
    solo, other = Member(broker, "solo", group=None), Member(broker, "other", group=None)
    g = Member(broker, "g1")
    for m in (solo, other, g):
        m.grow(5)
    assert broker.workers["solo"].group is not broker.workers["other"].group
    assert broker.workers["solo"].group.backing == {"solo": [0, 1, 2, 3, 4]}
    assert solo.client.backend.map_entries(solo.vt.vrange) == kernel_vmas(solo.vt.vrange) == 2
    solo.shrink(2)
    solo.grow(1)  # identity slots again: still one mapping for the prefix
    assert broker.workers["solo"].group.backing == {"solo": [0, 1, 2, 3]}
    assert solo.vmas_exact() and kernel_vmas(solo.vt.vrange) == 2
    solo.client.offer("x", [0])
    with pytest.raises(PageBrokerError, match="not a live member"):
        g.client.take("solo", "x", [0])  # another group
    with pytest.raises(PageBrokerError, match="not a live member"):
        other.client.take("solo", "x", [0])  # a group of one has no peers
    broker.check_integrity()
    for m in (solo, other, g):
        m.close()


class ChildMember:
    """P in its own process (tests/procs/exchange_worker.py)."""

    def __init__(self, broker: PageBroker, name: str) -> None:
        (pages, pages_w), (reclaim, self.reclaim), (self.control, control_w) = (
            channel_pair(), channel_pair(), channel_pair())
        broker.serve(name, pages, reclaim)
        fds = [pages_w.fileno(), control_w.fileno()]
        env = os.environ | {"PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests/procs/exchange_worker.py"), name,
             *map(str, fds), str(PAGE), str(KV), "g"], pass_fds=fds, env=env)
        for c in (pages_w, control_w):
            c.sock.close()

    def ask(self, *msg: object) -> tuple:
        self.control.send(msg)
        return recv(self.control)


def recv(ch: Channel, timeout: float = 60.0) -> tuple:
    ready, _, _ = select.select([ch.fileno()], [], [], timeout)
    assert ready, f"no reply in {timeout} s"
    msg, _ = ch.recv()
    assert isinstance(msg, tuple)
    return msg


def test_across_processes_and_a_kill_9_with_an_open_offer(broker: PageBroker) -> None:
    p = ChildMember(broker, "P")
    try:
        assert p.ask("grow", 4) == ("grown", 4)
        d = Member(broker, "D")
        d.grow(2)
        d.vt.tensor[:2].fill_(0xDD)
        crcs = [p.ask("fill", i, 10 + i)[1] for i in range(4)]
        assert blocks(broker) == 6 * PAGE
        assert p.ask("offer", "h1", [3, 1]) == ("offered",)
        assert p.ask("offer", "h2", [2]) == ("offered",)
        d.client.take("P", "h1", [1, 0])
        assert [d.crc(1), d.crc(0)] == [crcs[3], crcs[1]]
        d.vt.tensor[1, :64].fill_(7)  # P's process sees the write: one physical page
        assert p.ask("crc", 3)[1] == d.crc(1) != crcs[3]
        assert d.vmas_exact()
        broker.check_integrity()
        p.proc.kill()  # SIGKILL with h1 taken but not withdrawn and h2 open
        p.proc.wait(10)
        wait_dead(broker, "P")
        broker.check_integrity()
        assert blocks(broker) == 2 * PAGE  # P's pages punched; the two D took live on
        assert d.crc(0) == crcs[1] and int(d.vt.tensor[1, :64].eq(7).sum()) == 64
        with pytest.raises(PageBrokerError, match="not a live member"):
            d.client.take("P", "h2", [0])  # Take from a dead P
        fd = os.dup(broker.groups["g"].fd)
        d.close()
        wait_dead(broker, "D")
        assert "g" not in broker.groups and os.fstat(fd).st_blocks == 0  # the last member
        os.close(fd)
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
        p.proc.wait(10)
        p.control.close()
        p.reclaim.close()
