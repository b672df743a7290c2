"""Layer-wise onload (LayerKV): a step's swap-in copies run layer by layer on a helper thread,
and the forward pass of layer i waits only for layer i's copies.

The KV cache is block-major (`[block][layer][K/V][slot][head][dim]`), so one layer of a run of
blocks is a strided slice. Layer 0 of every swapped-in block is copied at once by the step's
own thread (it is needed first); the helper thread then copies layer 1, signals its event,
layer 2, ... while the step's thread already computes layer 0. Each layer of a block
lives in its own bytes, so the main thread writing and reading layer i never touches what the
copier is writing (layers > i): results are bit-identical to copying everything first.

Failure is never a hang: a copier exception is re-raised in the step (by the next `wait` or by
`finish`), and a copier that makes no progress fails the step after `deadline_s`. The step
always ends with `finish`, which cancels what was not copied yet and waits for the thread to
let go of the source rows, because the host tier may unmap them after the step; a thread stuck
past that is abandoned (`LayerwiseCopier.abandon`) and the next step gets a fresh one.

CPU only: on a GPU the copies would go on a side stream with a CUDA event per layer; not done
(the engine refuses `layerwise_onload` with `device="cuda"`).
"""

from __future__ import annotations

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
    (or once the copier failed, with `error` set first)."""

    def __init__(self, num_layers: int, deadline_s: float) -> None:
        self.done = [threading.Event() for _ in range(num_layers)]
        self.stopped = threading.Event()  # the copier thread let go of src and dst
        self.error: BaseException | None = None
        self.cancelled = False
        self.deadline_s = deadline_s
        self._deadline = time.monotonic() + deadline_s
        self.waited: list[int] = []  # layers the forward pass waited for, in order (tests)
        self.stall_s = 0.0  # seconds the step's thread spent blocked in `wait`

    def wait(self, layer: int) -> None:
        """Block until `layer`'s copies landed; raises OnloadError on a copier error or when
        the step's deadline passes."""
        t0 = time.perf_counter()
        self._wait_event(self.done[layer], f"layer {layer}")
        self.stall_s += time.perf_counter() - t0
        self.waited.append(layer)

    def wait_all(self) -> None:
        """Every layer landed (the copier runs layers in order, so the last one says it)."""
        self.wait(len(self.done) - 1)

    def finish(self) -> bool:
        """End of the step, whatever happened: cancel the layers nobody waited for and wait
        (at least a grace second) for the thread to let go of the rows. False: it did not
        (a stuck copier). Errors are raised by `wait`, not here, so that an exception already
        leaving the step is not replaced."""
        self.cancelled = True
        return self.stopped.wait(max(1.0, self._deadline - time.monotonic()))

    def _wait_event(self, event: threading.Event, what: str) -> None:
        if not event.wait(max(0.0, self._deadline - time.monotonic())):
            raise OnloadError(f"layer-wise onload: waited {self.deadline_s:g}s for {what}")
        if self.error is not None:
            raise OnloadError(f"layer-wise onload failed: {type(self.error).__name__}: "
                              f"{self.error}") from self.error


class LayerwiseCopier:
    """The runner's helper thread. `start` hands it a step's swap-in and returns at once.

    `copy_layer` is the per-layer copy (replaceable: tests slow one layer down to show the
    overlap). `deadline_s` bounds one step's wait for its copies."""

    def __init__(self, deadline_s: float = 30.0, copy: CopyLayer = copy_layer) -> None:
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s!r}")
        self.deadline_s = deadline_s
        self.copy_layer = copy
        self._pool: ThreadPoolExecutor | None = None
        self.jobs = 0  # swap-ins started layer-wise (how a test knows this path ran)

    def start(self, dst: torch.Tensor, src: torch.Tensor, pairs: Sequence[tuple[int, int]]
              ) -> LayerOnload:
        """Copy `src[s] -> dst[d]` for every (s, d) of `pairs`, layer (dim 1) by layer: layer 0
        here (the forward pass needs it first thing, so it never waits for the thread to
        wake up), the others on the helper thread."""
        job = LayerOnload(dst.shape[1], self.deadline_s)
        self.jobs += 1
        spans = runs(pairs)
        t0 = time.perf_counter()
        ok = self._copy_layers(job, dst, src, spans, range(1))
        job.stall_s += time.perf_counter() - t0
        if not ok or len(job.done) == 1:
            job.stopped.set()
            return job
        if self._pool is None:  # lazily: an engine that never swaps in holds no thread
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kv-onload")
        self._pool.submit(self._run, job, dst, src, spans)
        return job

    def abandon(self) -> None:
        """After a missed deadline: a stuck thread is left behind (it stops at its next layer,
        as the job is cancelled) and the next step gets a fresh one."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def _run(self, job: LayerOnload, dst: torch.Tensor, src: torch.Tensor,
             spans: list[tuple[int, int, int]]) -> None:
        try:
            self._copy_layers(job, dst, src, spans, range(1, len(job.done)))
        finally:
            job.stopped.set()

    def _copy_layers(self, job: LayerOnload, dst: torch.Tensor, src: torch.Tensor,
                     spans: list[tuple[int, int, int]], layers: range) -> bool:
        """Copy `layers` in order, setting each one's event; on an error (or a cancelled job)
        record it, release every waiter and return False."""
        try:
            with torch.inference_mode():  # as the forward pass: no version-counter traffic
                for layer in layers:
                    if job.cancelled:
                        raise OnloadError(f"cancelled before layer {layer}")
                    self.copy_layer(dst, src, spans, layer)
                    job.done[layer].set()
            return True
        except BaseException as exc:  # noqa: BLE001 - handed to the step, which raises it
            job.error = exc
            for event in job.done:
                event.set()
            return False
