"""Where the KV cache's bytes live: a fixed tensor (static) or virtual pages (elastic)."""

from __future__ import annotations

import threading
from typing import Any

import torch

from elasticserve.core.block_pool import BlockPool
from elasticserve.core.kv_cache_manager import KVCacheManager
from elasticserve.core.scheduler import Scheduler
from elasticserve.engine.args import EngineArgs


def kv_block_shape(config: Any, block_size: int) -> tuple[int, ...]:
    """One block of all layers: [layers, K/V, block_size, kv_heads, head_dim]."""
    return (config.num_hidden_layers, 2, block_size, config.num_key_value_heads, config.head_dim)


def kv_block_bytes(config: Any, block_size: int, dtype: torch.dtype) -> int:
    n = 1
    for dim in kv_block_shape(config, block_size):
        n *= dim
    return n * torch.empty((), dtype=dtype).element_size()


class KVStorage:
    """A static KV cache: every block is allocated up front and never given back."""

    elastic = False

    def __init__(self, args: EngineArgs, config: Any, dtype: torch.dtype) -> None:
        self.block_size = args.block_size
        self.block_shape = kv_block_shape(config, args.block_size)
        self.block_bytes = kv_block_bytes(config, args.block_size, dtype)
        self.max_blocks = max(1, args.kv_limit_bytes(self.block_bytes) // self.block_bytes)
        self.num_blocks = self.max_blocks
        self.num_swap_blocks = args.swap_space // self.block_bytes
        self.tensor = self._allocate(dtype)
        # torch.empty leaves host pages untouched until a swap writes them
        self.swap_tensor = torch.empty((self.num_swap_blocks, *self.block_shape), dtype=dtype) \
            if self.num_swap_blocks else None
        self.pool: BlockPool | None = None
        self.manager: KVCacheManager | None = None
        # held by a step, an abort and (elastic) the idle reclaimer
        self.lock = threading.RLock()

    def _allocate(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros((self.max_blocks, *self.block_shape), dtype=dtype)

    def attach(self, pool: BlockPool, manager: KVCacheManager) -> None:
        self.pool = pool
        self.manager = manager

    def grow(self, num_blocks: int) -> bool:
        return False

    def bind_scheduler(self, scheduler: Scheduler) -> None:
        """Static storage never preempts on its own."""

    def give_back(self, target_pages: int) -> int:
        raise ValueError("a static KV cache cannot give memory back; use kv_cache_mode='elastic'")

    def release_all(self) -> int:
        raise ValueError("a static KV cache cannot give memory back; use kv_cache_mode='elastic'")

    def remap_initial(self) -> None:
        """Static storage never unmaps, so there is nothing to map again."""

    def resize(self, nbytes: int, scheduler: Scheduler) -> None:
        raise ValueError("resize_kv_cache needs kv_cache_mode='elastic'; this cache is static")

    def apply_swap_out(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            assert self.swap_tensor is not None
            dev = torch.tensor([p[0] for p in pairs], dtype=torch.long)
            host = torch.tensor([p[1] for p in pairs], dtype=torch.long)
            self.swap_tensor[host] = self.tensor[dev]

    def start_reclaimer(self, interval_s: float = 0.1) -> None:
        """Static memory is never given back: nothing to reclaim."""

    def before_step(self, scheduler: Scheduler) -> None:
        """Resize hook (elastic storage adjusts its mapped pages here)."""

    def after_step(self, scheduler: Scheduler) -> None:
        """Resize hook (elastic storage gives idle pages back here)."""

    def check_integrity(self) -> None:
        assert self.pool is not None
        self.pool.check_integrity()

    def memory_stats(self) -> dict[str, int]:
        assert self.pool is not None
        total = self.max_blocks * self.block_bytes
        return {
            "page_size": total, "kv_reserved_bytes": total, "kv_mapped_bytes": total,
            "kv_used_bytes": self.pool.num_used * self.block_bytes,
            "kv_cached_bytes": self.pool.num_cached_free * self.block_bytes,
            "pages_mapped": 1, "grow_events": 0, "shrink_events": 0, "compactions": 0,
        }
