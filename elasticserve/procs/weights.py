"""One copy of a model's weights for all its worker processes: both sides of the exchange.

Front side, `WeightsRegistry`: per model key one memfd (the front owns it), its manifest, the
workers using it, and the election of a loader. The first worker asking gets an empty memfd and
loads the checkpoint into it; the others wait, then map it read-only. When the last worker of a
model detaches (sleep) or dies, the front closes the memfd: the weights leave memory only when
no worker of that model is awake. A loader that dies (its channel closes) or overruns the
deadline loses the duty, and the next asker loads into a fresh memfd.

Worker side, `SharedWeights`: the engine's `WeightsSource` that asks the front over a Channel.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from elasticserve.config import EngineConfig
from elasticserve.engine.weights import DiskWeights
from elasticserve.memory.shared_weights import (
    WeightsManifest,
    adopt_weights,
    map_weights,
    write_weights,
)
from elasticserve.models.llama import CausalLM
from elasticserve.procs.messages import (
    Ack,
    AttachWeights,
    DetachWeights,
    WeightsLoad,
    WeightsLoaded,
    WeightsReady,
    WeightsWait,
)
from elasticserve.procs.transport import Channel, ChannelClosed

logger = logging.getLogger(__name__)

Reply = Ack | WeightsLoad | WeightsWait | WeightsReady


@dataclass
class _Entry:
    """One model's weights: a memfd being loaded (`loader` set) or ready (`manifest` set)."""

    fd: int
    loader: str | None = None
    deadline: float = 0.0
    manifest: WeightsManifest | None = None
    workers: set[str] = field(default_factory=set)


class WeightsRegistry:
    """The front's book of shared weights. Thread-safe: one dispatcher thread per worker may
    call `handle` at once."""

    def __init__(self, load_timeout_s: float = 120.0) -> None:
        if load_timeout_s <= 0:
            raise ValueError(f"load_timeout_s must be positive, got {load_timeout_s}")
        self.load_timeout_s = load_timeout_s
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def handle(self, worker: str, msg: object) -> tuple[Reply, list[int]]:
        """The reply to `worker`'s message, and fds to send with it: duplicates the caller
        closes once sent (the registry may close its own at any time)."""
        with self._lock:
            if isinstance(msg, AttachWeights):
                return self._attach(worker, msg.key)
            if isinstance(msg, WeightsLoaded):
                return self._loaded(worker, msg), []
            if isinstance(msg, DetachWeights):
                self._detach(worker, msg.key)
                return Ack(), []
        return Ack(False, f"unexpected message {type(msg).__name__}"), []

    def _attach(self, worker: str, key: str) -> tuple[Reply, list[int]]:
        entry = self._entries.get(key)
        now = time.monotonic()
        if entry is not None and entry.loader is not None and now > entry.deadline:
            logger.warning("worker %s did not load %s within %.0f s; electing another loader",
                           entry.loader, key, self.load_timeout_s)
            self._abandon(key, entry)
            entry = None
        if entry is None:
            fd = os.memfd_create(f"weights:{os.path.basename(key.rstrip('/'))}", os.MFD_CLOEXEC)
            entry = self._entries[key] = _Entry(fd, loader=worker,
                                                deadline=now + self.load_timeout_s)
            entry.workers.add(worker)
            return WeightsLoad(), [os.dup(fd)]
        if entry.manifest is None:
            return WeightsWait(), []
        entry.workers.add(worker)
        return WeightsReady(entry.manifest), [os.dup(entry.fd)]

    def _loaded(self, worker: str, msg: WeightsLoaded) -> Ack:
        entry = self._entries.get(msg.key)
        if entry is None or entry.loader != worker:
            return Ack(False, f"{worker} is not loading {msg.key!r} (timed out or detached)")
        size = os.fstat(entry.fd).st_size
        if size < msg.manifest.nbytes:
            self._abandon(msg.key, entry)
            return Ack(False, f"manifest: nbytes={msg.manifest.nbytes} but the file holds {size}")
        entry.manifest, entry.loader = msg.manifest, None
        return Ack()

    def _detach(self, worker: str, key: str) -> None:
        entry = self._entries.get(key)
        if entry is None or worker not in entry.workers:
            return
        if entry.loader == worker:  # gave up loading: its memfd may be half written
            self._abandon(key, entry)
            return
        entry.workers.discard(worker)
        if not entry.workers:
            self._drop(key, entry)

    def _abandon(self, key: str, entry: _Entry) -> None:
        """The loader is gone: forget the half-written file (nobody else maps it yet)."""
        entry.workers.discard(entry.loader or "")
        assert not entry.workers, "workers attached to weights that never finished loading"
        self._drop(key, entry)

    def _drop(self, key: str, entry: _Entry) -> None:
        del self._entries[key]
        os.close(entry.fd)  # workers' mappings keep the pages until they unmap them

    def worker_gone(self, worker: str) -> None:
        """`worker` died or disconnected: detach it from every model."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if worker in e.workers]:
                self._detach(worker, key)

    def weights_bytes(self, key: str) -> int:
        """Bytes of model `key`'s shared weights (0 while not loaded): charged once."""
        with self._lock:
            entry = self._entries.get(key)
            return entry.manifest.nbytes if entry and entry.manifest else 0

    def check_integrity(self) -> None:
        """Raise AssertionError unless every entry is consistent with its memfd."""
        with self._lock:
            for key, e in self._entries.items():
                if not e.workers:
                    raise AssertionError(f"{key}: weights kept with no worker attached")
                if (e.loader is None) == (e.manifest is None):
                    raise AssertionError(f"{key}: must be either loading or loaded")
                if e.loader is not None and e.workers != {e.loader}:
                    raise AssertionError(f"{key}: workers {e.workers} attached mid-load")
                size = os.fstat(e.fd).st_size  # raises if the fd was closed under us
                if e.manifest is not None and size < e.manifest.nbytes:
                    raise AssertionError(f"{key}: file {size} bytes < manifest {e.manifest.nbytes}")

    def report(self) -> list[dict[str, object]]:
        """Per model: state, loader, attached workers, bytes (for /admin/workers)."""
        with self._lock:
            return [{"key": k, "state": "loading" if e.manifest is None else "ready",
                     "loader": e.loader, "workers": sorted(e.workers),
                     "bytes": e.manifest.nbytes if e.manifest else 0}
                    for k, e in sorted(self._entries.items())]


