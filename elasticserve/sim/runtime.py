"""One simulated model: the real core Scheduler, KVCacheManager and BlockPool, a simulated KV
storage, and a fake runner that appends a token to every sampled sequence.

Nothing here decides what runs: ``Scheduler.schedule`` does, exactly as in the engine. The
runtime only prices each step with the cost model and records request timings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from elasticserve.config import CacheConfig, SchedulerConfig
from elasticserve.core.block_pool import BlockPool
from elasticserve.core.kv_cache_manager import KVCacheManager
from elasticserve.core.scheduler import Scheduler
from elasticserve.outputs import ScheduledSeq
from elasticserve.request import Sequence, SequenceGroup, SequenceStatus
from elasticserve.sampling_params import SamplingParams
from elasticserve.sim.cost_model import CostModel
from elasticserve.sim.kv_sim import SimKVStorage
from elasticserve.sim.model_shapes import ModelShape
from elasticserve.workload.generators import RequestSpec

_FILLER = [7] * 4096  # prompt body; the first token is unique so no two prompts share a block


@dataclass(slots=True)
class ModelSpec:
    """A model to serve: its shape, priority and KV limits (None: up to the whole budget)."""

    name: str
    shape: ModelShape
    priority: int = 0
    min_kv_bytes: int = 0
    max_kv_bytes: int | None = None


@dataclass(slots=True)
class RequestRecord:
    """Timings of one simulated request (seconds of simulated time)."""

    index: int
    model: str
    arrival: float
    input_len: int
    output_len: int
    first_token: float | None = None
    finish: float | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e(self) -> float | None:
        return None if self.finish is None else self.finish - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.finish is None or self.first_token is None or self.output_len <= 1:
            return None
        return (self.finish - self.first_token) / (self.output_len - 1)


def _prompt(uid: int, n: int) -> list[int]:
    head = [100_000 + uid]
    while len(head) < n:
        head += _FILLER[: n - len(head)]
    return head


class ModelRuntime:
    """Scheduler + KV manager + block pool + simulated storage of one model."""

    def __init__(self, spec: ModelSpec, storage: SimKVStorage, cost: CostModel,
                 sched_cfg: SchedulerConfig, cache_cfg: CacheConfig, swap_blocks: int,
                 drain_costs: Callable[[], float] | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self.storage = storage
        self.cost = cost
        self.block_bytes = storage.block_bytes
        # reclaim work this step caused anywhere (mapping, compaction, victims' swap-outs)
        self._drain_costs = drain_costs or storage.take_pending_cost
        pool = BlockPool(0, enable_caching=cache_cfg.enable_prefix_caching)
        kv = KVCacheManager(pool, cache_cfg.block_size, swap_blocks,
                            enable_prefix_caching=cache_cfg.enable_prefix_caching)
        grow = storage.grow if storage.elastic else None
        self.scheduler = Scheduler(sched_cfg, cache_cfg, kv, grow=grow)
        storage.attach(self.scheduler)
        self.records: dict[str, RequestRecord] = {}
        self.groups: dict[str, SequenceGroup] = {}
        self.ready_at = 0.0  # weights loading after a wake
        self.blocked = False  # last step scheduled nothing; retry once memory moved
        self.steps = 0
        self.busy_s = 0.0
        # P/D: set on a prefill instance; gets each sequence whose first token was just sampled
        # (and has more to generate) before it leaves this instance (see sim/pd.py)
        self.hand_off: Callable[[Sequence, RequestRecord, float], None] | None = None

    def add(self, req: RequestSpec, rec: RequestRecord, kv_tokens: int = 0) -> None:
        """Queue a request; ``kv_tokens`` > 0: its prompt KV was computed elsewhere and its
        first token sampled there (a P/D hand-off), so it is admitted by its KV."""
        rid = str(rec.index)
        params = SamplingParams(max_tokens=max(1, req.output_len), ignore_eos=True,
                                temperature=0.0)
        group = SequenceGroup.create(rid, None, _prompt(rec.index, max(1, req.input_len)),
                                     params, req.arrival)
        if kv_tokens:
            seq = group.seqs[0]
            seq.token_ids.append(1)
            seq.external_kv_tokens = kv_tokens
        self.records[rid] = rec
        self.groups[rid] = group
        self.scheduler.add(group)
        self.blocked = False

    @property
    def has_work(self) -> bool:
        s = self.scheduler
        return bool(s.waiting or s.running or s.swapped)

    def step(self, now: float) -> tuple[float, bool]:
        """Run one scheduler step starting at ``now``: (seconds it takes, whether a request
        finished). (0, False) means nothing could be scheduled (blocked on memory)."""
        sched = self.scheduler
        out = sched.schedule()
        swaps = len(out.blocks_to_swap_in) + len(out.blocks_to_swap_out)
        if not out.scheduled and not swaps:
            self._collect_failed()
            self.blocked = True
            return 0.0, False
        sched.on_step_done(out)
        tokens = pairs = read = 0
        for item in out.scheduled:
            n = len(item.token_ids)
            s = item.start_pos
            tokens += n
            pairs += n * s + (n * (n + 1) >> 1)
            read += s + n
        cost = self.cost
        dt = cost.step_time(tokens, pairs, read, len(out.scheduled))
        # layer-wise spilled KV streams on a copy stream beside the compute
        dt = max(dt, self.storage.link_time(out.scheduled))
        if swaps:  # group offload/onload: applied before the forward pass, not overlapped
            dt += cost.swap_time(swaps, self.block_bytes)
        if out.blocks_to_copy:
            dt += cost.copy_time(len(out.blocks_to_copy), self.block_bytes)
        dt += self._drain_costs() + self.storage.wait_for_reclaimer(now)
        end = now + dt
        finished = self._sample(out.scheduled, end)
        self.steps += 1
        self.busy_s += dt
        self.storage.after_step(sched.memory_pressure)
        self._collect_failed()
        return dt, finished

    def stats(self) -> dict[str, float]:
        """Counters of the run: steps, preemptions, KV moved to host and back, page events."""
        st, sto = self.scheduler.stats, self.storage
        out: dict[str, float] = {
            "steps": self.steps, "busy_s": self.busy_s, "preemptions": st.preemptions,
            "swap_outs": st.swap_outs, "recomputes": st.recomputes,
            "kv_offloaded_blocks": st.kv_offloaded_blocks,
            "kv_onloaded_blocks": st.kv_onloaded_blocks,
            "grow_events": sto.grow_events, "shrink_events": sto.shrink_events,
            "compactions": sto.compactions}
        if sto.spill is not None:
            out.update(sto.spill.stats())
        return out

    def _sample(self, scheduled: list[ScheduledSeq], end: float) -> bool:
        """Fake runner: every sampled sequence gets one token; stop at the output length."""
        sched = self.scheduler
        records = self.records
        finished = False
        for item in scheduled:
            if not item.sample_seq_ids:
                continue
            rec = records[item.request_id]
            if rec.first_token is None:
                rec.first_token = end
            seq = sched.seqs[item.seq_id]
            seq.token_ids.append(1)
            if self.hand_off is not None and rec.output_len > 1:
                self.hand_off(seq, rec, end)  # holds the KV it needs before the seq ends here
                sched.finish_seq(seq, SequenceStatus.FINISHED_LENGTH)
                finished = True
            elif len(seq.token_ids) - seq.prompt_len >= rec.output_len:
                sched.finish_seq(seq, SequenceStatus.FINISHED_LENGTH)
                rec.finish = end
                finished = True
        if finished:
            for group in sched.pop_finished_groups():
                self.groups.pop(group.request_id, None)
        return finished

    def _collect_failed(self) -> None:
        """Requests the scheduler failed (e.g. longer than the whole cache) end with an error."""
        for failed in self.scheduler.pop_failed():
            rec = self.records.get(failed.request_id)
            if rec is not None and rec.error is None:
                rec.error = failed.message
                rec.finish = None
            self.groups.pop(failed.request_id, None)

    def abort_all(self, reason: str) -> None:
        """End every unfinished request (the run was cut short)."""
        for rid in list(self.groups):
            self.scheduler.abort(rid)
            rec = self.records[rid]
            if rec.finish is None and rec.error is None:
                rec.error = reason
        self.groups.clear()
        self.scheduler.pop_finished_groups()
