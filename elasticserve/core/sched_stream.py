"""LayerKV residency for the Scheduler (`CacheConfig.layerwise_residency`): a preempted decode
group keeps decoding from the host tier ("streamed") instead of stopping. Torch-free.

A streamed group stays in `running` with its sequence RUNNING, while the KV manager holds its
table as host ids (`is_swapped`): that pair *is* the state, so no flag can drift from it. Each
step it decodes one token whose slot lies in its last host block (a new host block when it
crosses a block boundary); the runner stages one layer of its blocks at a time onto the device
(worker/layer_stream.py). Only single-sequence groups in their decode phase are streamed; n > 1
and beam groups, and groups mid-prefill, are preempted as before (swap or recompute).

Admission (LayerKV's point): when the head waiting prompt's first chunk does not fit, the
latest resident decodes are streamed before the step until it does (`_stream_for_waiting`), so
a burst's prompts are all prefilled early while older decodes continue from host. No TPOT guard
yet: every streamed decode pays one stage copy per layer per step.
Policy when device blocks are free again: streamed groups come back (a full swap-in, then they
decode resident) in running order, but only with the room left after reserving the head
waiting group's prompt blocks; so waiting groups are admitted while groups are streamed (the
TTFT win: a new prompt takes the device pages, the old decodes keep going from host), and a
streamed group returns as soon as nobody is waiting for the room. A streamed group whose next
token needs a host block the tier cannot give stops (it moves to `swapped`, as a swap does).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from elasticserve.config import CacheConfig, SchedulerConfig
from elasticserve.core.kv_cache_manager import KVCacheManager
from elasticserve.core.sched_policy import Budget, Fit, SchedulerStats, push_back, scheduled_seq
from elasticserve.core.slo import SloPolicy
from elasticserve.outputs import SchedulerOutput
from elasticserve.request import SequenceGroup, SequenceStatus


class Streaming:
    """The Scheduler's streamed-residency half (its state lives in Scheduler.__init__)."""

    config: SchedulerConfig
    cache: CacheConfig
    kv: KVCacheManager
    grow: Callable[[int], bool] | None
    waiting: deque[SequenceGroup]
    running: deque[SequenceGroup]
    swapped: deque[SequenceGroup]
    stats: SchedulerStats
    slo: SloPolicy | None
    clock: Callable[[], float]

    def _try_schedule(self, group: SequenceGroup, out: SchedulerOutput, budget: Budget) -> Fit:
        raise NotImplementedError

    def is_streamed(self, group: SequenceGroup) -> bool:
        """Whether a running group decodes from the host tier."""
        if not self.cache.layerwise_residency or len(group.seqs) != 1:
            return False
        seq = group.seqs[0]
        return (seq.status is SequenceStatus.RUNNING and self.kv.has_seq(seq.seq_id)
                and self.kv.is_swapped(seq.seq_id))

    def num_streamed(self) -> int:
        """Running groups decoding from the host tier now."""
        return sum(1 for g in self.running if self.is_streamed(g)) if (
            self.cache.layerwise_residency) else 0

    def _stream(self, group: SequenceGroup, out: SchedulerOutput) -> bool:
        """Offload a decoding victim's KV to the tier and keep it running from there; False
        (nothing done) when it is not a single decoding sequence or the tier lacks room."""
        seq = group.seqs[0]
        if (len(group.seqs) != 1 or group.is_beam_search or seq.status is not SequenceStatus.RUNNING
                or seq.num_uncomputed != 1 or not self.kv.can_swap_out([seq.seq_id])):
            return False
        moved = self.kv.swap_out([seq.seq_id])
        out.blocks_to_swap_out.extend(moved)
        self.stats.kv_offloaded_blocks += len(moved)
        self.stats.swap_outs += 1
        self.stats.streamed_offloads += 1
        return True

    def _stream_for_waiting(self, out: SchedulerOutput) -> None:
        """Before the step (LayerKV's admission): when the head waiting prompt's first chunk
        does not fit the free device blocks (after growing), stream the latest resident decodes
        (never one more important than it) until it does; none if they cannot free enough."""
        if not self.waiting or self.swapped:
            return
        head = self.waiting[0]
        tokens = min(len(head.seqs[0].token_ids), self.config.max_num_batched_tokens)
        short = -(-tokens // self.kv.block_size) * len(head.seqs) - self.kv.num_free_blocks
        if short <= 0 or (self.grow is not None and self.grow(short)):
            return
        victims: list[SequenceGroup] = []
        for group in reversed(self.running):
            if short <= 0:
                break
            seq = group.seqs[0]
            if (group.priority <= head.priority and len(group.seqs) == 1 and not self.is_streamed(group)
                    and seq.num_uncomputed == 1 and not group.is_beam_search):
                victims.append(group)
                short -= len(self.kv.block_table(seq.seq_id))
        if short <= 0:
            for group in victims:
                self._stream(group, out)

    def _pop_resident_victim(self, group: SequenceGroup | None) -> SequenceGroup | None:
        """`_pop_victim` among resident groups only (a streamed one holds no device block):
        the latest (FCFS) or the slo policy's choice; `group` if none is left."""
        resident = [g for g in self.running if not self.is_streamed(g)]
        if self.slo is None or self.config.policy != "slo":
            victim = resident[-1] if resident else group
        else:
            candidates = resident + ([group] if group is not None else [])
            victim = self.slo.victim(candidates, self.clock(), self.running) if candidates else None
        if victim is not None and victim is not group:
            self.running.remove(victim)
        return victim

    def _schedule_streamed(self, out: SchedulerOutput, budget: Budget, preempted: bool) -> None:
        """After the resident groups: each streamed group comes back if the room allows (see
        the module doc), else decodes one token from the host tier."""
        back = not preempted  # FCFS: once one cannot come back, later ones do not try
        for group in list(self.running):
            if not self.is_streamed(group):
                continue
            if back and self._come_back(group, out, budget):
                continue
            back = False
            self._host_decode(group, out, budget)

    def _come_back(self, group: SequenceGroup, out: SchedulerOutput, budget: Budget) -> bool:
        ids = [group.seqs[0].seq_id]
        # its blocks, one for the next token, and the head waiting prompt's blocks
        need = self.kv.num_blocks_needed_for_swap_in(ids) + 1
        if self.waiting:
            need += -(-len(self.waiting[0].seqs[0].token_ids) // self.kv.block_size)
        short = need - self.kv.num_free_blocks
        if short > 0 and (self.grow is None or not self.grow(short)):
            return False
        moved = self.kv.swap_in(ids)
        out.blocks_to_swap_in.extend(moved)
        self.stats.kv_onloaded_blocks += len(moved)
        self.stats.swap_ins += 1
        self._try_schedule(group, out, budget)  # a block is free: scheduled or out of budget
        return True

    def _host_decode(self, group: SequenceGroup, out: SchedulerOutput, budget: Budget) -> None:
        seq = group.seqs[0]
        if budget.seqs < 1 or budget.tokens < 1:
            return  # runs next step
        if not self.kv.append_host_slots(seq.seq_id, seq.num_computed_tokens + 1):
            seq.status = SequenceStatus.SWAPPED  # the tier is full: it stops, as a swap does
            self.running.remove(group)
            push_back(self.swapped, group)
            self.stats.preemptions += 1
            return
        item = scheduled_seq(group, seq, 1, self.kv.block_table(seq.seq_id))
        item.on_host = True
        out.scheduled.append(item)
        budget.tokens -= 1
        budget.seqs -= 1
        out.num_batched_tokens += 1
        self.stats.kv_streamed_steps += 1
