"""Frozen configuration dataclasses shared by the engine, the scheduler and the simulator.

Torch-free: the scheduler and the simulator import this module.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from typing import Literal

PreemptionMode = Literal["auto", "swap", "recompute"]
KVCacheMode = Literal["elastic", "static"]
Device = Literal["cpu", "cuda"]

# torch's names for the floating-point dtypes a model and its KV cache may use (checked here
# without importing torch; the engine resolves the name once)
DTYPES = ("auto", "float32", "float", "float16", "half", "bfloat16", "float64", "double")
MEMORY_BACKENDS = ("auto", "host", "cuda")
ATTENTION_BACKENDS = ("auto", "native", "torch", "triton")
LINEAR_BACKENDS = ("auto", "mkldnn", "torch")

# the SLO policy's step-time model (a, b, c) when none is fitted: the demo model on this CPU
# (13 ms/step, ~0.1 ms/token, ~0.5 us/context token; calibration in BENCHMARKS.md, rounded)
DEFAULT_STEP_COST = (0.013, 1e-4, 5e-7)
MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """How the KV cache is sized and shared.

    `num_kv_blocks` or `kv_cache_bytes` fix the size of a static cache, or the upper limit of an
    elastic one. An elastic cache starts at `kv_cache_min_bytes` and grows page by page up to
    `kv_cache_max_bytes`; the `kv_*_s` knobs and `kv_reserve_pages` shape how it grows and
    gives memory back (a static cache ignores them).
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
    kv_reserve_pages: int = 1  # pre-mapped pages kept beyond need, so allocation rarely waits
    kv_shrink_after_s: float = 0.5  # hysteresis before unused pages are given back
    kv_keep_peak_s: float = 5.0  # a busy cache keeps its recent peak of live pages this long
    # an elastic host-memory KV tier of at most this many bytes (engine/host_tier.py); set, it
    # replaces the fixed swap area and "auto" preemption offloads to it whenever it has room
    host_kv_cache_bytes: int | None = None
    # a step's swap-in (onload from the tier or swap area) is copied layer by layer on a helper
    # thread, overlapped with the forward pass (worker/layer_onload.py); CPU only for now
    layerwise_onload: bool = False
    # LayerKV residency: a preempted decode group keeps decoding with its KV in the host tier,
    # each layer staged to the device just ahead of its use (worker/layer_stream.py)
    layerwise_residency: bool = False
    # its TPOT guard: a decode is streamed for a waiting prompt only while the predicted step
    # time stays within this many ms (core/stream_guard.py); None: no guard
    stream_tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("layerwise_onload", "layerwise_residency"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.layerwise_residency and self.host_kv_cache_bytes is None:
            raise ValueError("layerwise_residency needs the host KV tier (host_kv_cache_bytes)")
        if self.stream_tpot_ms is not None:
            tpot = self.stream_tpot_ms
            if isinstance(tpot, bool) or not isinstance(tpot, (int, float)) or not tpot > 0:
                raise ValueError(f"stream_tpot_ms must be a number > 0, got {tpot!r}")
            if not self.layerwise_residency:
                raise ValueError("stream_tpot_ms needs layerwise_residency (it guards its streaming)")
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
        self._check_elastic_knobs()

    def _check_elastic_knobs(self) -> None:
        _at_least(self, "swap_min_tokens", 0)
        _at_least(self, "kv_cache_min_bytes", 0)
        _at_least(self, "kv_reserve_pages", 0)
        _at_least(self, "kv_shrink_after_s", 0.0, (int, float))
        _at_least(self, "kv_keep_peak_s", 0.0, (int, float))
        if self.host_kv_cache_bytes is not None:
            _at_least(self, "host_kv_cache_bytes", 1)
        top = self.kv_cache_max_bytes
        if top is not None and top <= 0:
            raise ValueError(f"kv_cache_max_bytes must be > 0, got {top}")
        if top is not None and self.kv_cache_min_bytes > top:
            raise ValueError(f"kv_cache_min_bytes must be <= kv_cache_max_bytes "
                             f"({self.kv_cache_min_bytes} > {top})")

    def kv_limit_bytes(self, block_bytes: int) -> int:
        """The most KV memory this engine may ever hold (static size or elastic ceiling)."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks * block_bytes
        if self.kv_cache_mode == "elastic" and self.kv_cache_max_bytes is not None:
            return self.kv_cache_max_bytes
        if self.kv_cache_bytes is not None:
            return self.kv_cache_bytes
        return 4 * GiB if self.kv_cache_mode == "elastic" else 512 * MiB


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
    # "fcfs": (priority, arrival) order; "slo": waiting groups by slack to their TTFT target
    # (core/slo.py), the preemption victim is the running group with the most slack
    policy: str = "fcfs"
    admission: str = "none"  # "slo": add() refuses a request predicted to miss its TTFT target
    slo_ttft_ms: float | None = None  # model-level defaults of the per-request targets
    slo_tpot_ms: float | None = None
    # (a, b, c) of the SLO policy's step-time model: a + b*tokens + c*context tokens, seconds
    step_cost: tuple[float, float, float] = DEFAULT_STEP_COST
    # refit step_cost to the steps as they run (the engine's wall clock; not the simulator's)
    step_cost_online: bool = False

    def __post_init__(self) -> None:
        _one_of(self, "policy", ("fcfs", "slo"))
        _one_of(self, "admission", ("none", "slo"))
        for name in ("slo_ttft_ms", "slo_tpot_ms"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not value > 0):
                raise ValueError(f"{name} must be a positive number of milliseconds, got {value!r}")
        cost = self.step_cost
        if len(cost) != 3 or any(isinstance(c, bool) or not isinstance(c, int | float) or c < 0
                                 for c in cost):
            raise ValueError(f"step_cost must be three non-negative numbers (a, b, c), got {cost!r}")
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


@dataclass(frozen=True, slots=True)
class ModelLoadConfig:
    """Which checkpoint to load and how to run it (the HF config.json is models' ModelConfig)."""

    path: str
    dtype: str = "auto"  # a torch dtype name; "auto": fp32 on CPU, the checkpoint's elsewhere
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads (process-wide); None keeps torch's
    # a CPU step of at most this many tokens runs on one thread (worker/step_threads.py); 0: off
    small_step_tokens: int = 64
    # decode attention: "auto" (the C kernel where it builds and applies), "native", "torch";
    # "triton": decode and prefill by kernels/triton_attention.py (interpreted without a GPU)
    attention_backend: str = "auto"
    # linear layers: "mkldnn" (weights prepacked for oneDNN once per load), "torch" (F.linear);
    # "auto": mkldnn for fp32 CPU models where torch has oneDNN, else torch
    linear_backend: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.path, str):
            raise ValueError(f"model must be a path string, got {self.path!r}")
        _one_of(self, "dtype", DTYPES, "must name a torch dtype")
        _one_of(self, "attention_backend", ATTENTION_BACKENDS)
        _one_of(self, "linear_backend", LINEAR_BACKENDS)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.num_threads is not None:
            _at_least(self, "num_threads", 1)
        _at_least(self, "small_step_tokens", 0)


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    """Where KV pages come from: a memory backend and its page size (None: the backend's)."""

    backend: str = "host"
    page_size: int | None = None
    # a step's largest intermediates live in pages of the same budget (engine/workspace.py)
    runtime_memory_from_budget: bool = False
    workspace_retain_bytes: int = 8 << 20  # kept mapped between steps (decode needs no map)

    def __post_init__(self) -> None:
        _one_of(self, "backend", MEMORY_BACKENDS, label="memory_backend")
        if not isinstance(self.runtime_memory_from_budget, bool):
            raise ValueError(f"runtime_memory_from_budget must be a bool, "
                             f"got {self.runtime_memory_from_budget!r}")
        keep = self.workspace_retain_bytes
        if not isinstance(keep, int) or keep < 0:
            raise ValueError(f"workspace_retain_bytes must be an int >= 0, got {keep!r}")
        ps = self.page_size
        if ps is not None and (not isinstance(ps, int) or ps <= 0 or ps % mmap.PAGESIZE):
            raise ValueError(f"page_size must be a positive multiple of the OS page size "
                             f"({mmap.PAGESIZE}), got {ps!r}")


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """Where the model runs: "cpu" or "cuda" (weights, inputs, KV, sampler on that device).

    Torch-free, so whether a GPU exists is checked where torch is at hand
    (`EngineArgs.create_engine_config`). `cuda_graphs`: decode steps replay a CUDA graph per
    bucketed batch size (worker/cuda_graphs.py); on the CPU the same static-buffer path runs
    eagerly, which is how it is tested.
    """

    device: Device = "cpu"
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        _one_of(self, "device", ("cpu", "cuda"))
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be a bool, got {self.cuda_graphs!r}")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything one engine is built from, validated once (`EngineArgs.create_engine_config`)."""

    model: ModelLoadConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)

    def __post_init__(self) -> None:
        # the KV must live where the kernels read it: host pages for the CPU, VMM for a GPU
        want = "cuda" if self.device.device == "cuda" else "host"
        if self.memory.backend not in ("auto", want):
            raise ValueError(f"memory_backend {self.memory.backend!r} cannot serve "
                             f"device={self.device.device!r}; use {want!r} or 'auto'")
        if self.cache.layerwise_onload and self.device.device == "cuda":
            raise ValueError("layerwise_onload is CPU-only for now (a CUDA copy stream with "
                             "per-layer events is not built); use device='cpu'")
        if self.cache.layerwise_residency and (self.device.device != "cpu" or
                                               self.model.attention_backend not in
                                               ("auto", "native")):
            raise ValueError("layerwise_residency needs device='cpu' and the native attention "
                             f"backend, got {self.device.device!r}, "
                             f"{self.model.attention_backend!r}")
        if self.device.cuda_graphs and self.model.attention_backend not in ("auto", "triton"):
            raise ValueError("cuda_graphs needs attention_backend 'triton' (static launch "
                             f"shapes), got {self.model.attention_backend!r}")


def _at_least(obj: object, name: str, low: float,
              kind: type | tuple[type, ...] = int) -> None:
    value: float = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, kind) or value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


def _one_of(obj: object, name: str, allowed: tuple[str, ...], why: str = "must be one of",
            label: str | None = None) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ValueError(f"{label or name} {why} ({', '.join(allowed)}), got {value!r}")
