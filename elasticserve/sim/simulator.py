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
* ``tiered``: ``elastic`` plus a host KV tier (sim/host_tier_sim.py): preemption victims are
  offloaded to ``host_kv_bytes`` of host memory (the engine's tier, core policy), and pages
  beyond the device spill to ``layer_offload_bytes`` of host memory, streamed layer-wise. With
  both budgets 0 it is ``elastic`` exactly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from elasticserve.config import CacheConfig, MiB, SchedulerConfig
from elasticserve.core.arbiter import Arbiter, ArbiterError, ArbiterPolicy
from elasticserve.sim.cost_model import CostModel
from elasticserve.sim.gpu_specs import DeviceSpec
from elasticserve.sim.host_tier_sim import tier_parts
from elasticserve.sim.kv_sim import SimKVStorage
from elasticserve.sim.metrics import Slo
from elasticserve.sim.runtime import ModelRuntime, ModelSpec, RequestRecord
from elasticserve.workload.generators import RequestSpec

Policy = Literal["static", "elastic", "arbiter", "tiered"]
POLICIES: tuple[Policy, ...] = ("static", "elastic", "arbiter")
ALL_POLICIES: tuple[Policy, ...] = (*POLICIES, "tiered")


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
    long_prefill_token_threshold: int = 0  # per-sequence prefill chunk cap; 0: none
    swap_bytes: int = 16 << 30  # host swap space per model
    host_kv_bytes: int = 0  # "tiered": host KV tier per model, for offloaded groups
    layer_offload_bytes: int = 0  # "tiered": host memory per model for layer-wise spill
    reserve_pages: int = 1
    shrink_after_s: float = 0.5
    keep_peak_s: float = 5.0
    idle_after_s: float = 2.0
    sweep_s: float = 0.1  # the engine's reclaimer-thread interval
    sample_every_s: float = 0.5  # KV-pages timeline resolution
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.1
    ttft_slo_per_token_s: float = 0.0
    # stop as soon as more than this many requests are certain to miss the TTFT SLO
    max_ttft_violations: int | None = None
    stuck_after_s: float = 600.0  # no progress for this long (simulated) is a bug: raise
    enable_prefix_caching: bool = True

    @property
    def slo(self) -> Slo:
        return Slo(self.ttft_slo_s, self.tpot_slo_s, self.ttft_slo_per_token_s)

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
    if policy in ("elastic", "tiered"):
        return ArbiterPolicy(True, True, preempt=False, sleep_idle=False, fair_share=False)
    if policy == "arbiter":
        return ArbiterPolicy()
    raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(ALL_POLICIES)}")


class SimSetupError(ValueError):
    """The models, device and requests of a run do not fit together (a user error, not a bug)."""


