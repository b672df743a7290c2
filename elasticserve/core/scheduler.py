"""Continuous batching under a token budget: running groups first, then swapped, then waiting.

Torch-free: the engine and the simulator drive the same Scheduler. Preemption is all-or-nothing
per SequenceGroup, by swap (KV copied to host blocks) or by recompute (KV dropped; the tokens
are prefilled again, hitting the prefix cache where they can). Queues are ordered by priority,
lower value first, FCFS within a priority (see core/sched_policy.py); a group that can never
fit ends with an error and leaves as a ``FailedRequest`` (``pop_failed``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from elasticserve.config import CacheConfig, SchedulerConfig
from elasticserve.core.block_pool import NoFreeBlocksError
from elasticserve.core.kv_cache_manager import KVCacheManager
from elasticserve.core.sched_policy import (
    Budget,
    Fit,
    SchedulerStats,
    dequeue,
    plan_tokens,
    push_back,
    scheduled_seq,
)
from elasticserve.core.sched_preempt import Preemption
from elasticserve.core.slo import SloPolicy, StepCostFit
from elasticserve.core.stream_guard import StreamGuard
from elasticserve.outputs import FailedRequest, SchedulerOutput
from elasticserve.request import Sequence, SequenceGroup, SequenceStatus

__all__ = ["GrowFn", "Scheduler", "SchedulerStats"]

GrowFn = Callable[[int], bool]
# Enum member lookups cost ~0.15 us each on Python 3.11; the per-group path reads globals instead
_SCHEDULED, _NO_BUDGET, _NO_BLOCKS = Fit.SCHEDULED, Fit.NO_BUDGET, Fit.NO_BLOCKS


class Scheduler(Preemption):
    """Decides, each step, which sequences run and with how many tokens."""

    def __init__(self, config: SchedulerConfig, cache: CacheConfig, kv: KVCacheManager,
                 grow: GrowFn | None = None) -> None:
        self.config = config
        self.cache = cache
        self.kv = kv
        self.grow = grow  # elastic memory: asked for n more blocks before anyone is preempted
        # elastic memory under a lowered ceiling: whether n blocks fit once it rises again (a
        # group that outgrew the current ceiling then waits, preempted, instead of failing)
        self.can_hold_later: Callable[[int], bool] | None = None
        self.waiting: deque[SequenceGroup] = deque()
        self.running: deque[SequenceGroup] = deque()
        self.swapped: deque[SequenceGroup] = deque()
        self.seqs: dict[int, Sequence] = {}
        self.stats = SchedulerStats()
        self.memory_pressure = False  # set when a step lacked blocks; read by the resize policy
        self._finished_ids: list[int] = []
        self._failed: list[FailedRequest] = []
        # the "slo" policy and admission control (core/slo.py); None: plain FCFS, at its cost.
        # `clock` is the time base of SequenceGroup.arrival_time (the simulator's own clock)
        slo = config.policy == "slo" or config.admission == "slo"
        self.slo = SloPolicy(config) if slo else None
        self.clock: Callable[[], float] = time.monotonic
        # the slo policy's step-time model, refitted to the steps this scheduler times
        self.cost_fit = StepCostFit(self.slo.cost) if (
            self.slo is not None and config.step_cost_online) else None
        self._step_began: float | None = None
        self.stream_guard = StreamGuard(cache.stream_tpot_ms)  # layerwise_residency's TPOT guard

    # ---- requests -------------------------------------------------------------------------
    def add(self, group: SequenceGroup, admission: bool = True) -> None:
        """Queue a request; with ``admission="slo"`` raise SLOUnattainableError instead if it
        is predicted to miss its TTFT target (nothing is queued then). ``admission=False``:
        a request already admitted elsewhere (a prefill/decode hand-off) is always queued."""
        if admission and self.slo is not None and self.config.admission == "slo":
            self.slo.check_admission(group, self.waiting, list(self.running), self.clock())
        for seq in group.seqs:
            self.seqs[seq.seq_id] = seq
        push_back(self.waiting, group)

    def abort(self, request_id: str, error: str | None = None) -> SequenceGroup | None:
        """Stop a request wherever it is and free every block it holds; with `error` it ends as
        ``_fail`` ends it (its own data broke its processing). None if it is in no queue."""
        if (group := dequeue((self.waiting, self.running, self.swapped), request_id)) is None:
            return None
        if error is not None:
            self._fail(group, error)
        for seq in group.live_seqs():
            self.finish_seq(seq, SequenceStatus.FINISHED_ABORTED)
        return group

    def detach(self, request_id: str) -> SequenceGroup | None:
        """Take a running request out of every queue but keep its sequences' KV blocks (a
        prefill worker handing it to a decode worker frees them once the hand-off is done).
        None if it is in no queue."""
        if (group := dequeue((self.waiting, self.running, self.swapped), request_id)) is None:
            return None
        for seq in group.seqs:
            self.seqs.pop(seq.seq_id, None)
        return group

    def free_detached(self, group: SequenceGroup) -> None:
        """Free the KV blocks a `detach`ed request still holds (its hand-off is over)."""
        for seq in group.seqs:
            if self.kv.has_seq(seq.seq_id):
                self.kv.free(seq.seq_id)
            self._finished_ids.append(seq.seq_id)  # the runner drops its per-sequence state

    def finish_seq(self, seq: Sequence, status: SequenceStatus) -> None:
        seq.status = status
        seq.finish_reason = status.finish_reason
        if self.kv.has_seq(seq.seq_id):
            self.kv.free(seq.seq_id)
        self.seqs.pop(seq.seq_id, None)
        self._finished_ids.append(seq.seq_id)

    def fork_seq(self, group: SequenceGroup, parent: Sequence, child_id: int, index: int) -> Sequence:
        """A child sharing the parent's KV blocks copy-on-write (n > 1, beam search)."""
        child = parent.fork(child_id, index)
        self.kv.fork(parent.seq_id, child_id)
        group.seqs.append(child)
        self.seqs[child_id] = child
        return child

    def pop_finished_groups(self) -> list[SequenceGroup]:
        done = [g for g in self.running if g.is_finished]
        if done:
            self.running = deque(g for g in self.running if not g.is_finished)
        return done

    def fail_all(self, msg: str) -> None:
        """End every request with an error (the model cannot run any, e.g. its weights failed
        to load); their blocks are freed and they come out of ``pop_failed``."""
        for queue in (self.waiting, self.running, self.swapped):
            while queue:
                self._fail(queue.popleft(), msg)

    def pop_failed(self) -> list[FailedRequest]:
        """Requests failed since the last call (in a step or in ``preempt_to_fit``). They are
        already out of every queue with their blocks freed; the caller only reports them."""
        failed, self._failed = self._failed, []
        return failed

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    # ---- one step -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_seq_ids=self._finished_ids)
        self._finished_ids = []
        self.memory_pressure = False
        budget = Budget(self.config.max_num_batched_tokens, self.config.max_num_seqs)
        if self.slo is not None and self.config.policy == "slo":
            budget.tokens = self.slo.step_token_cap(self.waiting, self.running, budget.tokens)
            if len(self.waiting) > 1:  # slack changes with time: the order is redone each step
                self.waiting = self.slo.order_waiting(self.waiting, self.clock(), self.running)
        reserve = 0
        if self.slo is not None and self.config.policy == "slo" and self.waiting:
            reserve = self.slo.waiting_reserve(self.waiting, self.running, self.clock(),
                                               budget.tokens)
        budget.tokens -= reserve
        if self.cache.layerwise_residency:
            self._stream_for_waiting(out)
        preempted = self._schedule_running(out, budget)
        budget.tokens += reserve
        if self.cache.layerwise_residency:
            self._schedule_streamed(out, budget, preempted)
        if not preempted:
            self._schedule_swapped(out, budget)
        if not preempted and not self.swapped:
            self._schedule_waiting(out, budget)
        self.stats.steps += 1
        self._step_began = self.clock()
        return out

    def on_step_done(self, out: SchedulerOutput) -> None:
        """The runner computed the scheduled tokens: advance and publish full blocks."""
        if self.cost_fit is not None and self.slo is not None and self._step_began is not None:
            context = sum(item.start_pos for item in out.scheduled)
            self.slo.cost = self.cost_fit.observe(out.num_batched_tokens, context,
                                                  self.clock() - self._step_began)
        caching = self.kv.enable_prefix_caching
        bs = self.kv.block_size
        for item in out.scheduled:
            seq = self.seqs.get(item.seq_id)
            if seq is None:
                continue
            before = seq.num_computed_tokens
            seq.num_computed_tokens = after = before + len(item.token_ids)
            if caching and after // bs > before // bs and not item.on_host:  # a block filled
                self.kv.cache_blocks(seq.seq_id, seq.token_ids, after)

    def _schedule_running(self, out: SchedulerOutput, budget: Budget) -> bool:
        preempted = False
        kept: deque[SequenceGroup] = deque()
        streaming = self.cache.layerwise_residency
        while self.running:
            group = self.running.popleft()
            if streaming and self.is_streamed(group):
                kept.append(group)  # decodes from host after the resident groups
                continue
            while (fit := self._try_schedule(group, out, budget)) is not _SCHEDULED:
                if fit is _NO_BUDGET:
                    break  # stays running, runs next step
                if not self.running and not kept:
                    # alone and still short: every block is already ours, so waiting helps only
                    # if a lowered ceiling may rise again
                    if (streaming and self._stream(group, out)) or self._hold(group, out):
                        preempted = True  # streamed: its next chunk runs from the host tier
                    else:
                        self._fail(group, f"sequence outgrew the whole KV cache "
                                          f"({self.kv.pool.num_blocks} blocks)")
                    break
                victim = self._pop_victim(group)
                self._preempt(victim, out)
                preempted = True
                if victim is group:
                    break
                if streaming and self.is_streamed(victim):
                    push_back(self.running, victim)  # streamed: it stays in the batch
            else:
                kept.append(group)
                continue
            if group.seqs_with(SequenceStatus.RUNNING):
                kept.append(group)
        self.running = kept
        return preempted

    def _schedule_swapped(self, out: SchedulerOutput, budget: Budget) -> None:
        while self.swapped:
            group = self.swapped[0]
            ids = [s.seq_id for s in group.seqs_with(SequenceStatus.SWAPPED)]
            if budget.seqs < len(ids) or budget.tokens < len(ids):
                return
            if not self.kv.can_swap_in(ids) and not self._grow_for_swap_in(ids):
                self.memory_pressure = True
                return
            moved = self.kv.swap_in(ids)
            out.blocks_to_swap_in.extend(moved)
            self.stats.kv_onloaded_blocks += len(moved)
            self.stats.swap_ins += 1
            for seq in group.seqs_with(SequenceStatus.SWAPPED):
                seq.status = SequenceStatus.RUNNING
            self.swapped.popleft()
            push_back(self.running, group)
            self._try_schedule(group, out, budget)

    def _schedule_waiting(self, out: SchedulerOutput, budget: Budget) -> None:
        while self.waiting and budget.tokens > 0:
            group = self.waiting[0]
            seqs = group.seqs_with(SequenceStatus.WAITING)
            if len(seqs) > budget.seqs:
                return
            for seq in seqs:
                # prompt logprobs need logits at every prompt position, and KV handed over
                # from a prefill instance is all there: no prefix-cache lookup for either
                skip = group.params.prompt_logprobs is not None or seq.external_kv_tokens
                cached = self.kv.allocate_prompt(seq.seq_id, [] if skip else seq.token_ids)
                # the blocks of handed-over KV are allocated with the first decode token's
                seq.num_computed_tokens = cached or seq.external_kv_tokens
                self.stats.prefix_hit_tokens += cached
                if seq.index == 0 and not group.finished_beams:
                    group.num_cached_prompt_tokens = cached
                seq.status = SequenceStatus.RUNNING
            fit = self._try_schedule(group, out, budget)
            if fit is not _SCHEDULED:
                self._unadmit(seqs, fit)
                if (fit is _NO_BLOCKS and self.cache.layerwise_residency
                        and self._admit_streamed(group, out, budget)):
                    continue  # its KV goes to the host tier (sched_stream.py)
                return
            self.waiting.popleft()
            push_back(self.running, group)
            # counted once admitted (an unadmitted lookup is undone and retried), as its hits
            if self.kv.enable_prefix_caching and group.params.prompt_logprobs is None:
                self.stats.prefix_query_tokens += sum(len(s.token_ids) for s in seqs
                                                       if not s.external_kv_tokens)

    def _unadmit(self, seqs: list[Sequence], fit: Fit) -> None:
        for seq in seqs:
            self.kv.free(seq.seq_id)
            self.stats.prefix_hit_tokens -= seq.num_computed_tokens - seq.external_kv_tokens
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
        if fit is _NO_BLOCKS:
            self.memory_pressure = True
            self.stats.blocked_on_memory += 1

    # ---- one group ------------------------------------------------------------------------
    def _try_schedule(self, group: SequenceGroup, out: SchedulerOutput, budget: Budget) -> Fit:
        """Reserve slots for every running sequence of the group, or for none of them."""
        seqs = group.seqs if len(group.seqs) == 1 else group.seqs_with(SequenceStatus.RUNNING)
        plan = plan_tokens(self.config, seqs, budget)
        if plan is None:
            return _NO_BUDGET
        if len(plan) == 1:
            # fast path: append_slots is all-or-nothing, so try first and grow only on failure
            seq, num_new = plan[0]
            try:
                copies = self.kv.append_slots(seq.seq_id, seq.num_computed_tokens, num_new)
            except NoFreeBlocksError:
                if not self._make_room(plan):
                    return _NO_BLOCKS
                copies = self.kv.append_slots(seq.seq_id, seq.num_computed_tokens, num_new)
            self._emit(group, seq, num_new, copies, out, budget)
            return _SCHEDULED
        if not self._make_room(plan):
            return _NO_BLOCKS
        for seq, num_new in plan:
            copies = self.kv.append_slots(seq.seq_id, seq.num_computed_tokens, num_new)
            self._emit(group, seq, num_new, copies, out, budget)
        return _SCHEDULED

    def _make_room(self, plan: list[tuple[Sequence, int]]) -> bool:
        """Whether the free blocks (after growing) cover the plan; False is memory pressure."""
        needed = sum(self.kv.num_blocks_needed(s.seq_id, s.num_computed_tokens + n,
                                               s.num_computed_tokens) for s, n in plan)
        short = needed - self.kv.num_free_blocks
        if short <= 0 or (self.grow is not None and self.grow(short)):
            return True
        self.memory_pressure = True
        return False

    def _emit(self, group: SequenceGroup, seq: Sequence, num_new: int,
              copies: list[tuple[int, int]], out: SchedulerOutput, budget: Budget) -> None:
        if copies:
            out.blocks_to_copy.extend(copies)
        out.scheduled.append(scheduled_seq(group, seq, num_new, self.kv.block_table(seq.seq_id)))
        budget.tokens -= num_new
        budget.seqs -= 1
        out.num_batched_tokens += num_new

