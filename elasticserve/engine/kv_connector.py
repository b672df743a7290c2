"""How a sequence's KV blocks travel from a prefill worker to a decode worker.

`KVConnector` is the seam (send blocks / receive blocks / done), small enough that a
cross-machine transport (NIXL, LMCache) could stand behind it. Two connectors here:

* `CopyConnector`: the sender reads the blocks' bytes into the payload, the receiver writes
  them into its own blocks. Works between any two engines (different devices, machines).
* `PageConnector`: on one host, under one page broker, a block that fills a page of its own
  and belongs to this sequence alone is *lent*: the receiver maps the physical page that
  holds it in place of its own block's page (the broker swaps the two pages' owners) and the
  sender gets the receiver's blank page back when the hand-off is done. Zero bytes copied.
  Blocks that share a page or another sequence's reference go by copy, in the same payload.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

Pairs = Sequence[tuple[int, int]]


class HandOffRefused(RuntimeError):
    """The lender refused a take (the offer is gone: withdrawn, or its worker died); nothing
    changed, so only that request fails."""


class PageOwnershipError(RuntimeError):
    """A take failed half-way (the broker swapped the pages, this process could not remap
    them): this process's mappings no longer match the broker's books, so it must not go on
    (its worker exits and the broker takes every page back)."""


@dataclass(frozen=True, slots=True)
class KVPayload:
    """The KV of one hand-off: lent page indices and copied block bytes, by sender block."""

    handoff_id: str
    source: str  # the sending worker (whose broker offer a receiver takes)
    pages: tuple[tuple[int, int], ...] = ()  # (sender block, sender page index) lent
    data: tuple[tuple[int, bytes], ...] = ()  # (sender block, its bytes) copied

    @property
    def bytes_copied(self) -> int:
        return sum(len(b) for _, b in self.data)


@dataclass(frozen=True, slots=True)
class Received:
    """What a receive moved: pages that changed owner, bytes written."""

    pages: int
    bytes_copied: int


class KVConnector(Protocol):
    """Moves blocks between two engines' KV caches."""

    def send_blocks(self, handoff_id: str, blocks: Sequence[int],
                    lendable: Collection[int]) -> KVPayload:
        """Sender: describe `blocks` (distinct ids); those in `lendable` (no other sequence
        references them) may be lent instead of copied. They must stay put until `done`."""
        ...

    def receive_blocks(self, payload: KVPayload, pairs: Pairs) -> Received:
        """Receiver: fill its blocks from the payload, `pairs` = (sender block, own block)."""
        ...

    def done(self, handoff_id: str) -> bool:
        """Sender: the hand-off ended (received, or abandoned); its blocks may be reused
        after this. True if lent pages changed owner (their old contents are gone here)."""
        ...


class PageLender(Protocol):
    """Moves page ownership between processes (procs/page_client.py's RemotePageBroker)."""

    def offer(self, handoff_id: str, indices: Sequence[int]) -> None: ...
    def take(self, peer: str, handoff_id: str, mine: Sequence[int]) -> None:
        """Map `peer`'s offered pages at my pages `mine`; HandOffRefused if it is gone."""
        ...

    def withdraw(self, handoff_id: str) -> int: ...


class CopyConnector:
    """Block bytes in the payload: one copy out on the sender, one copy in on the receiver."""

    def __init__(self, kv: torch.Tensor, worker: str = "") -> None:
        self.kv = kv  # [rows, *block_shape]
        self.worker = worker

    def send_blocks(self, handoff_id: str, blocks: Sequence[int],
                    lendable: Collection[int]) -> KVPayload:
        return KVPayload(handoff_id, self.worker, data=self.read(blocks))

    def read(self, blocks: Sequence[int]) -> tuple[tuple[int, bytes], ...]:
        rows = self.kv[list(blocks)].contiguous().cpu().view(torch.uint8)
        return tuple((b, rows[i].numpy().tobytes()) for i, b in enumerate(blocks))

    def receive_blocks(self, payload: KVPayload, pairs: Pairs) -> Received:
        if payload.pages:
            raise ValueError(f"hand-off {payload.handoff_id!r} lends pages; a CopyConnector "
                             "cannot take them")
        return Received(0, self.write(payload, pairs))

    def write(self, payload: KVPayload, pairs: Pairs) -> int:
        data = dict(payload.data)
        copied = 0
        rows = self.kv.view(self.kv.shape[0], -1).view(torch.uint8)
        for src, dst in pairs:
            if src not in data:
                continue
            raw = torch.frombuffer(bytearray(data[src]), dtype=torch.uint8)
            rows[dst].copy_(raw.to(rows.device))
            copied += len(data[src])
        return copied

    def done(self, handoff_id: str) -> bool:
        return False


class PageConnector(CopyConnector):
    """Lends whole pages through the page broker; copies what cannot be lent."""

    def __init__(self, kv: torch.Tensor, worker: str, lender: PageLender, page_size: int,
                 block_bytes: int) -> None:
        super().__init__(kv, worker)
        self.lender = lender
        # block b is page b exactly when a block is one page; otherwise a page holds several
        # blocks (of several sequences) and nothing can be lent
        self.one_block_per_page = page_size == block_bytes
        self._offered: set[str] = set()

    def send_blocks(self, handoff_id: str, blocks: Sequence[int],
                    lendable: Collection[int]) -> KVPayload:
        lent = [b for b in blocks if b in lendable] if self.one_block_per_page else []
        if lent:
            self.lender.offer(handoff_id, lent)
            self._offered.add(handoff_id)
        lent_set = set(lent)
        copied = self.read([b for b in blocks if b not in lent_set])
        return KVPayload(handoff_id, self.worker, tuple((b, b) for b in lent), copied)

    def receive_blocks(self, payload: KVPayload, pairs: Pairs) -> Received:
        dst_of = dict(pairs)
        mine = [dst_of[src] for src, _ in payload.pages]
        if mine:
            if not self.one_block_per_page:
                raise ValueError("pages lent to an engine whose blocks are not one page each")
            try:
                self.lender.take(payload.source, payload.handoff_id, mine)
            except HandOffRefused:
                raise
            except Exception as exc:
                raise PageOwnershipError(f"hand-off {payload.handoff_id!r}: {exc}") from exc
        return Received(len(mine), self.write(payload, pairs))

    def done(self, handoff_id: str) -> bool:
        if handoff_id not in self._offered:
            return False
        self._offered.discard(handoff_id)
        return self.lender.withdraw(handoff_id) > 0
