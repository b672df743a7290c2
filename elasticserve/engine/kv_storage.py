"""Where the KV cache's bytes live: a tensor over reserved address space, mapped page by page.

One class for both modes. The page accounting (grow, hysteresis shrink, compaction, reclaim)
is `core.kv_pages.ElasticPages`, the object the simulator drives too; this class supplies its
physical actions: pages of a `VirtualTensor` and KV copies between blocks. A static cache is
the case floor = ceiling (as in the simulator): every page is mapped at start and none is
given back. With a `PageBroker` (several models on one budget, see engine/multi_model.py)
every page mapped is granted first.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

from elasticserve.config import CacheConfig, MemoryConfig
from elasticserve.core.block_pool import BlockPool
from elasticserve.core.kv_cache_manager import KVCacheManager
from elasticserve.core.kv_pages import ElasticPages, PageBroker, PagePolicy, Pairs
from elasticserve.core.scheduler import Scheduler
from elasticserve.core.tiered_kv import TieredKVCacheManager
from elasticserve.engine.host_tier import HostKVTier
from elasticserve.engine.periodic import run_periodically
from elasticserve.engine.workspace import WorkspaceArena
from elasticserve.errors import InvalidFieldError
from elasticserve.kernels.block_copy import copy_rows, host_empty, index_tensors
from elasticserve.memory.backend import MemoryBackend, round_up
from elasticserve.memory.factory import get_backend
from elasticserve.memory.vtensor import VirtualTensor
from elasticserve.models.hf_config import ModelConfig
from elasticserve.outputs import SchedulerOutput

T = TypeVar("T")


def kv_block_shape(config: ModelConfig, block_size: int) -> tuple[int, ...]:
    """One block of all layers: [layers, K/V, block_size, kv_heads, head_dim]."""
    return (config.num_hidden_layers, 2, block_size, config.num_key_value_heads, config.head_dim)


def kv_block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    n = 1
    for dim in kv_block_shape(config, block_size):
        n *= dim
    return n * torch.empty((), dtype=dtype).element_size()


class KVStorage:
    """The KV cache of one engine: static (all mapped, fixed) or elastic (grows, shrinks)."""

    def __init__(self, cache: CacheConfig, memory: MemoryConfig, model: ModelConfig,
                 dtype: torch.dtype, broker: PageBroker | None = None,
                 backend: MemoryBackend | None = None, device: str = "cpu") -> None:
        self.elastic = cache.kv_cache_mode == "elastic"
        if broker is not None and not self.elastic:
            raise ValueError("a shared page budget needs kv_cache_mode='elastic'")
        self.block_size = cache.block_size
        self.block_shape = kv_block_shape(model, cache.block_size)
        self.block_bytes = kv_block_bytes(model, cache.block_size, dtype)
        limit_blocks = max(1, cache.kv_limit_bytes(self.block_bytes) // self.block_bytes)
        self.backend = backend or _backend(cache, memory, limit_blocks * self.block_bytes)
        self.device = torch.device(device)
        if (self.backend.name == "cuda") != (self.device.type == "cuda"):
            # e.g. a worker process's shared host budget handed to a GPU engine
            raise ValueError(f"device={self.device.type!r}: the KV memory backend "
                             f"{self.backend.name!r} cannot serve it")
        bind_stream(self.backend, self.device)
        self.page_size = self.backend.page_size
        self.vt = VirtualTensor(self.backend, limit_blocks * self.block_bytes, dtype,
                                self.block_shape)
        self.max_blocks = min(limit_blocks, self.vt.max_rows)
        policy = _page_policy(cache, self.page_size, self.block_bytes, self.max_blocks)
        self.pages = ElasticPages(policy, self, broker)
        # host memory: the elastic host KV tier when set, else the fixed swap area
        self.host_tier = None if cache.host_kv_cache_bytes is None else HostKVTier(
            cache.host_kv_cache_bytes, memory.page_size, self.block_shape, dtype)
        self.swap_tensor: torch.Tensor | None
        if self.host_tier is not None:
            self.num_swap_blocks = self.host_tier.num_blocks
            self.swap_tensor = self.host_tier.tensor
        else:
            self.num_swap_blocks = cache.swap_space // self.block_bytes
            # pinned for a GPU (asynchronous copies); pages untouched until a swap writes them
            self.swap_tensor = host_empty((self.num_swap_blocks, *self.block_shape), dtype,
                                          self.device) if self.num_swap_blocks else None
        self.pool: BlockPool | None = None
        self.manager: KVCacheManager | None = None
        # held by a step, an abort, a broker's reclaim and the idle reclaimer
        self.lock = threading.RLock()
        self.closed = False
        self.workspace: WorkspaceArena | None = None  # a step's pages (engine/workspace.py)
        self.num_blocks = self.pages.start()

    @property
    def tensor(self) -> torch.Tensor:
        """The whole `[max rows, *block_shape]` view; its address never changes."""
        return self.vt.tensor

    def attach(self, pool: BlockPool, manager: KVCacheManager) -> None:
        self.pool = pool
        self.manager = manager
        self.pages.attach(pool, manager)
        if self.host_tier is not None:
            self.host_tier.attach(manager.host_blocks)
        if isinstance(manager, TieredKVCacheManager):
            manager.copy_to_host = self.swap_out  # an evicted prefix block, at once
            manager.grow = self.grow if self.elastic else None

    def bind_scheduler(self, scheduler: Scheduler) -> None:
        """Resize and reclaim may preempt: they need the scheduler's preempt_to_fit; the
        scheduler holds (not fails) a request that outgrows a lowered ceiling."""
        self.pages.preempt_to_fit = scheduler.preempt_to_fit
        scheduler.can_hold_later = self.pages.can_hold_later

    # ---- PageActions: what mapping and copying mean here ---------------------------------
    def map_pages(self, n: int) -> None:
        self.vt.map_pages(n)

    def unmap_pages(self, n: int) -> None:
        self.vt.unmap_pages(n)

    def copy_blocks(self, pairs: Pairs) -> None:
        src, dst = index_tensors(pairs, self.tensor.device)
        self.tensor[dst] = self.tensor[src]

    def swap_out(self, pairs: Pairs) -> None:
        if pairs:
            assert self.swap_tensor is not None
            copy_rows(self.swap_tensor, self.tensor, pairs)

    # ---- hooks the scheduler and the engine call -----------------------------------------
    def grow(self, num_blocks: int) -> bool:
        """Map pages for `num_blocks` more blocks; a static cache is already at its ceiling."""
        return self.pages.grow(num_blocks)

    def before_step(self, scheduler: Scheduler) -> None:
        self.lock.acquire()

    def add_onloads(self, out: SchedulerOutput) -> None:
        """Host-tier prefix hits of this step join its swap-ins (after the swap-outs)."""
        if isinstance(self.manager, TieredKVCacheManager):
            out.blocks_to_swap_in.extend(self.manager.take_onloads())

    def after_step(self, scheduler: Scheduler) -> None:
        try:
            if isinstance(self.manager, TieredKVCacheManager):
                self.manager.end_step()
            self.pages.after_step(scheduler.memory_pressure)
            if self.host_tier is not None:
                self.host_tier.shrink()
            refill_pool(self.backend)
        finally:
            self.lock.release()

    def maybe_shrink(self) -> None:
        self.pages.maybe_shrink()

    def release_all(self) -> int:
        """Sleep: preempt every request, drop the prefix cache (the host tier's too: asleep,
        an engine holds only its offloaded requests' KV), unmap every page."""
        tiered = self.manager if isinstance(self.manager, TieredKVCacheManager) else None
        if tiered is None:
            return self.pages.release_all()
        tiered.offload_enabled = False
        try:
            return self.pages.release_all()
        finally:
            tiered.offload_enabled = True
            tiered.drop_host_cache()
            if self.host_tier is not None:
                self.host_tier.shrink()

    def remap_initial(self) -> None:
        """After sleep: map the starting pages again (granted by the broker)."""
        self.pages.start()

    @property
    def max_bytes(self) -> int:
        """The reserved maximum: the most a ceiling may be (`kv_cache_max_bytes`, in pages)."""
        return self.pages.policy.max_pages * self.page_size

    def resize(self, nbytes: int, scheduler: Scheduler) -> None:
        """User-set ceiling, from one page up to the reserved maximum (`max_bytes`, set at start
        by `kv_cache_max_bytes`). Shrinking below what is in use preempts (swap or recompute)
        first; the preempted requests wait until the ceiling rises again."""
        if not self.elastic:
            raise ValueError("resize_kv_cache needs kv_cache_mode='elastic'; this cache is static")
        if nbytes < self.page_size:
            raise InvalidFieldError("nbytes", f"resize_kv_cache: nbytes must be at least one "
                                    f"page ({self.page_size} bytes), got {nbytes}")
        if nbytes > self.max_bytes:
            raise InvalidFieldError(
                "nbytes", f"resize_kv_cache: nbytes={nbytes} is above the address space reserved "
                f"at start ({self.max_bytes} bytes); start with a larger kv_cache_max_bytes")
        with self.lock:
            self.bind_scheduler(scheduler)
            self.pages.set_limit(nbytes // self.page_size)

    def reclaim_idle(self) -> None:
        """Called by the reclaimer thread: shrink between steps, and while no step runs."""
        if self.lock.acquire(blocking=False):
            try:
                self.pages.after_step(memory_pressure=False)
                if self.host_tier is not None:
                    self.host_tier.shrink()
            finally:
                self.lock.release()

    def start_reclaimer(self, interval_s: float = 0.1) -> None:
        """A daemon thread that lets an idle engine give memory back (nothing else steps it);
        a static cache never shrinks, so it gets none."""
        if self.elastic:
            run_periodically(self, interval_s, KVStorage.reclaim_idle, "kv-reclaimer")

    def try_locked(self, action: Callable[[], T]) -> T | None:
        """`action()` under the lock if nobody holds it (a step, an abort, a reclaim), else
        None at once: callers holding another lock (the arbiter's) must never wait for ours."""
        if not self.lock.acquire(blocking=False):
            return None
        try:
            return action()
        finally:
            self.lock.release()

    def close(self) -> None:
        with self.lock:
            if not self.closed:  # idempotent: a pool and its owner may both close an engine
                self.closed = True
                if self.workspace is not None:
                    self.workspace.close()
                self.vt.close()
                if self.host_tier is not None:
                    self.host_tier.close()

    # ---- what a page broker may take back (the caller holds `lock`) ----------------------
    def reclaimable(self) -> tuple[int, int]:
        """(pages free of live and cached blocks, pages more if cached blocks go)."""
        return self.pages.reclaimable()

    def free_pages(self, n: int) -> int:
        return self.pages.free_pages(n)

    def drop_cached(self, n: int) -> int:
        return self.pages.drop_cached(n)

    def preempt(self, n: int) -> int:
        return self.pages.preempt(n)

    def owe_pages(self, n: int, preempt: bool = False) -> None:
        """A broker wanted `n` pages while a step held the lock: unmap them after that step
        (free pages only, or with `preempt` by preempting requests as needed)."""
        if preempt:
            self.pages.preempt_debt = max(self.pages.preempt_debt, n)
        else:
            self.pages.reclaim_debt += n

    # ---- observability --------------------------------------------------------------------
    def check_integrity(self) -> None:
        assert self.pool is not None
        self.pool.check_integrity()
        self.pages.check_integrity()
        assert self.pages.mapped_pages == self.vt.mapped_pages, "page count out of sync"
        if self.host_tier is not None:
            self.host_tier.check_integrity()

    def memory_stats(self) -> dict[str, int]:
        assert self.pool is not None
        return {
            "page_size": self.page_size,
            "kv_reserved_bytes": self.vt.max_rows * self.block_bytes,
            "kv_mapped_bytes": self.vt.mapped_bytes,
            "kv_used_bytes": self.pool.num_used * self.block_bytes,
            "kv_cached_bytes": self.pool.num_cached_free * self.block_bytes,
            "pages_mapped": self.vt.mapped_pages,
            "grow_events": self.pages.grow_events, "shrink_events": self.pages.shrink_events,
            "pages_granted": self.pages.pages_granted,
            "compactions": self.pages.compactions,
            **self._host_stats(),
            **(self.workspace.memory_stats() if self.workspace is not None else {}),
        }

    def _host_stats(self) -> dict[str, int]:
        if self.host_tier is not None:
            cached = self.manager.host_cache if isinstance(
                self.manager, TieredKVCacheManager) else ()
            return {**self.host_tier.memory_stats(),
                    "host_kv_cached_bytes": len(cached) * self.block_bytes}
        assert self.manager is not None
        swap = self.num_swap_blocks * self.block_bytes  # the fixed area: reserved is mapped
        return {"host_kv_reserved_bytes": swap, "host_kv_mapped_bytes": swap,
                "host_kv_used_bytes": self.manager.host_blocks.num_used * self.block_bytes}


def _backend(cache: CacheConfig, memory: MemoryConfig, nbytes: int) -> MemoryBackend:
    backend = get_backend(memory.backend, memory.page_size)
    if cache.kv_cache_mode == "elastic" or memory.page_size is not None:
        return backend
    # A static cache never maps or unmaps after start: one page of its own size (rounded up
    # to what the backend allows) maps no memory the split of a budget did not give it.
    unit = mmap.PAGESIZE if backend.name == "host" else backend.page_size
    backend.close()
    return get_backend(memory.backend, round_up(nbytes, unit))


def _page_policy(cache: CacheConfig, page_size: int, block_bytes: int,
                 max_blocks: int) -> PagePolicy:
    whole = max_blocks * block_bytes
    if cache.kv_cache_mode == "static":
        # floor = ceiling: everything mapped at start and never shrunk, exactly max_blocks
        # blocks even where they end inside a page
        pages = -(-whole // page_size)
        return PagePolicy(page_size, block_bytes, min_pages=pages, max_pages=pages,
                          reserve_pages=0, max_blocks=max_blocks)
    return PagePolicy(
        page_size, block_bytes, min_pages=-(-cache.kv_cache_min_bytes // page_size),
        max_pages=max(1, whole // page_size), reserve_pages=cache.kv_reserve_pages,
        shrink_after_s=cache.kv_shrink_after_s, keep_peak_s=cache.kv_keep_peak_s,
        max_blocks=max_blocks)


def bind_stream(backend: MemoryBackend, device: torch.device) -> None:
    """A GPU backend's unmap waits for the stream the engine's kernels run on (torch's current
    stream), not for every stream of the context (other models' included)."""
    set_stream = getattr(backend, "set_stream", None)
    if set_stream is not None and device.type == "cuda":
        set_stream(torch.cuda.current_stream(device).cuda_stream)


def refill_pool(backend: MemoryBackend) -> None:
    """Top a backend's pool of physical pages up after the step's unmaps (cuMemCreate is
    ~0.2 ms a page: this keeps it out of the next step's grow). Backends without a pool skip."""
    fill = getattr(backend, "fill_pool", None)
    if fill is not None:
        fill()