def serve_registry(channel: Channel, registry: WeightsRegistry, worker: str) -> threading.Thread:
    """A thread answering `worker`'s weights messages until its channel closes (then the
    worker is treated as gone). For tests; the page broker dispatches these in production."""

    def loop() -> None:
        try:
            while True:
                msg, fds = channel.recv()
                for fd in fds:
                    os.close(fd)
                reply, out = registry.handle(worker, msg)
                try:
                    channel.send(reply, out)
                finally:
                    for fd in out:
                        os.close(fd)
        except ChannelClosed:
            pass
        finally:
            registry.worker_gone(worker)

    thread = threading.Thread(target=loop, name=f"weights-{worker}", daemon=True)
    thread.start()
    return thread


class SharedWeights:
    """A `WeightsSource` whose weights live in a memfd the front owns, one copy per model.

    `load` asks the front; the elected loader reads the checkpoint, copies it into the memfd
    and keeps only the shared copy; the others map it and build the model around it without
    reading the checkpoint. `release` detaches (the copy goes when its last worker lets go)."""

    def __init__(self, channel: Channel, key: str | None = None, wait_s: float = 120.0,
                 retry_s: float = 0.05) -> None:
        """`key`: the model's name at the front (default: the model path)."""
        if wait_s <= 0 or retry_s <= 0:
            raise ValueError(f"wait_s and retry_s must be positive, got {wait_s}, {retry_s}")
        self.channel, self.key = channel, key
        self.wait_s, self.retry_s = wait_s, retry_s
        self.attached: str | None = None  # the key we hold, between load and release
        self.loaded_here = False  # whether this process was the loader (last load)

    def load(self, config: EngineConfig) -> CausalLM:
        """The model, its parameters viewing the shared read-only mapping."""
        key = self.key or config.model.path
        deadline = time.monotonic() + self.wait_s
        while True:
            reply, fds = self.channel.request(AttachWeights(key))
            if isinstance(reply, WeightsWait):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"weights of {key!r} not loaded by another worker "
                                       f"within {self.wait_s} s")
                time.sleep(self.retry_s)
                continue
            if not isinstance(reply, WeightsLoad | WeightsReady) or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise RuntimeError(f"weights of {key!r}: unexpected reply {reply!r}")
            self.attached = key
            try:
                return self._build(config, key, reply, fds[0])
            except BaseException:
                self.release()
                raise
            finally:
                os.close(fds[0])

    def _build(self, config: EngineConfig, key: str, reply: WeightsLoad | WeightsReady,
               fd: int) -> CausalLM:
        self.loaded_here = isinstance(reply, WeightsLoad)
        if isinstance(reply, WeightsReady):
            model = DiskWeights.skeleton(config)  # meta tensors: no memory, no checkpoint read
            manifest = reply.manifest
        else:
            model = DiskWeights().load(config)
            manifest = write_weights(fd, model.state_dict())
        adopt_weights(model, map_weights(fd, manifest))  # the loader's private copy goes here
        if isinstance(reply, WeightsLoad):
            ack, _ = self.channel.request(WeightsLoaded(key, manifest))
            if not isinstance(ack, Ack) or not ack.ok:
                raise RuntimeError(f"weights of {key!r} refused by the front: {ack!r}")
        return model

    def release(self) -> None:
        """Detach from the shared copy (idempotent); the engine has dropped the model."""
        key, self.attached = self.attached, None
        if key is None:
            return
        try:
            self.channel.request(DetachWeights(key))
        except ChannelClosed:
            pass  # the front is gone: it forgot us already
