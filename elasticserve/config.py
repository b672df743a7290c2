"""Frozen configuration dataclasses shared by the engine, the scheduler and the simulator.

Torch-free: the scheduler and the simulator import this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PreemptionMode = Literal["auto", "swap", "recompute"]
KVCacheMode = Literal["elastic", "static"]

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """How the KV cache is sized and shared.

    `num_kv_blocks` or `kv_cache_bytes` fix the size of a static cache, or the upper limit of an
    elastic one. An elastic cache starts at `kv_cache_min_bytes` and grows page by page.
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_bytes: int | None = None
    enable_prefix_caching: bool = True
    swap_space: int = 256 * MiB
    preemption_mode: PreemptionMode = "auto"
    # auto mode swaps a victim whose context is at least this long (recompute costs a prefill of
    # that many tokens; a swap costs two memcpy of its blocks) or that has several sequences.
    swap_min_tokens: int = 256
    kv_cache_mode: KVCacheMode = "elastic"
    kv_cache_min_bytes: int = 0
    kv_cache_max_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be > 0, got {self.num_kv_blocks}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be >= 0, got {self.swap_space}")
        if self.preemption_mode not in ("auto", "swap", "recompute"):
            raise ValueError(
                f"preemption_mode must be 'auto', 'swap' or 'recompute', got {self.preemption_mode!r}"
            )
        if self.kv_cache_mode not in ("elastic", "static"):
            raise ValueError(
                f"kv_cache_mode must be 'elastic' or 'static', got {self.kv_cache_mode!r}"
            )
        if self.kv_cache_min_bytes < 0:
            raise ValueError(f"kv_cache_min_bytes must be >= 0, got {self.kv_cache_min_bytes}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Continuous-batching limits for one engine step."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    # With chunked prefill, one sequence's prefill chunk in a step is at most this many tokens
    # (0 = no cap), so a very long prompt cannot take the whole token budget of every step and
    # starve the requests queued behind it (vLLM's long_prefill_token_threshold).
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        cap = self.long_prefill_token_threshold
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
            raise ValueError(
                f"long_prefill_token_threshold must be a non-negative integer, got {cap!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "max_num_batched_tokens must be >= max_model_len when chunked prefill is off "
                f"({self.max_num_batched_tokens} < {self.max_model_len})"
            )
