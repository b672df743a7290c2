"""Discrete-event simulation of several models sharing one device and one page budget.

Each model runs the real ``core`` Scheduler over a real KVCacheManager and BlockPool; its KV
memory is a :class:`SimKVStorage` whose grow callback asks the shared :class:`Arbiter` for pages.
The device runs one model's step at a time. Dispatch is round-robin over models that have work,
are awake and loaded, and are not blocked on memory (a blocked model is retried after any
request finishes or every ``sweep_s``). Idle models are skipped entirely, so their cost is only
the periodic idle-shrink sweep.

Policies:

* ``static``: every model is mapped ``(budget - all weights) / N`` pages at start; nothing moves
  (a fixed memory fraction per model, as vLLM or SGLang with ``gpu_memory_utilization``).
* ``elastic``: pages move on demand through the arbiter, which may only take other models'
  free and cached pages; no priorities, no preemption, no sleep.
* ``arbiter``: the full arbiter: priorities, preemption of lower-priority or idle models, fair
  share, and sleeping idle models; waking costs ``weights_bytes / host bandwidth``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from elasticserve.config import CacheConfig, MiB, SchedulerConfig
from elasticserve.core.arbiter import Arbiter, ArbiterPolicy
from elasticserve.sim.cost_model import CostModel
from elasticserve.sim.gpu_specs import DeviceSpec
from elasticserve.sim.kv_sim import SimKVStorage
from elasticserve.sim.runtime import ModelRuntime, ModelSpec, RequestRecord
from elasticserve.sim.workload import RequestSpec

Policy = Literal["static", "elastic", "arbiter"]
POLICIES: tuple[Policy, ...] = ("static", "elastic", "arbiter")


@dataclass(slots=True)
class SimConfig:
    """Device, memory and scheduler settings shared by every model of a run."""

    device: DeviceSpec
    num_gpus: int = 1  # memory budget = num_gpus x memory x mem_util; models use tp = num_gpus
    mem_util: float = 0.9  # as vLLM's gpu_memory_utilization: the rest is activations etc.
    page_size: int = 2 * MiB
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 32768
    swap_bytes: int = 16 << 30  # host swap space per model
    reserve_pages: int = 1
    shrink_after_s: float = 0.5
    idle_after_s: float = 2.0
    sweep_s: float = 0.1  # the engine's reclaimer-thread interval
    sample_every_s: float = 0.5  # KV-pages timeline resolution
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.1
    # stop as soon as more than this many requests are certain to miss the TTFT SLO
    max_ttft_violations: int | None = None
    stuck_after_s: float = 600.0  # no progress for this long (simulated) is a bug: raise
    enable_prefix_caching: bool = True

    @property
    def budget_bytes(self) -> int:
        return int(self.num_gpus * self.device.memory_bytes * self.mem_util)


@dataclass(slots=True)
class SimResult:
    policy: str
    records: list[RequestRecord]
    end_time: float
    timeline_t: list[float] = field(default_factory=list)
    timeline_pages: dict[str, list[int]] = field(default_factory=dict)
    arbiter_stats: dict[str, int] = field(default_factory=dict)
    model_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    stopped_early: bool = False
    page_size: int = 2 * MiB


def _arbiter_policy(policy: Policy) -> ArbiterPolicy:
    if policy == "static":
        return ArbiterPolicy(False, False, False, False, False)
    if policy == "elastic":
        return ArbiterPolicy(True, True, preempt=False, sleep_idle=False, fair_share=False)
    if policy == "arbiter":
        return ArbiterPolicy()
    raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")


class Simulator:
    """Builds the models of one run and drives them over simulated time."""

    def __init__(self, models: list[ModelSpec], config: SimConfig, policy: Policy) -> None:
        if len({m.name for m in models}) != len(models):
            raise ValueError("model names must be unique")
        self.config = config
        self.policy = policy
        self.now = 0.0
        self.arbiter = Arbiter(config.budget_bytes, config.page_size, _arbiter_policy(policy),
                               clock=lambda: self.now)
        static_pages = self._static_share(models) if policy == "static" else 0
        self.models = [self._build(spec, static_pages) for spec in models]
        self.by_name = {m.name: m for m in self.models}

    def _static_share(self, models: list[ModelSpec]) -> int:
        weights = sum(-(-m.shape.weights_bytes // self.config.page_size) for m in models)
        share = (self.arbiter.budget_pages - weights) // len(models)
        if share <= 0:
            raise ValueError(f"static policy: the weights of all models ({weights} pages) leave "
                             f"no KV room in {self.arbiter.budget_pages} pages")
        return share

    def _build(self, spec: ModelSpec, static_pages: int) -> ModelRuntime:
        cfg, arb = self.config, self.arbiter
        shape = spec.shape.with_tp(cfg.num_gpus)
        block_bytes = shape.kv_block_bytes(cfg.block_size)
        cost = CostModel(cfg.device, shape)
        static = self.policy == "static"
        if static:
            min_bytes = max_bytes = static_pages * cfg.page_size
            max_pages = min_pages = static_pages
        else:
            min_bytes, max_bytes = spec.min_kv_bytes, spec.max_kv_bytes
            max_pages = arb.budget_pages if max_bytes is None else max_bytes // cfg.page_size
            min_pages = min(max_pages, -(-min_bytes // cfg.page_size))
        storage = SimKVStorage(
            spec.name, arb, cost, block_bytes, elastic=not static, min_pages=min_pages,
            max_pages=max_pages, reserve_pages=cfg.reserve_pages,
            shrink_after_s=cfg.shrink_after_s, idle_after_s=cfg.idle_after_s,
            clock=lambda: self.now)
        cache = CacheConfig(block_size=cfg.block_size,
                            enable_prefix_caching=cfg.enable_prefix_caching,
                            kv_cache_mode="static" if static else "elastic")
        sched = SchedulerConfig(max_num_seqs=cfg.max_num_seqs,
                                max_num_batched_tokens=cfg.max_num_batched_tokens,
                                max_model_len=cfg.max_model_len)
        runtime = ModelRuntime(spec, storage, cost, sched, cache, cfg.swap_bytes // block_bytes)
        arb.register(spec.name, shape.weights_bytes, min_bytes, max_bytes, spec.priority,
                     reclaimer=storage)
        storage.start()
        return runtime
