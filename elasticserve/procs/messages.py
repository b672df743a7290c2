"""The messages between a worker process and the front process (plain, picklable data).

They travel over `procs.transport.Channel`s, request/reply: the asker sends, the other end
answers each with one message (and, where a reply says so, file descriptors riding along).

Besides its step channel, each worker has two channels to the front's page broker
(procs/page_broker.py):

* ``pages`` (worker -> broker): register, grants, releases, wake-ups, hand-offs of pages
  between workers of one KV group (Offer/Take/Withdraw), a step's workspace pages
  (GrantSpare/ReleaseSpare: booked, not slots of the KV file) (and the weights
  messages below, served by the same per-worker thread). Every message that changes what the
  worker maps carries ``mapped`` / ``mapped_after``, the pages the worker maps, so the
  broker's books follow the worker even after a reclaim reply came too late.
* ``reclaim`` (broker -> worker): the arbiter's reclaim calls on this worker as a victim, each
  with a request id and a deadline; replies to a request the broker gave up on are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from elasticserve.memory.shared_weights import WeightsManifest


@dataclass(frozen=True, slots=True)
class Ack:
    """The request was done (`ok`), or refused with `error` saying why."""

    ok: bool = True
    error: str = ""


# ---- pages channel (worker -> broker) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegisterWorker:
    """A worker's model joins the budget. Reply: `Registered`, with the KV memfd as the fd."""

    worker: str
    weights_key: str | None  # replicas of one model share one copy of the weights
    weights_bytes: int
    kv_max_bytes: int  # the worker's KV reservation: the memfd's (sparse) size
    min_bytes: int = 0
    max_bytes: int | None = None
    priority: int = 0
    # workers of one group share one KV file and may hand pages to each other (Offer/Take);
    # None: a group of its own
    kv_group: str | None = None


@dataclass(frozen=True, slots=True)
class Registered:
    page_size: int
    kv_pages: int  # the worker's KV reservation in pages (the fd: its group's file)


@dataclass(frozen=True, slots=True)
class Grant:
    """Up to `pages` more pages, at least `at_least`, for a worker that maps `mapped` now.
    Reply: `Granted`."""

    pages: int
    at_least: int
    mapped: int


@dataclass(frozen=True, slots=True)
class Granted:
    """`pages` granted (0 or in [at_least, pages]); `slots`: the group file's slot behind
    each new page, in page order (page `mapped + k` is backed by `slots[k]`)."""

    pages: int
    slots: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Release:
    """The worker unmapped `pages` on its own and maps `mapped_after` now. Reply: None."""

    pages: int
    mapped_after: int


@dataclass(frozen=True, slots=True)
class GrantSpare:
    """`pages` more workspace pages (engine/workspace.py), all or none, for a worker whose
    arena maps `mapped` now: booked under the worker like its KV pages, taken only from free
    pages and other workers' free or cached KV (never a preemption or a sleep). No slot: the
    worker maps them from memory of its own; the budget is what is shared. Reply: int (the
    pages granted: `pages` or 0)."""

    pages: int
    mapped: int


@dataclass(frozen=True, slots=True)
class ReleaseSpare:
    """The worker's arena unmapped `pages` workspace pages and maps `mapped_after` now.
    Reply: None."""

    pages: int
    mapped_after: int


@dataclass(frozen=True, slots=True)
class Wake:
    """Charge the sleeping worker's weights again. Reply: bool (False: no room yet)."""


@dataclass(frozen=True, slots=True)
class CancelWake:
    """Undo a Wake whose weights failed to load (its pages were released). Reply: None."""


# hand-offs (procs/kv_groups.py): pages change owner within a KV group, zero bytes copied


@dataclass(frozen=True, slots=True)
class Offer:
    """Lend my pages `indices` (each < the pages I hold) under `handoff_id`. Reply: Ack. I do
    not write them until I withdraw the offer."""

    handoff_id: str
    indices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Take:
    """Take `peer`'s offer: my page `mine[k]` gets the slot behind the offer's k-th page, the
    offerer's page gets the slot behind `mine[k]` (punched: blank). Reply: `Taken`."""

    peer: str
    handoff_id: str
    mine: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Taken:
    """The new slots behind the taker's `mine` pages, in order: remap them."""

    slots: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Withdraw:
    """Close my offer `handoff_id` (taken or not). Reply: `Withdrawn`."""

    handoff_id: str


@dataclass(frozen=True, slots=True)
class Withdrawn:
    """(index, slot) for each offered page whose slot changed (it was taken): the offerer
    remaps them before it reuses those pages."""

    changed: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class BrokerError:
    """The reply when the broker refused a message: the client raises with this text."""

    message: str


# ---- reclaim channel (broker -> worker) -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reclaim:
    """One `Reclaimer` call on the worker: `op` is "free_pages", "drop_cached", "preempt",
    "sleep" or "probe". A worker past `deadline` (time.monotonic, one clock per machine) does
    nothing and says so: the broker counted it as 0 pages already."""

    request_id: int
    op: str
    n: int
    deadline: float


@dataclass(frozen=True, slots=True)
class Reclaimed:
    """`pages` unmapped (None: sleep refused mid-step) and `mapped_after` (None: the worker
    could not take its lock and owes the pages), or, for "probe", the worker's `state`:
    (free pages, cached pages, idle, starved). `spare_after`: the workspace pages its arena
    maps after the call (None: no arena, or no lock); a sleep unmaps them with the KV."""

    request_id: int
    pages: int | None
    mapped_after: int | None
    state: tuple[int, int, bool, bool] | None = None
    spare_after: int | None = None


# weights -------------------------------------------------------------------------------------
# A worker asks for the weights of model `key` (AttachWeights). The first asker gets an empty
# memfd and the duty to load it (WeightsLoad); while it loads, others are told to retry
# (WeightsWait); once the loader reports WeightsLoaded, askers get WeightsReady with the fd.


@dataclass(frozen=True, slots=True)
class AttachWeights:
    """Worker -> front: I want the weights of model `key` (its path)."""

    key: str


@dataclass(frozen=True, slots=True)
class WeightsLoad:
    """Front -> worker, with one fd (an empty memfd): load the checkpoint into it, then send
    WeightsLoaded. Until then, others asking for this model wait."""


@dataclass(frozen=True, slots=True)
class WeightsWait:
    """Front -> worker: another worker is loading this model; ask again shortly."""


@dataclass(frozen=True, slots=True)
class WeightsReady:
    """Front -> worker, with one fd (the weights' memfd): map it read-only by `manifest`."""

    manifest: WeightsManifest


@dataclass(frozen=True, slots=True)
class WeightsLoaded:
    """Loader -> front: the memfd it was given holds model `key`'s weights, laid out so."""

    key: str
    manifest: WeightsManifest


@dataclass(frozen=True, slots=True)
class DetachWeights:
    """Worker -> front: I no longer use model `key`'s weights (sleep, shutdown, failed load)."""

    key: str
