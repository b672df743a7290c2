"""Layer-wise onload (LayerKV): a step's swap-in copies run layer by layer on a helper thread,
and the forward pass of layer i waits only for layer i's copies.

The KV cache is block-major (`[block][layer][K/V][slot][head][dim]`), so one layer of a run of
blocks is a strided slice. Layers are claimed in order, each by whoever gets to it first: the
helper thread copies layer 0, sets its event, claims layer 1, ... while the step's thread
computes; when the forward pass reaches a layer nobody has claimed yet (a helper that has not
woken up, or that the OS starves on a busy machine) the step's thread copies it itself rather
than wait (`steal`), so a step is never slower than the blocking copy by more than the
handshakes. Each layer of a block lives in its own bytes, so the step's thread writing and
reading layer i never touches what the helper is writing (layers > i): results are
bit-identical to copying everything first.

Failure is never a hang: a copier exception is re-raised in the step (by the next `wait`), and
a helper that makes no progress on a layer it claimed fails the step after `deadline_s`. The
step always ends with `finish`, which cancels the layers not claimed yet and waits for a copy
the helper is in to end, because the host tier may unmap the source rows after the step; a
helper stuck past that is abandoned (`LayerwiseCopier.abandon`) and the next step gets a fresh
thread.

CPU only: on a GPU the copies would go on a side stream with a CUDA event per layer; not done
(the engine refuses `layerwise_onload` with `device="cuda"`).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from elasticserve.kernels.block_copy import runs

__all__ = ["LayerOnload", "LayerwiseCopier", "OnloadError", "copy_layer"]

# (dst, src, (src, dst, length) runs, layer): copies that layer of every run
CopyLayer = Callable[[torch.Tensor, torch.Tensor, Sequence[tuple[int, int, int]], int], None]


class OnloadError(RuntimeError):
    """The layer-wise onload of a step failed or missed its deadline: the step fails."""


def copy_layer(dst: torch.Tensor, src: torch.Tensor, spans: Sequence[tuple[int, int, int]],
               layer: int) -> None:
    """dst[d:d+n, layer] = src[s:s+n, layer] for every run: strided slices of a block-major
    cache, one copy per run and layer."""
    for s, d, n in spans:
        dst[d:d + n, layer].copy_(src[s:s + n, layer])


class LayerOnload:
    """One step's swap-in in flight: an event per layer, set once that layer's copies landed
    (or once a copy failed, with `error` set first)."""

    def __init__(self, copy: Callable[[int], None], num_layers: int, deadline_s: float,
                 steal: bool = True) -> None:
        self._copy = copy
        self.done = [threading.Event() for _ in range(num_layers)]
        self.helper_free = threading.Event()  # the helper is not copying (cleared per claim)
        self.helper_free.set()
        self.error: BaseException | None = None
        self.cancelled = False
        self.steal = steal
        self.deadline_s = deadline_s
        self._deadline = time.monotonic() + deadline_s
        self._lock = threading.Lock()
        self._next = 0  # the lowest layer nobody has claimed
        self.stolen = 0  # layers the step's thread copied itself
        self.stall_s = 0.0  # seconds the step's thread spent in `wait` (copying or blocked)
        self.waited: list[int] = []  # layers the forward pass waited for, in order (tests)

    def run_helper(self) -> None:
        """The helper thread's part: every layer it can claim, in order."""
        self._copy_claimed(len(self.done) - 1, helper=True)

    def wait(self, layer: int) -> None:
        """Return once `layer`'s copies landed: copy the unclaimed layers up to it here
        (`steal`), then wait for it; raises OnloadError on a copy error or when the step's
        deadline passes."""
        t0 = time.perf_counter()
        if self.steal:
            self.stolen += self._copy_claimed(layer)
        self._wait_event(self.done[layer], f"layer {layer}")
        self.stall_s += time.perf_counter() - t0
        self.waited.append(layer)

    def wait_all(self) -> None:
        """Every layer landed (layers are claimed in order, so the last one says it)."""
        self.wait(len(self.done) - 1)

    def finish(self) -> bool:
        """End of the step, whatever happened: cancel the layers nobody claimed and wait (at
        least a grace second) for a copy the helper is in to end; a helper that has not woken
        up yet will claim nothing, so it is not waited for. False: the helper is stuck in a
        copy. Errors are raised by `wait`, not here, so that an exception already leaving the
        step is not replaced."""
        with self._lock:
            self.cancelled = True
        return self.helper_free.wait(max(1.0, self._deadline - time.monotonic()))

    def _claim(self, upto: int, helper: bool) -> int | None:
        with self._lock:
            if self.cancelled or self.error is not None or self._next > upto:
                return None
            if helper:
                self.helper_free.clear()
            self._next += 1
            return self._next - 1

    def _copy_claimed(self, upto: int, helper: bool = False) -> int:
        """Claim and copy layers in order up to `upto`; how many this thread copied. An error
        is recorded and releases every waiter."""
        copied = 0
        while (layer := self._claim(upto, helper)) is not None:
            try:
                with torch.inference_mode():  # as the forward pass: no version-counter traffic
                    self._copy(layer)
            except BaseException as exc:  # noqa: BLE001 - handed to the step, which raises it
                self.error = exc
                for event in self.done:
                    event.set()
                break
            finally:
                if helper:
                    self.helper_free.set()
            self.done[layer].set()
            copied += 1
        return copied

    def _wait_event(self, event: threading.Event, what: str) -> None:
        if not event.wait(max(0.0, self._deadline - time.monotonic())):
            raise OnloadError(f"layer-wise onload: waited {self.deadline_s:g}s for {what}")
        if self.error is not None:
            raise OnloadError(f"layer-wise onload failed: {type(self.error).__name__}: "
                              f"{self.error}") from self.error


class LayerwiseCopier:
    """The runner's helper thread. `start` hands it a step's swap-in and returns at once.

    `copy_layer` is the per-layer copy (replaceable: tests slow one layer down to show the
    overlap). `deadline_s` bounds one step's wait for its copies. `steal`: the step's thread
    copies a layer the helper has not claimed instead of waiting (tests turn it off to pin
    every copy on the helper)."""

    def __init__(self, deadline_s: float = 30.0, copy: CopyLayer = copy_layer) -> None:
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s!r}")
        self.deadline_s = deadline_s
        self.copy_layer = copy
        self.steal = True
        self._pool: ThreadPoolExecutor | None = None
        self.jobs = 0  # swap-ins started layer-wise (how a test knows this path ran)
        self.stolen_layers = 0  # layers the step's thread copied itself (the runner adds up)

    def start(self, dst: torch.Tensor, src: torch.Tensor, pairs: Sequence[tuple[int, int]]
              ) -> LayerOnload:
        """Copy `src[s] -> dst[d]` for every (s, d) of `pairs`, layer (dim 1) by layer."""
        copy = functools.partial(self.copy_layer, dst, src, runs(pairs))
        job = LayerOnload(copy, dst.shape[1], self.deadline_s, self.steal)
        self.jobs += 1
        if self._pool is None:  # lazily: an engine that never swaps in holds no thread
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kv-onload")
        self._pool.submit(job.run_helper)
        return job

    def abandon(self) -> None:
        """After a missed deadline: a stuck helper is left behind (it claims nothing more, as
        the job is cancelled) and the next step gets a fresh thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
