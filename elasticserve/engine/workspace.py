"""One pool for runtime memory too (eLLM's ballooning): a step's workspace in budget pages.

`WorkspaceArena` reserves address space for the largest workspace a step can need (the
scheduler's token and sequence caps, models/workspace.py says which buffers) and maps pages
of it only for the step that needs them. On a shared budget every page is granted first by
the same broker as the engine's KV pages (ModelHost's `grant_spare`: the arbiter's free pages
and other models' free or cached KV pages, never a preemption), so a big prefill borrows pages
no cache is using (the arbiter's books show them under the model) and gives them back after
the step. Pages up to `workspace_retain_bytes` stay mapped while steps keep needing
them (decode steps map nothing), and go once no step needed them for `kv_shrink_after_s`.
A refused grant (or a failed map) is not an error: the step allocates as before, counted in
`fallbacks`. The arena is used under the KV storage's lock (a step, its own idle reclaimer,
sleep, which unmaps it whole: engine/sleep_wake.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

import torch

from elasticserve.engine.periodic import run_periodically
from elasticserve.memory.backend import MemoryBackend
from elasticserve.memory.factory import get_backend
from elasticserve.memory.vtensor import VirtualTensor
from elasticserve.models.llama import CausalLM
from elasticserve.models.workspace import StepWorkspace

if TYPE_CHECKING:
    from elasticserve.engine.llm_engine import LLMEngine


class WorkspaceBroker(Protocol):
    """The budget's side: engine/multi_model.py's ModelHost (its `core.kv_pages.PageBroker`
    grant/release, with a grant that never preempts or sleeps another model)."""

    def grant_spare(self, pages: int) -> int:
        """All `pages` or 0, only from pages nobody's live KV is using."""
        ...

    def release(self, pages: int) -> None:
        """Take back pages the arena unmapped."""
        ...


