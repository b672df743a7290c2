"""KV groups: workers whose KV pages are slots of ONE broker-owned memfd, so that a page can
change owner (a prefill worker hands a sequence's KV to a decode worker) with zero bytes copied.

A `KVGroup` is the page broker's record of one group file (procs/page_broker.py): the file
(sparse, grown with ftruncate as members join, closed with the last member), its free slots
(lowest first) and, per member, ``backing``: the slot behind each of its page indices
[0, held). A worker without a group is a group of one: its slots stay its page indices (a
prefix grows and shrinks at its end, lowest free slot first), its pages one kernel mapping.

A hand-off is a swap of slots between two members, so no page count or budget booking
changes: the offerer P lends page indices (`offer`), the taker D names as many of its own
pages (`take`) and each gets the other's slot (D's old slot is punched: P gets a blank page).
P keeps mapping the lent slot until it withdraws the offer (`withdraw`), which tells it which
of its indices now have another slot; it must remap them before it reuses those pages.
Every method is called under the broker's arbiter lock.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass, field

from elasticserve.memory.linux import punch_hole


@dataclass(slots=True)
class HandOff:
    """One open offer of a member: its indices; ``pending``: those taken and not yet reported
    (a withdraw reports them); ``released``: the offerer gave up one of the pages (its page
    count fell below an index) before anyone took them, so no one may."""

    indices: tuple[int, ...]
    taken: bool = False
    released: bool = False
    pending: list[int] = field(default_factory=list)


class KVGroup:
    """One group file: its free slots, each member's backing slots and open offers."""

    def __init__(self, name: str | None, page_size: int) -> None:
        self.name = name
        self.page_size = page_size
        self.fd = os.memfd_create(f"elasticserve-kv-{name or 'solo'}", os.MFD_CLOEXEC)
        self.capacity = 0  # slots the file's size covers
        self.free: list[int] = []  # heap of free slots below next_slot
        self.next_slot = 0
        self.reserved: dict[str, int] = {}  # member -> its KV reservation (pages)
        self.backing: dict[str, list[int]] = {}  # member -> slot behind each page index
        self.offers: dict[str, dict[str, HandOff]] = {}  # member -> handoff id -> offer

    # ---- members -------------------------------------------------------------------------------
    def join(self, worker: str, pages: int) -> None:
        """Add a member with a reservation of ``pages``; the file (sparse: nothing allocated)
        grows to the members' reservations together, so every grant fits in it."""
        if worker in self.backing:
            raise ValueError(f"worker {worker!r} is in KV group {self.name!r} already")
        self.reserved[worker] = pages
        self.backing[worker] = []
        self.offers[worker] = {}
        need = sum(self.reserved.values())
        if need > self.capacity:
            os.ftruncate(self.fd, need * self.page_size)
            self.capacity = need

    def leave(self, worker: str) -> bool:
        """Punch the member's slots, drop its offers; True once the group is empty (its file
        is closed then)."""
        if worker in self.backing:
            self.shrink(worker, 0)
            del self.backing[worker], self.reserved[worker], self.offers[worker]
        if self.backing or self.fd < 0:
            return not self.backing
        os.close(self.fd)
        self.fd = -1
        return True

    def held(self, worker: str) -> int:
        return len(self.backing[worker])

    # ---- grants and releases -------------------------------------------------------------------
    def grant(self, worker: str, pages: int) -> tuple[int, ...]:
        """Back ``pages`` more page indices of the member with free slots, lowest first."""
        slots = []
        for _ in range(pages):
            slot = heapq.heappop(self.free) if self.free else self.next_slot
            if slot >= self.capacity:  # the file covers every member's reservation: a bug
                raise ValueError(f"KV group {self.name!r} has no free slot below {slot}")
            self.next_slot = max(self.next_slot, slot + 1)
            slots.append(slot)
        self.backing[worker].extend(slots)
        return tuple(slots)

    def shrink(self, worker: str, keep: int) -> int:
        """Punch the slots behind the member's indices [keep, held) and free them; returns how
        many (the caller books them). Offers of those indices die (or stop reporting them)."""
        backing = self.backing[worker]
        gone = backing[keep:]
        del backing[keep:]
        for slot in gone:
            punch_hole(self.fd, slot * self.page_size, self.page_size)
            heapq.heappush(self.free, slot)
        for offer in self.offers[worker].values():
            if any(i >= keep for i in offer.indices):
                offer.released = offer.released or not offer.taken
                offer.pending = [i for i in offer.pending if i < keep]
        return len(gone)

    # ---- hand-offs -----------------------------------------------------------------------------
    def offer(self, worker: str, handoff_id: str, indices: tuple[int, ...]) -> None:
        """Lend the member's pages ``indices`` under ``handoff_id``."""
        offers = self.offers[worker]
        if handoff_id in offers:
            raise ValueError(f"handoff_id {handoff_id!r} is already offered by {worker!r}")
        self._check_indices(worker, indices, "indices")
        offers[handoff_id] = HandOff(tuple(indices))

    def take(self, worker: str, peer: str, handoff_id: str,
             mine: tuple[int, ...]) -> tuple[int, ...]:
        """Swap the slots behind ``peer``'s offered pages and ``worker``'s pages ``mine``;
        returns the new slots behind ``mine``. The slots ``worker`` gives up are punched."""
        if peer not in self.backing:
            raise ValueError(f"peer: {peer!r} is not a live member of KV group {self.name!r}")
        offer = self.offers[peer].get(handoff_id)
        if peer == worker or offer is None or offer.taken or offer.released:
            why = ("is the taker" if peer == worker else "is gone (withdrawn, or its worker "
                   "died)" if offer is None else "was taken already" if offer.taken else
                   "lost a page (its worker released it)")
            raise ValueError(f"peer: offer {handoff_id!r} of {peer!r} {why}")
        if len(mine) != len(offer.indices):
            raise ValueError(f"mine: {len(mine)} pages for an offer of {len(offer.indices)}")
        self._check_indices(worker, mine, "mine")
        theirs, ours = self.backing[peer], self.backing[worker]
        got = []
        for i, j in zip(offer.indices, mine, strict=True):
            theirs[i], ours[j] = ours[j], theirs[i]
            punch_hole(self.fd, theirs[i] * self.page_size, self.page_size)
            got.append(ours[j])
        offer.taken, offer.pending = True, list(offer.indices)
        return tuple(got)

    def withdraw(self, worker: str, handoff_id: str) -> tuple[tuple[int, int], ...]:
        """Close the member's offer; (index, slot) for each of its pages whose slot changed."""
        offer = self.offers[worker].pop(handoff_id, None)
        if offer is None:
            raise ValueError(f"handoff_id {handoff_id!r} is not an open offer of {worker!r}")
        backing = self.backing[worker]
        return tuple((i, backing[i]) for i in offer.pending)

    def _check_indices(self, worker: str, indices: tuple[int, ...], name: str) -> None:
        held = len(self.backing[worker])
        lent = {i for o in self.offers[worker].values() for i in o.indices}
        bad = [i for i in indices if not 0 <= i < held or i in lent]
        if not indices or bad or len(set(indices)) != len(indices):
            raise ValueError(f"{name}: {tuple(indices)} must be distinct pages of {worker!r} "
                             f"(< {held} held) not in an open offer; bad: {bad}")

    # ---- integrity -----------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """What breaks the group's invariants (empty when they hold): no slot behind two
        pages, free slots disjoint from backing ones, the file's allocated bytes <= the pages
        its members hold."""
        out = []
        used = [s for b in self.backing.values() for s in b]
        if len(set(used)) != len(used):
            out.append(f"a slot backs two pages: {sorted(used)}")
        if set(used) & set(self.free) or len(set(self.free)) != len(self.free):
            out.append(f"free slots {sorted(self.free)} overlap {sorted(used)}")
        if any(not 0 <= s < min(self.next_slot, self.capacity) for s in used + self.free):
            out.append(f"a slot lies outside [0, {self.next_slot}) or the file")
        allocated = os.fstat(self.fd).st_blocks * 512 if self.fd >= 0 else 0
        if allocated > len(used) * self.page_size:
            out.append(f"the file has {allocated} bytes allocated for {len(used)} pages")
        return out
