"""Preemption for the Scheduler: choose a victim, swap it out or drop it for recompute, or
fail a group that can never run. A mixin so that scheduler.py stays one screenful of policy."""

from __future__ import annotations

from elasticserve.core.sched_policy import choose_swap, push_back, push_front
from elasticserve.core.sched_stream import Streaming
from elasticserve.outputs import FailedRequest, SchedulerOutput
from elasticserve.request import FinishReason, Sequence, SequenceGroup, SequenceStatus


class Preemption(Streaming):
    """The Scheduler's preemption half (its state lives in Scheduler.__init__)."""

    # the scheduler's other attributes are declared on Streaming
    _failed: list[FailedRequest]

    def finish_seq(self, seq: Sequence, status: SequenceStatus) -> None:
        raise NotImplementedError

    # ---- preemption -----------------------------------------------------------------------
    def preempt_to_fit(self, max_blocks: int) -> list[tuple[int, int]]:
        """Preempt running groups, lowest priority and latest first, until at most `max_blocks`
        blocks are live.

        For a resize outside a step: returns the swap-out copies the caller must apply now.
        """
        out = SchedulerOutput()
        while self.running and self.kv.pool.num_used > max_blocks:
            victim = self._pop_victim(None)
            if victim is None:
                break  # only streamed groups are left: they hold no device block
            self._preempt(victim, out)
            if self.is_streamed(victim):
                push_back(self.running, victim)
        return out.blocks_to_swap_out

    def _pop_victim(self, group: SequenceGroup | None) -> SequenceGroup:
        """Take the preemption victim off ``running`` (or return ``group``, the one being
        scheduled, which is off it already). FCFS: the tail, i.e. the lowest-priority, latest
        group, never more important than ``group`` (it came off the head). "slo": the least
        important group with the most slack. Streamed groups are never victims."""
        if self.cache.layerwise_residency:
            return self._pop_resident_victim(group)  # type: ignore[return-value]
        if self.slo is None or self.config.policy != "slo":
            return self.running.pop() if self.running else group  # type: ignore[return-value]
        candidates = list(self.running) + ([group] if group is not None else [])
        victim = self.slo.victim(candidates, self.clock(), self.running)
        if victim is not group:
            self.running.remove(victim)
        return victim

    def _preempt(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        if self.cache.layerwise_residency and self._stream(group, out):
            return  # it keeps running, its KV in the host tier (sched_stream.py)
        seqs = group.seqs_with(SequenceStatus.RUNNING)
        ids = [s.seq_id for s in seqs]
        self.stats.preemptions += 1
        out.preempted_request_ids.append(group.request_id)
        if choose_swap(self.cache, seqs) and self.kv.can_swap_out(ids):
            moved = self.kv.swap_out(ids)
            out.blocks_to_swap_out.extend(moved)
            self.stats.kv_offloaded_blocks += len(moved)
            for seq in seqs:
                seq.status = SequenceStatus.SWAPPED
            push_back(self.swapped, group)
            self.stats.swap_outs += 1
            return
        if len(seqs) > 1 and sum(len(s.token_ids) for s in seqs) > self.config.max_num_batched_tokens:
            self._fail(group, "cannot preempt: swap space too small and recompute exceeds "
                              "max_num_batched_tokens")
            return
        for seq in seqs:
            self.kv.free(seq.seq_id)
            seq.num_computed_tokens = seq.external_kv_tokens = 0
            seq.status = SequenceStatus.WAITING
        push_front(self.waiting, group)
        self.stats.recomputes += 1

    def _hold(self, group: SequenceGroup, out: SchedulerOutput) -> bool:
        """Preempt a group that outgrew a lowered ceiling but fits the reserved maximum."""
        seqs = group.seqs_with(SequenceStatus.RUNNING)
        need = sum(len(self.kv.block_table(s.seq_id)) for s in seqs) + 1
        if self.can_hold_later is None or not self.can_hold_later(need):
            return False
        self._preempt(group, out)
        return True

    def _fail(self, group: SequenceGroup, msg: str) -> None:
        """End a group that can never run. Every caller has already taken it off its queue
        (the victim popped, or the group being scheduled not kept), so this only finishes it."""
        group.error = msg
        self.stats.failed += 1
        self._failed.append(FailedRequest(group.request_id, FinishReason.ERROR, msg))
        for seq in group.live_seqs():
            self.finish_seq(seq, SequenceStatus.FINISHED_ERROR)

    def _grow_for_swap_in(self, ids: list[int]) -> bool:
        if self.grow is None:
            return False
        host_blocks = {b for i in ids for b in self.kv.block_table(i)}
        short = len(host_blocks) + len(ids) - self.kv.num_free_blocks
        return self.grow(max(1, short)) and self.kv.can_swap_in(ids)