class Simulator:
    """Builds the models of one run and drives them over simulated time."""

    def __init__(self, models: list[ModelSpec], config: SimConfig, policy: Policy) -> None:
        if len({m.name for m in models}) != len(models):
            raise SimSetupError("model names must be unique")
        self.config = config
        self.policy = policy
        self.now = 0.0
        self.arbiter = Arbiter(config.budget_bytes, config.page_size, _arbiter_policy(policy),
                               clock=lambda: self.now)
        for spec in models:
            if spec.shape.weights_bytes > self.arbiter.budget_pages * config.page_size:
                # it could never wake: the run would stall instead of failing
                raise SimSetupError(f"{spec.name}: weights ({spec.shape.weights_bytes / 2**30:.1f} "
                                    f"GiB) do not fit in the device budget "
                                    f"({config.budget_bytes / 2**30:.1f} GiB)")
        static_pages = self._static_share(models) if policy == "static" else 0
        self._rr = 0
        try:
            self.models = [self._build(spec, static_pages) for spec in models]
        except ArbiterError as e:  # e.g. no room for a model's weights on this device
            raise SimSetupError(f"{policy} policy: {e}") from e
        self.by_name = {m.name: m for m in self.models}
        self._drain_costs()  # mapping at start-up happens before serving, not during it

    def _static_share(self, models: list[ModelSpec]) -> int:
        weights = sum(-(-m.shape.weights_bytes // self.config.page_size) for m in models)
        share = (self.arbiter.budget_pages - weights) // len(models)
        if share <= 0:
            raise SimSetupError(f"static policy: the weights of all models ({weights} pages) "
                                f"leave no KV room in {self.arbiter.budget_pages} pages")
        return share

    def _build(self, spec: ModelSpec, static_pages: int) -> ModelRuntime:
        cfg, arb = self.config, self.arbiter
        shape = spec.shape.with_tp(cfg.num_gpus)
        block_bytes = shape.kv_block_bytes(cfg.block_size)
        cost = CostModel(cfg.device, shape)
        static = self.policy == "static"
        max_bytes: int | None
        if static:
            min_bytes = max_bytes = static_pages * cfg.page_size
            max_pages = min_pages = static_pages
        else:
            min_bytes, max_bytes = spec.min_kv_bytes, spec.max_kv_bytes
            max_pages = arb.budget_pages if max_bytes is None else max_bytes // cfg.page_size
            min_pages = min(max_pages, -(-min_bytes // cfg.page_size))
        spill, host_kv = tier_parts(arb, spec.name, cost, block_bytes, cfg.block_size,
                                    cfg.host_kv_bytes, cfg.layer_offload_bytes, self.policy)
        storage = SimKVStorage(
            spec.name, arb, cost, block_bytes, elastic=not static, min_pages=min_pages,
            max_pages=max_pages, reserve_pages=cfg.reserve_pages,
            shrink_after_s=cfg.shrink_after_s, keep_peak_s=cfg.keep_peak_s, idle_after_s=cfg.idle_after_s,
            clock=lambda: self.now, spill=spill)
        cache = CacheConfig(block_size=cfg.block_size,
                            enable_prefix_caching=cfg.enable_prefix_caching,
                            kv_cache_mode="static" if static else "elastic",
                            host_kv_cache_bytes=host_kv)
        sched = SchedulerConfig(max_num_seqs=cfg.max_num_seqs,
                                max_num_batched_tokens=cfg.max_num_batched_tokens,
                                max_model_len=cfg.max_model_len,
                                long_prefill_token_threshold=cfg.long_prefill_token_threshold)
        # the tier replaces the swap area, as in the engine (engine/kv_storage.py)
        runtime = ModelRuntime(spec, storage, cost, sched, cache,
                               (host_kv or cfg.swap_bytes) // block_bytes,
                               drain_costs=self._drain_costs)
        # with sleep, more models than fit at once are fine: the rest start asleep
        awake = self.policy != "arbiter" or arb.free_pages >= -(-shape.weights_bytes
                                                              // cfg.page_size)
        arb.register(spec.name, shape.weights_bytes, min_bytes, max_bytes, spec.priority,
                     reclaimer=storage, awake=awake)
        if awake:
            storage.start()
        return runtime

    # ---- the event loop -------------------------------------------------------------------
    def run(self, requests: Sequence[RequestSpec]) -> SimResult:
        """Simulate ``requests`` (sorted by arrival) to completion; returns every timing."""
        cfg = self.config
        unknown = {r.model for r in requests} - set(self.by_name)
        if unknown:
            raise SimSetupError(f"requests for unknown model(s): {', '.join(sorted(unknown))}")
        records = [RequestRecord(i, r.model, r.arrival, r.input_len, r.output_len)
                   for i, r in enumerate(requests)]
        result = SimResult(self.policy, records, 0.0, page_size=cfg.page_size,
                           timeline_pages={m.name: [] for m in self.models})
        watch = _SloWatch(cfg.slo, cfg.max_ttft_violations)
        i, n = 0, len(requests)
        next_sweep = next_sample = last_progress = 0.0
        while True:
            now = self.now
            i = self._admit(requests, records, i, watch)
            if now >= next_sweep:
                self._sweep()
                next_sweep = now + cfg.sweep_s
                if watch.exceeded(now):
                    result.stopped_early = True
                    break
            if now >= next_sample:
                self._sample(result)
                next_sample = now + cfg.sample_every_s
            m = self._pick(now)
            if m is not None:
                dt, finished = m.step(now)
                if dt > 0:
                    self.now = last_progress = now + dt
                if finished:  # memory came free: blocked models may fit now
                    for x in self.models:
                        x.blocked = False
            elif i >= n and not any(x.has_work for x in self.models):
                break
            else:
                self.now = self._next_time(now, requests[i].arrival if i < n else None, next_sweep)
                if self.now - last_progress > cfg.stuck_after_s:
                    raise RuntimeError(f"{self.policy}: no progress for {cfg.stuck_after_s} s at "
                                       f"t={self.now:.1f}: {self._describe()}")
        return self._finish(result)

    def _admit(self, requests: Sequence[RequestSpec], records: list[RequestRecord], i: int,
               watch: _SloWatch) -> int:
        """Hand every request that has arrived by now to its model; returns the next index."""
        now, n = self.now, len(requests)
        while i < n and requests[i].arrival <= now:
            req = requests[i]
            self.by_name[req.model].add(req, records[i])
            self.arbiter.note_request(req.model)  # popularity, for picking who sleeps
            watch.pending.append(records[i])
            i += 1
        return i

    def _pick(self, now: float) -> ModelRuntime | None:
        """Next model in round-robin order that can step now; wakes sleeping ones on the way."""
        models, k = self.models, len(self.models)
        for j in range(k):
            m = models[(self._rr + j) % k]
            if m.blocked or m.ready_at > now or not m.has_work:
                continue
            if not self.arbiter.is_awake(m.name):
                if self.arbiter.wake(m.name):
                    # weights come over the host link; other models keep the device meanwhile
                    m.ready_at = now + m.cost.load_weights_time()
                    m.storage.on_wake()
                else:
                    m.blocked = True
                continue
            self._rr = (self._rr + j + 1) % k
            return m
        return None

    def _next_time(self, now: float, next_arrival: float | None, next_sweep: float) -> float:
        times = [m.ready_at for m in self.models if m.has_work and m.ready_at > now]
        if next_arrival is not None:
            times.append(next_arrival)
        if any(m.has_work for m in self.models):
            times.append(next_sweep)  # blocked models retry after the next idle shrink
        return max(now, min(times)) if times else now + self.config.sweep_s

    def _sweep(self) -> None:
        """The engine's reclaimer thread: idle shrink with hysteresis; blocked models retry."""
        for m in self.models:
            if self.arbiter.is_awake(m.name):
                m.storage.reclaim_in_background(self.now)
            m.blocked = False

    def _sample(self, result: SimResult) -> None:
        result.timeline_t.append(self.now)
        for m in self.models:
            result.timeline_pages[m.name].append(m.storage.mapped_pages)

    def _drain_costs(self) -> float:
        return sum(m.storage.take_pending_cost() for m in self.models)

    def _describe(self) -> str:
        return "; ".join(f"{m.name}: awake={self.arbiter.is_awake(m.name)} "
                         f"waiting={len(m.scheduler.waiting)} running={len(m.scheduler.running)} "
                         f"swapped={len(m.scheduler.swapped)} pages={m.storage.mapped_pages}"
                         for m in self.models)

    def _finish(self, result: SimResult) -> SimResult:
        if result.stopped_early:
            reason = "simulation stopped early: TTFT SLO already missed"
            for m in self.models:
                m.abort_all(reason)
            for rec in result.records:  # including requests that never arrived
                if rec.finish is None and rec.error is None:
                    rec.error = reason
        self._sample(result)
        result.end_time = self.now
        result.arbiter_stats = dict(self.arbiter.stats)
        for m in self.models:
            m.storage.check_integrity()
            result.model_stats[m.name] = m.stats()
        self.arbiter.check_integrity()
        return result


@dataclass(slots=True)
class _SloWatch:
    """Counts requests certain to miss the TTFT SLO, to cut hopeless bisection probes short."""

    slo: Slo
    limit: int | None
    pending: deque[RequestRecord] = field(default_factory=deque)
    late: int = 0

    def exceeded(self, now: float) -> bool:
        if self.limit is None:
            return False
        pending, slo = self.pending, self.slo
        while pending and (pending[0].first_token is not None or pending[0].error is not None):
            self.late += not slo.meets_ttft(pending.popleft())
        # still waiting and already past the target: certain misses (the scan stops at the
        # first request still within the base target, as arrivals are in order)
        overdue = 0
        for rec in pending:
            if rec.arrival >= now - slo.ttft_s:
                break
            overdue += rec.first_token is None and now - rec.arrival > slo.ttft_target(rec)
        return self.late + overdue > self.limit


def simulate(models: list[ModelSpec], requests: Sequence[RequestSpec], config: SimConfig,
             policy: Policy) -> SimResult:
    """Build a fresh simulator for ``policy`` and run ``requests`` through it."""
    return Simulator(models, config, policy).run(requests)
