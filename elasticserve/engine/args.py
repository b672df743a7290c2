"""User-facing engine arguments (the keyword arguments of `LLM(...)`), turned into one config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from elasticserve.config import (
    DEFAULT_STEP_COST,
    CacheConfig,
    Device,
    DeviceConfig,
    EngineConfig,
    KVCacheMode,
    MemoryConfig,
    MiB,
    ModelLoadConfig,
    PreemptionMode,
    SchedulerConfig,
)

if TYPE_CHECKING:
    from elasticserve.models.hf_config import ModelConfig


@dataclass(slots=True)
class EngineArgs:
    """Flat, unvalidated arguments; `create_engine_config` checks them and builds the config
    every part of the engine reads."""

    model: str
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_bytes: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0  # cap on one sequence's prefill chunk per step; 0: none
    swap_space: int = 256 * MiB
    preemption_mode: PreemptionMode = "auto"
    swap_min_tokens: int = 256  # auto preemption swaps contexts at least this long
    kv_cache_mode: KVCacheMode = "elastic"
    kv_cache_min_bytes: int = 0
    kv_cache_max_bytes: int | None = None
    kv_reserve_pages: int = 1  # pre-mapped pages kept beyond need, so allocation rarely waits
    kv_shrink_after_s: float = 0.5  # hysteresis before unused pages are given back
    kv_keep_peak_s: float = 5.0  # a busy cache keeps its recent peak of live pages this long
    # host memory as an elastic KV tier (bytes; None: the fixed `swap_space` area as before)
    host_kv_cache_bytes: int | None = None
    layerwise_onload: bool = False  # swap-ins copied layer by layer, overlapped with compute
    layerwise_residency: bool = False  # preempted decodes keep decoding from the host tier
    stream_tpot_ms: float | None = None  # its TPOT guard: stream for admission only within this
    memory_backend: str = "auto"  # "auto": VMM pages on a cuda device, host pages on the CPU
    page_size: int | None = None
    # a step's MLP intermediate and logits in pages of the KV budget (engine/workspace.py)
    runtime_memory_from_budget: bool = False
    workspace_retain_bytes: int = 8 << 20  # workspace kept mapped between steps
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads (process-wide); None keeps torch's
    small_step_tokens: int = 64  # steps of at most this many tokens run on one thread (CPU)
    dtype: str | None = None
    # decode attention: "auto" (the C kernel where it builds and applies), "native", "torch",
    # "triton" (decode and prefill by the Triton kernel; Triton's interpreter without a GPU)
    attention_backend: str = "auto"
    linear_backend: str = "auto"  # "mkldnn" (prepacked oneDNN weights), "torch"; "auto": see config
    device: Device = "cpu"  # "cuda": weights, inputs, KV and sampler on the GPU
    cuda_graphs: bool = False  # decode replays a CUDA graph per bucketed batch size
    # SLO-aware scheduling (core/slo.py): "fcfs" or "slo" (vLLM's option name); admission
    # "slo" refuses a request predicted to miss its TTFT target (SLOUnattainableError)
    scheduling_policy: str = "fcfs"
    admission: str = "none"
    slo_ttft_ms: float | None = None  # defaults of the per-request SamplingParams targets
    slo_tpot_ms: float | None = None
    slo_step_cost: tuple[float, float, float] | None = None  # fitted (a, b, c); None: defaults

    def create_engine_config(self, model_max_len: int) -> EngineConfig:
        """The validated config; `model_max_len` is the checkpoint's context limit. Every bad
        value raises ValueError naming its field."""
        _check_device(self.device)
        on_gpu = self.device == "cuda"
        attention = self.attention_backend
        if attention == "auto" and (on_gpu or self.cuda_graphs):
            attention = "triton"  # the GPU's kernel; graphs need its static launch shapes
        backend = self.memory_backend
        if backend == "auto":
            backend = "cuda" if on_gpu else "host"
        model = ModelLoadConfig(path=self.model, dtype=self.dtype or "auto", seed=self.seed,
                                num_threads=self.num_threads, attention_backend=attention,
                                small_step_tokens=self.small_step_tokens,
                                linear_backend=self.linear_backend)
        memory = MemoryConfig(backend=backend, page_size=self.page_size,
                              runtime_memory_from_budget=self.runtime_memory_from_budget,
                              workspace_retain_bytes=self.workspace_retain_bytes)
        if self.runtime_memory_from_budget and self.cuda_graphs:
            # a graph would capture the workspace's addresses: its pages must then stay mapped
            raise ValueError("runtime_memory_from_budget does not work with cuda_graphs yet")
        return EngineConfig(model=model, cache=self.cache_config(), memory=memory,
                            scheduler=self.scheduler_config(model_max_len),
                            device=DeviceConfig(self.device, self.cuda_graphs))

    def cache_config(self) -> CacheConfig:
        return CacheConfig(
            block_size=self.block_size, num_kv_blocks=self.num_kv_blocks,
            kv_cache_bytes=self.kv_cache_bytes, enable_prefix_caching=self.enable_prefix_caching,
            swap_space=self.swap_space, preemption_mode=self.preemption_mode,
            swap_min_tokens=self.swap_min_tokens, kv_cache_mode=self.kv_cache_mode,
            kv_cache_min_bytes=self.kv_cache_min_bytes, kv_cache_max_bytes=self.kv_cache_max_bytes,
            kv_reserve_pages=self.kv_reserve_pages, kv_shrink_after_s=self.kv_shrink_after_s,
            kv_keep_peak_s=self.kv_keep_peak_s, host_kv_cache_bytes=self.host_kv_cache_bytes,
            layerwise_onload=self.layerwise_onload, layerwise_residency=self.layerwise_residency,
            stream_tpot_ms=self.stream_tpot_ms)

    def scheduler_config(self, model_max_len: int) -> SchedulerConfig:
        max_len = self.max_model_len or model_max_len
        if max_len > model_max_len:
            raise ValueError(
                f"max_model_len={max_len} exceeds the model's limit of {model_max_len} tokens")
        batched = self.max_num_batched_tokens
        if not self.enable_chunked_prefill:
            batched = max(batched, max_len)
        return SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=batched,
                               max_model_len=max_len,
                               enable_chunked_prefill=self.enable_chunked_prefill,
                               long_prefill_token_threshold=self.long_prefill_token_threshold,
                               policy=self.scheduling_policy, admission=self.admission,
                               slo_ttft_ms=self.slo_ttft_ms, slo_tpot_ms=self.slo_tpot_ms,
                               step_cost=self.slo_step_cost or DEFAULT_STEP_COST,
                               step_cost_online=self.slo_step_cost is None)


def _check_device(device: object) -> None:
    """`device="cuda"` without a usable GPU is refused here, before anything is loaded."""
    if device != "cuda":
        return  # anything else but "cpu" is DeviceConfig's ValueError
    import torch  # here, not at import: the config layer stays light

    if not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device "
                         f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")


def model_max_len(config: ModelConfig) -> int:
    """The longest sequence the model takes: its positions, or its sliding window if shorter."""
    limit = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    return min(limit, int(window)) if window else limit