class WorkspaceArena:
    """Per-engine workspace pages: mapped for a step, released past a small retained floor."""

    def __init__(self, model: CausalLM, max_tokens: int, max_rows: int,
                 backend: MemoryBackend, broker: WorkspaceBroker | None, retain_bytes: int,
                 shrink_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        cfg = model.config
        dtype = model.model.embed_tokens.weight.dtype
        packed = model.linears_packed
        probe = StepWorkspace(torch.empty(0, dtype=torch.uint8), cfg.hidden_size,
                              cfg.intermediate_size, cfg.vocab_size, dtype,
                              gate_up_placed=not packed, logits_placed=model.logits_placeable)
        self.page_size = backend.page_size
        most = max(probe.need_bytes(max_tokens, max_rows), 1)
        self.backend = backend
        self.vt = VirtualTensor(backend, -(-most // self.page_size) * self.page_size,
                                torch.uint8, ())
        self.view = StepWorkspace(self.vt.tensor, cfg.hidden_size, cfg.intermediate_size,
                                  cfg.vocab_size, dtype, probe.gate_up_placed,
                                  probe.logits_placed)
        self.broker = broker
        self.retain_pages = retain_bytes // self.page_size
        self.shrink_after_s = shrink_after_s
        self.clock = clock
        self.grants = self.fallbacks = self.pages_granted = self.steps = 0
        self.peak_bytes = 0
        self._keep, self._keep_at = 0, 0.0  # retained pages and when a step last needed them
        self.lock: threading.RLock | None = None  # the KV storage's: steps, sleep, reclaim
        self.closed = False

    @property
    def mapped_pages(self) -> int:
        return self.vt.mapped_pages

    # ---- the runner's WorkspaceSource ---------------------------------------------------------
    def begin(self, tokens: int, rows: int) -> StepWorkspace | None:
        need = self.view.need_bytes(tokens, rows)
        pages = -(-need // self.page_size)
        if pages == 0:
            return None
        if pages > self.vt.max_pages or not self._map_to(pages):
            self.fallbacks += 1
            return None
        if pages <= self.retain_pages:
            self._keep, self._keep_at = max(pages, self._keep), self.clock()
        self.steps += 1
        self.peak_bytes = max(self.peak_bytes, self.vt.mapped_bytes)
        self.view.limit, self.view.active = need, True
        return self.view

    def end(self) -> None:
        """The step's views are dead: give back what exceeds the retained floor now (the
        step still holds the KV storage's lock), and check the books."""
        self.view.active = False
        self.view.limit = 0
        self.shrink()
        self.check_integrity()
        fill = getattr(self.backend, "fill_pool", None)  # CUDA: re-create pages off the path
        if fill is not None:
            fill()

    def reclaim_idle(self) -> None:
        """The housekeeping thread: an idle engine's floor goes once no step needed it for
        `shrink_after_s` (nobody steps an idle engine). Never waits for the lock."""
        if self.lock is not None and self.lock.acquire(blocking=False):
            try:
                self.shrink()
            finally:
                self.lock.release()

    def _map_to(self, pages: int) -> bool:
        more = pages - self.vt.mapped_pages
        if more <= 0:
            return True
        got = more if self.broker is None else self.broker.grant_spare(more)
        if got < more:
            self._release(got)
            return False
        before = self.vt.mapped_pages
        try:
            self.vt.map_pages(more)
        except (OSError, RuntimeError, MemoryError):  # a map-count limit or out of memory
            done = self.vt.mapped_pages - before  # these stay booked until `end` unmaps them
            self.pages_granted += done
            self._release(more - done)
            return False
        self.grants += 1
        self.pages_granted += more
        return True

    def _release(self, pages: int) -> None:
        if pages > 0 and self.broker is not None:
            self.broker.release(pages)

    # ---- after a step and while idle (the caller holds the KV storage's lock) -----------------
    def shrink(self) -> int:
        """Unmap and release what exceeds the retained floor; returns the pages given back."""
        if self.clock() - self._keep_at >= self.shrink_after_s:
            self._keep = 0
        return self._unmap_to(min(self._keep, self.retain_pages), release=True)

    def release_all(self) -> int:
        """Sleep: unmap every page, not released (the broker books the sleep itself)."""
        self._keep = 0
        return self._unmap_to(0, release=False)

    def _unmap_to(self, pages: int, release: bool) -> int:
        gone = self.vt.mapped_pages - pages
        if gone <= 0 or self.view.active:
            return 0
        self.vt.unmap_pages(gone)
        if release:
            self._release(gone)
        return gone

    def close(self) -> None:
        """Give every page back and the address space (the KV storage's close calls it)."""
        if not self.closed:
            self.closed = True
            self._unmap_to(0, release=True)
            self.vt.close()
            self.backend.close()

    def check_integrity(self) -> None:
        if self.view.active:
            raise AssertionError("the workspace is active between steps")
        if self.vt.mapped_pages > self.retain_pages:
            raise AssertionError(f"{self.vt.mapped_pages} workspace pages mapped between steps, "
                                 f"retained floor {self.retain_pages}")

    def memory_stats(self) -> dict[str, int]:
        return {"workspace_mapped_bytes": self.vt.mapped_bytes,
                "workspace_peak_bytes": self.peak_bytes,
                "workspace_reserved_bytes": self.vt.max_pages * self.page_size,
                "workspace_grants": self.grants, "workspace_pages_granted": self.pages_granted,
                "workspace_fallbacks": self.fallbacks, "workspace_steps": self.steps}


def make_workspace(engine: LLMEngine) -> WorkspaceArena | None:
    """The engine's arena when `runtime_memory_from_budget` is set, else None. The engine's
    page broker is the `WorkspaceBroker` (ModelHost in one process), or gives one with
    `spare_broker(mapped)`: a worker's (procs/page_client.py), whose KV grants name slots of
    its KV file, books workspace pages apart (the arena maps its own memory for them)."""
    config, broker, kv = engine.config, engine.broker, engine.kv
    memory = config.memory
    if not memory.runtime_memory_from_budget:
        return None
    spare_broker = getattr(broker, "spare_broker", None)
    if broker is not None and spare_broker is None and not hasattr(broker, "grant_spare"):
        raise ValueError("runtime_memory_from_budget: this engine's page broker cannot grant "
                         "workspace pages (it has neither grant_spare nor spare_broker)")
    sched = config.scheduler
    backend = get_backend(memory.backend, kv.page_size)
    set_stream = getattr(backend, "set_stream", None)
    if set_stream is not None and config.device.device == "cuda":
        # an unmap waits for the stream the step's kernels run on (as the KV's does)
        set_stream(torch.cuda.current_stream().cuda_stream)
    arena = WorkspaceArena(engine.model, sched.max_num_batched_tokens, sched.max_num_seqs,
                           backend,
                           cast(WorkspaceBroker | None, broker),
                           memory.workspace_retain_bytes, config.cache.kv_shrink_after_s)
    if spare_broker is not None:  # its messages carry what the arena maps
        arena.broker = cast(WorkspaceBroker, spare_broker(lambda: arena.mapped_pages))
    arena.lock = kv.lock
    kv.workspace = arena  # closed with the KV storage, listed in its memory stats
    run_periodically(arena, 0.1, WorkspaceArena.reclaim_idle, "workspace-reclaimer")
    return arena
