"""Short requests behind long prompts: TTFT attainment of the FCFS and SLO policies, simulated.

A seeded workload (Poisson short chats, and bursts of long prompts) runs through the real
``Scheduler`` (its "fcfs" or "slo" policy and admission control), ``KVCacheManager`` and
``BlockPool``; only the model is replaced: a step takes ``StepCost.step_s(tokens, context)``
seconds (core/slo.py's linear model, the one the SLO policy predicts with, so the policy's
predictions are exact up to batching) and samples one token per finished prefill. Torch-free.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from elasticserve.config import CacheConfig, SchedulerConfig
from elasticserve.core.block_pool import BlockPool
from elasticserve.core.kv_cache_manager import KVCacheManager
from elasticserve.core.scheduler import Scheduler
from elasticserve.core.slo import StepCost
from elasticserve.errors import SLOUnattainableError
from elasticserve.request import SequenceGroup, SequenceStatus
from elasticserve.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class SloWorkload:
    """Poisson short requests plus a burst of long prompts every ``long_every_s``."""

    seed: int = 0
    duration_s: float = 60.0
    short_rate: float = 4.0  # short requests per second
    short_prompt: tuple[int, int] = (64, 256)  # uniform prompt length range
    short_ttft_ms: float = 1000.0
    long_every_s: float = 4.0
    long_burst: int = 4  # long prompts arriving together
    long_prompt: tuple[int, int] = (3000, 4000)
    long_ttft_ms: float = 8000.0
    output_len: int = 16

    def requests(self) -> list[tuple[float, str, int, float]]:
        """(arrival s, "short" | "long", prompt tokens, TTFT target ms), by arrival."""
        rng = random.Random(self.seed)
        out: list[tuple[float, str, int, float]] = []
        t = rng.expovariate(self.short_rate)
        while t < self.duration_s:
            out.append((t, "short", rng.randint(*self.short_prompt), self.short_ttft_ms))
            t += rng.expovariate(self.short_rate)
        t = self.long_every_s / 2
        while t < self.duration_s:
            for _ in range(self.long_burst):
                out.append((t, "long", rng.randint(*self.long_prompt), self.long_ttft_ms))
            t += self.long_every_s
        return sorted(out, key=lambda r: r[0])


@dataclass(slots=True)
class SloResult:
    """TTFT of every request by kind (None: refused by admission control)."""

    policy: str
    admission: str
    ttft_s: dict[str, list[float | None]] = field(default_factory=dict)
    targets_s: dict[str, float] = field(default_factory=dict)

    def attainment(self, kind: str) -> float:
        """Fraction of admitted requests of ``kind`` whose TTFT met the target."""
        done = [t for t in self.ttft_s.get(kind, []) if t is not None]
        return sum(t <= self.targets_s[kind] for t in done) / len(done) if done else 1.0

    def refused(self, kind: str) -> int:
        return sum(t is None for t in self.ttft_s.get(kind, []))

    def p99(self, kind: str) -> float:
        done = sorted(t for t in self.ttft_s.get(kind, []) if t is not None)
        return done[min(len(done) - 1, int(0.99 * len(done)))] if done else 0.0


def scheduler_config(policy: str, admission: str = "none") -> SchedulerConfig:
    """The engine's defaults (2048-token budget, no prefill chunk cap)."""
    return SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=8192,
                           policy=policy, admission=admission)


def simulate(workload: SloWorkload, policy: str, admission: str = "none",
             num_blocks: int = 8192) -> SloResult:
    """Run ``workload`` to completion under ``policy`` / ``admission``."""
    cfg = scheduler_config(policy, admission)
    cost = StepCost(*cfg.step_cost)
    kv = KVCacheManager(BlockPool(num_blocks), 16, 0)
    sched = Scheduler(cfg, CacheConfig(block_size=16), kv)
    now = 0.0
    sched.clock = lambda: now
    result = SloResult(policy, admission)
    pending = workload.requests()
    kinds: dict[str, tuple[str, int]] = {}
    for i, (_, kind, _, target_ms) in enumerate(pending):
        result.targets_s[kind] = target_ms / 1000
        result.ttft_s.setdefault(kind, [])
        kinds[str(i)] = (kind, len(result.ttft_s[kind]))
        result.ttft_s[kind].append(None)
    nxt = 0
    while nxt < len(pending) or sched.has_unfinished():
        while nxt < len(pending) and pending[nxt][0] <= now:
            _arrive(sched, nxt, pending[nxt], workload.output_len)
            nxt += 1
        out = sched.schedule()
        if not out.scheduled:
            if nxt >= len(pending):
                raise RuntimeError("simulation stalled with requests queued")
            now = pending[nxt][0]
            continue
        context = sum(item.start_pos for item in out.scheduled)
        now += cost.step_s(out.num_batched_tokens, context)
        sched.on_step_done(out)
        for item in out.scheduled:
            if not item.sample_seq_ids:
                continue
            seq = sched.seqs[item.seq_id]
            if len(seq.token_ids) == seq.prompt_len:
                kind, idx = kinds[item.request_id]
                result.ttft_s[kind][idx] = now - pending[int(item.request_id)][0]
            seq.token_ids.append(1)
            if seq.num_output_tokens >= workload.output_len:
                sched.finish_seq(seq, SequenceStatus.FINISHED_LENGTH)
        sched.pop_finished_groups()
    return result


def _arrive(sched: Scheduler, index: int, req: tuple[float, str, int, float],
            output_len: int) -> None:
    arrival, _, prompt, target_ms = req
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0,
                            slo_ttft_ms=target_ms)
    tokens = [1000 + index] + [7] * (prompt - 1)  # distinct first token: no prefix sharing
    group = SequenceGroup.create(str(index), None, tokens, params, arrival)
    try:
        sched.add(group)
    except SLOUnattainableError:
        pass  # refused: its TTFT stays None
