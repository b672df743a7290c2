"""LayerKV residency for the Scheduler (`CacheConfig.layerwise_residency`): a preempted decode
group keeps decoding from the host tier ("streamed") instead of stopping. Torch-free.

A streamed group stays in `running` with its sequence RUNNING, while the KV manager holds its
table as host ids (`is_swapped`): that pair *is* the state, so no flag can drift from it. Each
step it decodes one token whose slot lies in its last host block (a new host block when it
crosses a block boundary); the runner stages one layer of its blocks at a time onto the device
(worker/layer_stream.py). Only single-sequence groups are streamed (a decode, or a prefill: see
below); n > 1 and beam groups are preempted as before (swap or recompute).

Admission (LayerKV's point): when the head waiting prompt's first chunk does not fit, the
latest resident decodes are streamed before the step until it does (`_stream_for_waiting`), so
a burst's prompts are all prefilled early while older decodes continue from host. Every streamed
decode pays one stage copy per layer per step, so with `stream_tpot_ms` a TPOT guard
(core/stream_guard.py) limits this admission streaming: a decode is streamed for a waiting
prompt (and a prompt admitted streamed, below) only while the predicted step time, with its
blocks streamed too, stays within the target; else the prompt waits (`kv_stream_guarded`
counts refusals). Preemption victims are not guarded: streamed or swapped/recomputed, they stop
TPOT either way. A prompt that the device can never hold is admitted streamed anyway.
Policy when device blocks are free again: streamed groups come back (a full swap-in, then they
decode resident) in running order, but only with the room left after reserving the head
waiting group's prompt blocks; so waiting groups are admitted while groups are streamed (the
TTFT win: a new prompt takes the device pages, the old decodes keep going from host), and a
streamed group returns as soon as nobody is waiting for the room. A streamed group whose next
token needs a host block the tier cannot give stops (it moves to `swapped`, as a swap does).

Streamed prefill (LayerKV's long prompt on a small device): a single-sequence prompt whose
next chunk cannot get device blocks even after the admission streaming above is streamed too:
at admission (the head waiting prompt, `_admit_streamed`: its table starts empty, in the host
tier) or mid-prefill (a resident group alone and still short: its blocks are swapped out,
`_stream`). Either way host blocks for the whole prompt plus its first decode token are taken
at once, so a streamed prefill never stops half-way for lack of tier blocks; a prompt that
neither the device nor the tier can ever hold fails with an error at once. Its chunks run on
the stage like a streamed decode (`_host_step`); the prefix cache is not used for it (no
lookup, no registration of its blocks). Once the prompt is done it is a streamed decode.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from elasticserve.config import CacheConfig, SchedulerConfig
from elasticserve.core.kv_cache_manager import KVCacheManager
from elasticserve.core.sched_policy import (
    Budget,
    Fit,
    SchedulerStats,
    plan_tokens,
    push_back,
    scheduled_seq,
)
from elasticserve.core.slo import SloPolicy
from elasticserve.core.stream_guard import StreamGuard
from elasticserve.outputs import SchedulerOutput
from elasticserve.request import Sequence, SequenceGroup, SequenceStatus


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
    can_hold_later: Callable[[int], bool] | None
    stream_guard: StreamGuard

    def _try_schedule(self, group: SequenceGroup, out: SchedulerOutput, budget: Budget) -> Fit:
        raise NotImplementedError

    def _fail(self, group: SequenceGroup, msg: str) -> None:
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

    def observe_stream_cost(self, step_s: float, copy_s: float, blocks: int) -> None:
        """After each step, from the engine: its wall seconds, the seconds of them spent copying
        streamed KV into the stage, and how many host blocks that was (the TPOT guard's input)."""
        self.stream_guard.observe(step_s, copy_s, blocks)

    def _streamed_blocks(self) -> int:
        """Host blocks of the groups streamed now (a streamed prefill's whole prompt)."""
        return sum(len(self.kv.block_table(g.seqs[0].seq_id)) for g in self.running
                   if self.is_streamed(g))

    def _guard_allows(self, blocks: int) -> bool:
        """The TPOT guard: streaming `blocks` more host blocks keeps the predicted step within
        `stream_tpot_ms` (always, without the option); a refusal is counted."""
        guard = self.stream_guard
        if not guard.enabled or guard.allows(self._streamed_blocks() + blocks):
            return True
        self.stats.kv_stream_guarded += 1
        return False

    def _stream(self, group: SequenceGroup, out: SchedulerOutput) -> bool:
        """Offload a single running sequence's KV to the tier and keep it running from there
        (a decode, or a prefill with host blocks for its whole prompt); False (nothing done)
        when it is not one running sequence or the tier lacks room."""
        seq = group.seqs[0]
        if (len(group.seqs) != 1 or group.is_beam_search or seq.status is not SequenceStatus.RUNNING
                or seq.external_kv_tokens or not self.kv.can_swap_out([seq.seq_id])):
            return False
        prefill = seq.num_uncomputed > 1
        blocks = len(self.kv.block_table(seq.seq_id))
        if prefill and self._prompt_blocks(seq) - blocks > self.kv.host_blocks.num_free:
            return False  # not the whole prompt: it could stop half-way (cached ones not counted)
        moved = self.kv.swap_out([seq.seq_id])
        out.blocks_to_swap_out.extend(moved)
        if prefill and not self.kv.append_host_slots(seq.seq_id, len(seq.token_ids) + 1):
            raise AssertionError("host blocks counted free were not")  # checked above
        self.stats.kv_offloaded_blocks += len(moved)
        self.stats.swap_outs += 1
        self.stats.streamed_offloads += 1
        return True

    def _device_never_holds(self, blocks: int) -> bool:
        """Whether `blocks` exceed the device now and under any ceiling it may rise to."""
        return blocks > self.kv.pool.num_blocks and (
            self.can_hold_later is None or not self.can_hold_later(blocks))

    def _prompt_blocks(self, seq: Sequence) -> int:
        """Blocks of a prompt (all tokens to prefill) and its first decode token."""
        return -(-(len(seq.token_ids) + 1) // self.kv.block_size)

    def _admit_streamed(self, group: SequenceGroup, out: SchedulerOutput, budget: Budget) -> bool:
        """The head waiting group's chunk found no device blocks: admit it streamed, its whole
        prompt in host blocks, and schedule its first chunk. True when it left `waiting`
        (streamed, or failed because neither the device nor the tier can ever hold it)."""
        seq = group.seqs[0]
        if len(group.seqs) != 1 or group.is_beam_search or seq.external_kv_tokens:
            return False
        need = self._prompt_blocks(seq)
        host = self.kv.host_blocks.num_blocks
        if need > host and self._device_never_holds(need):
            self.waiting.popleft()
            self._fail(group, f"prompt needs {need} KV blocks: more than the device "
                              f"({self.kv.pool.num_blocks} blocks) or the host KV tier "
                              f"({host} blocks) can hold")
            return True
        if not self._device_never_holds(need) and not self._guard_allows(need):
            return False  # it waits for device blocks rather than slow every decode down
        self.kv.allocate_prompt(seq.seq_id, [])  # no prefix lookup: it starts from scratch
        self.kv.swap_out([seq.seq_id])  # an empty table: it now lives in the host tier
        if not self.kv.append_host_slots(seq.seq_id, len(seq.token_ids) + 1):
            self.kv.free(seq.seq_id)
            return False  # the tier is busy now: it waits
        seq.status, seq.num_computed_tokens = SequenceStatus.RUNNING, 0
        self.waiting.popleft()
        push_back(self.running, group)
        self.stats.streamed_offloads += 1
        self.stats.streamed_admissions += 1
        self._host_step(group, out, budget)
        return True

    def _stream_for_waiting(self, out: SchedulerOutput) -> None:
        """Before the step (LayerKV's admission): when the head waiting prompt's first chunk
        does not fit the free device blocks (after growing), stream the latest resident decodes
        (never one more important than it) until it does; none if they cannot free enough or
        the TPOT guard refuses the blocks it would take."""
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
        if short > 0 or not self._guard_allows(
                sum(len(self.kv.block_table(g.seqs[0].seq_id)) for g in victims)):
            return
        for group in victims:
            if self._stream(group, out):
                self.stats.streamed_admissions += 1

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
            self._host_step(group, out, budget)

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

    def _host_step(self, group: SequenceGroup, out: SchedulerOutput, budget: Budget) -> None:
        """Schedule a streamed group's next tokens (a decode token or a prefill chunk)."""
        seq = group.seqs[0]
        plan = plan_tokens(self.config, [seq], budget)
        if plan is None:
            return  # runs next step
        num_new = plan[0][1]
        if not self.kv.append_host_slots(seq.seq_id, seq.num_computed_tokens + num_new):
            self.running.remove(group)
            need = len(self.kv.block_table(seq.seq_id)) + 1
            if self._device_never_holds(need):  # swapped, it would wait forever to come back
                self._fail(group, f"sequence needs {need} KV blocks: more than the device "
                                  f"({self.kv.pool.num_blocks} blocks) holds, and the host KV "
                                  f"tier is full")
                return
            seq.status = SequenceStatus.SWAPPED  # the tier is full: it stops, as a swap does
            push_back(self.swapped, group)
            self.stats.preemptions += 1
            return
        item = scheduled_seq(group, seq, num_new, self.kv.block_table(seq.seq_id))
        item.on_host = True
        out.scheduled.append(item)
        budget.tokens -= num_new
        budget.seqs -= 1
        out.num_batched_tokens += num_new
        if seq.num_computed_tokens < seq.prompt_len:
            self.stats.kv_streamed_prefill_tokens += num_new
        else:
            self.stats.kv_streamed_steps += 1
