"""The messages between a worker process and the front process (plain, picklable data).

They travel over a `procs.transport.Channel`, request/reply: the worker sends, the front
answers each with one message (and, where a reply says so, file descriptors riding along).
"""

from __future__ import annotations

from dataclasses import dataclass

from elasticserve.memory.shared_weights import WeightsManifest


@dataclass(frozen=True, slots=True)
class Ack:
    """The request was done (`ok`), or refused with `error` saying why."""

    ok: bool = True
    error: str = ""


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
