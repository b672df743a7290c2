"""Starts worker processes, sees them die, and starts them again with backoff.

A worker's death is seen at once: its data channel closes when the process ends, however it
ends (exception, `kill -9`, OOM killer), and the reader thread of its `WorkerClient` calls
`on_death`. The supervisor then reaps the process, tells the page broker (which takes back
every page the worker held), and schedules a restart: 0.5 s, doubling per consecutive failure
up to 10 s; a worker that ran for 30 s resets the count.

A worker that is alive but silent (stopped, deadlocked, a step that never ends) is killed by the
watchdog after `stuck_after_s` without a message: a working worker sends one per step, and one
every 0.5 s when idle. Its death then takes the path above, so no request waits on it forever.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from elasticserve.procs.transport import Channel, ChannelClosed, channel_pair
from elasticserve.procs.worker_client import WorkerClient
from elasticserve.procs.worker_messages import Ready, WorkerSpec

logger = logging.getLogger(__name__)


class WorkerStartError(RuntimeError):
    """A worker process exited or did not answer Ready before its start deadline."""


@dataclass
class _Slot:
    spec: WorkerSpec
    client: WorkerClient
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0  # consecutive short-lived incarnations


# extra channels a worker gets besides its data channel (the page broker's), and what to do
# when it dies: (spawn hook -> (fds to pass, argv additions), death hook)
SpawnHook = Callable[[WorkerSpec], tuple[list[int], list[str]]]
DeathHook = Callable[[WorkerSpec], None]


class Supervisor:
    """Owns the worker processes of every replica slot."""

    def __init__(self, start_timeout_s: float = 300.0, backoff_s: float = 0.5,
                 max_backoff_s: float = 10.0, stable_s: float = 30.0,
                 on_spawn: SpawnHook | None = None, on_exit: DeathHook | None = None,
                 stuck_after_s: float = 60.0) -> None:
        self.start_timeout_s = start_timeout_s
        self.backoff_s, self.max_backoff_s, self.stable_s = backoff_s, max_backoff_s, stable_s
        self.on_spawn = on_spawn
        self.on_exit = on_exit
        self.stuck_after_s = stuck_after_s
        self.killed_stuck = 0
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()
        self.closing = False
        threading.Thread(target=self._watch, name="worker-watchdog", daemon=True).start()

    def _watch(self) -> None:
        interval = min(1.0, self.stuck_after_s / 4)
        while not self.closing:
            time.sleep(interval)
            now = time.monotonic()
            with self._lock:
                slots = list(self._slots.values())
            for slot in slots:
                client, proc = slot.client, slot.proc
                if client.state != "ready" or proc is None or proc.poll() is not None:
                    continue
                if now - client.last_heard > self.stuck_after_s:
                    logger.error("worker %s (pid %d) silent for %.0f s: killing it",
                                 client.worker, proc.pid, now - client.last_heard)
                    self.killed_stuck += 1
                    proc.kill()  # its channel closes: the usual death path follows

    def start(self, spec: WorkerSpec, client: WorkerClient) -> None:
        """Start the first worker of a slot and wait for it (raises WorkerStartError)."""
        slot = _Slot(spec, client)
        client.on_death = self._died
        with self._lock:
            self._slots[spec.worker] = slot
        self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        front, child = channel_pair()
        fds, argv = self.on_spawn(slot.spec) if self.on_spawn is not None else ([], [])
        cmd = [sys.executable, "-m", "elasticserve.procs.worker_main",
               "--data-fd", str(child.fileno()), *argv]
        # idle OpenMP threads sleep instead of spinning: a spinning worker starves the front
        # process (HTTP, streams) and its sibling workers of the machine's few cores
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
        try:
            proc = subprocess.Popen(cmd, pass_fds=(child.fileno(), *fds), env=env)
        except BaseException:
            front.close()
            self._exited(slot)  # the broker may already serve its channels
            raise
        finally:
            child.sock.close()  # the child's copy is the one that matters (no shutdown)
            for fd in fds:
                os.close(fd)
        slot.proc, slot.started_at = proc, time.monotonic()
        try:
            ready = self._handshake(front, slot.spec)
        except BaseException:
            front.close()
            _reap(proc, 5.0)
            self._exited(slot)
            raise
        with self._lock:  # shutdown sets `closing` under this lock: attach or refuse, not both
            closing = self.closing
            if not closing:
                slot.client.attach(front, ready)
        if closing:  # shut down while it started (a restart): it must not serve
            front.close()  # its reader sees EOF and exits at once
            _reap(proc, 5.0)
            self._exited(slot)
            return
        logger.info("worker %s started (pid %d)", slot.spec.worker, ready.pid)

    def _handshake(self, front: Channel, spec: WorkerSpec) -> Ready:
        front.send(spec)
        front.sock.settimeout(self.start_timeout_s)
        try:
            msg, _ = front.recv()
        except (ChannelClosed, TimeoutError) as exc:
            raise WorkerStartError(f"worker {spec.worker} did not start: {exc}") from exc
        finally:
            front.sock.settimeout(None)
        if not isinstance(msg, Ready):
            raise WorkerStartError(f"worker {spec.worker} answered {type(msg).__name__}")
        return msg

    def _exited(self, slot: _Slot) -> None:
        if self.on_exit is not None:
            try:
                self.on_exit(slot.spec)
            except Exception:  # noqa: BLE001 - cleanup of one worker must not stop the rest
                logger.exception("cleaning up after worker %s failed", slot.spec.worker)

    def _died(self, client: WorkerClient) -> None:
        with self._lock:
            slot = self._slots.get(client.worker)
        if slot is None:
            return
        code = _reap(slot.proc, 5.0) if slot.proc is not None else None
        logger.error("worker %s (pid %s) died with exit code %s", client.worker, client.pid,
                     code)
        self._exited(slot)
        lived = time.monotonic() - slot.started_at
        slot.failures = 0 if lived >= self.stable_s else slot.failures + 1
        if not self.closing:
            threading.Thread(target=self._restart, args=(slot,), daemon=True,
                             name=f"restart-{client.worker}").start()

    def _restart(self, slot: _Slot) -> None:
        while not self.closing:
            time.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** max(0, slot.failures - 1)))
            if self.closing:
                return
            slot.client.restarts += 1
            try:
                self._spawn(slot)
                return
            except Exception:  # noqa: BLE001 - try again later, with more backoff
                logger.exception("restarting worker %s failed", slot.spec.worker)
                slot.failures += 1

    def pids(self) -> dict[str, int | None]:
        with self._lock:
            return {name: s.proc.pid if s.proc is not None else None
                    for name, s in self._slots.items()}

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every worker: ask, wait up to `timeout`, then kill."""
        with self._lock:
            self.closing = True
            slots = list(self._slots.values())
        for slot in slots:
            slot.client.shutdown(timeout)
        deadline = time.monotonic() + timeout
        for slot in slots:
            if slot.proc is not None:
                _reap(slot.proc, max(0.1, deadline - time.monotonic()))
                self._exited(slot)


def _reap(proc: subprocess.Popen[bytes] | None, timeout: float) -> int | None:
    if proc is None:
        return None
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
