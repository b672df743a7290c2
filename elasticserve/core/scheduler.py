"""Continuous batching under a token budget: running groups first, then swapped, then waiting.

Torch-free: the engine and the simulator drive the same Scheduler. Preemption is all-or-nothing
per SequenceGroup, by swap (KV copied to host blocks) or by recompute (KV dropped; the tokens
are prefilled again, hitting the prefix cache where they can).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from elasticserve.config import CacheConfig, SchedulerConfig
from elasticserve.core.block_pool import NoFreeBlocksError
from elasticserve.core.kv_cache_manager import KVCacheManager
from elasticserve.outputs import ScheduledSeq, SchedulerOutput
from elasticserve.request import Sequence, SequenceGroup, SequenceStatus, next_seq_id

GrowFn = Callable[[int], bool]


@dataclass(slots=True)
class _Budget:
    tokens: int
    seqs: int


@dataclass(slots=True)
class SchedulerStats:
    steps: int = 0
    preemptions: int = 0
    swap_outs: int = 0
    swap_ins: int = 0
    recomputes: int = 0
    prefix_hit_tokens: int = 0
    blocked_on_memory: int = 0
    errors: list[str] = field(default_factory=list)


class Scheduler:
    """Decides, each step, which sequences run and with how many tokens."""

    def __init__(self, config: SchedulerConfig, cache: CacheConfig, kv: KVCacheManager,
                 grow: GrowFn | None = None) -> None:
        self.config = config
        self.cache = cache
        self.kv = kv
        self.grow = grow  # elastic memory: asked for n more blocks before anyone is preempted
        self.waiting: deque[SequenceGroup] = deque()
        self.running: deque[SequenceGroup] = deque()
        self.swapped: deque[SequenceGroup] = deque()
        self.seqs: dict[int, Sequence] = {}
        self.stats = SchedulerStats()
        self.memory_pressure = False  # set when a step lacked blocks; read by the resize policy
        self._has_blocks_problem = False
        self._finished_ids: list[int] = []

    # ---- requests -------------------------------------------------------------------------
    def add(self, group: SequenceGroup) -> None:
        for seq in group.seqs:
            self.seqs[seq.seq_id] = seq
        self.waiting.append(group)

    def abort(self, request_id: str) -> SequenceGroup | None:
        """Stop a request wherever it is and free every block it holds."""
        for queue in (self.waiting, self.running, self.swapped):
            for group in queue:
                if group.request_id == request_id:
                    queue.remove(group)
                    for seq in group.live_seqs():
                        self.finish_seq(seq, SequenceStatus.FINISHED_ABORTED)
                    return group
        return None

    def finish_seq(self, seq: Sequence, status: SequenceStatus) -> None:
        seq.status = status
        seq.finish_reason = status.value
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

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    # ---- one step -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_seq_ids=self._finished_ids)
        self._finished_ids = []
        self.memory_pressure = False
        budget = _Budget(self.config.max_num_batched_tokens, self.config.max_num_seqs)
        preempted = self._schedule_running(out, budget)
        if not preempted:
            self._schedule_swapped(out, budget)
        if not preempted and not self.swapped:
            self._schedule_waiting(out, budget)
        self.stats.steps += 1
        return out

    def on_step_done(self, out: SchedulerOutput) -> None:
        """The runner computed the scheduled tokens: advance and publish full blocks."""
        caching = self.kv.enable_prefix_caching
        bs = self.kv.block_size
        for item in out.scheduled:
            seq = self.seqs.get(item.seq_id)
            if seq is None:
                continue
            before = seq.num_computed_tokens
            seq.num_computed_tokens = after = before + len(item.token_ids)
            if caching and after // bs > before // bs:  # a block just became full
                self.kv.cache_blocks(seq.seq_id, seq.token_ids, after)

    def _schedule_running(self, out: SchedulerOutput, budget: _Budget) -> bool:
        preempted = False
        kept: deque[SequenceGroup] = deque()
        while self.running:
            group = self.running.popleft()
            while not self._try_schedule(group, out, budget):
                if not self._has_blocks_problem:
                    break  # out of token budget: stays running, runs next step
                if not self.running and not kept:
                    # alone and still short: every block is already ours, so waiting cannot help
                    self._fail(group, f"sequence outgrew the whole KV cache "
                                      f"({self.kv.pool.num_blocks} blocks)")
                    break
                victim = self.running.pop() if self.running else group
                self._preempt(victim, out)
                preempted = True
                if victim is group:
                    break
            else:
                kept.append(group)
                continue
            if group.seqs_with(SequenceStatus.RUNNING):
                kept.append(group)
        self.running = kept
        return preempted

    def _schedule_swapped(self, out: SchedulerOutput, budget: _Budget) -> None:
        while self.swapped:
            group = self.swapped[0]
            ids = [s.seq_id for s in group.seqs_with(SequenceStatus.SWAPPED)]
            if budget.seqs < len(ids) or budget.tokens < len(ids):
                return
            if not self.kv.can_swap_in(ids) and not self._grow_for_swap_in(ids):
                self.memory_pressure = True
                return
            out.blocks_to_swap_in.extend(self.kv.swap_in(ids))
            self.stats.swap_ins += 1
            for seq in group.seqs_with(SequenceStatus.SWAPPED):
                seq.status = SequenceStatus.RUNNING
            self.swapped.popleft()
            self.running.append(group)
            self._try_schedule(group, out, budget)

    def _schedule_waiting(self, out: SchedulerOutput, budget: _Budget) -> None:
        while self.waiting and budget.tokens > 0:
            group = self.waiting[0]
            seqs = group.seqs_with(SequenceStatus.WAITING)
            if len(seqs) > budget.seqs:
                return
            for seq in seqs:
                # prompt logprobs need logits at every prompt position: no prefix-cache lookup
                lookup = [] if group.params.prompt_logprobs is not None else seq.token_ids
                cached = self.kv.allocate_prompt(seq.seq_id, lookup)
                seq.num_computed_tokens = cached
                self.stats.prefix_hit_tokens += cached
                if seq.index == 0 and not group.finished_beams:
                    group.num_cached_prompt_tokens = cached
                seq.status = SequenceStatus.RUNNING
            if not self._try_schedule(group, out, budget):
                self._unadmit(group, seqs)
                return
            self.waiting.popleft()
            self.running.append(group)

    def _unadmit(self, group: SequenceGroup, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.kv.free(seq.seq_id)
            self.stats.prefix_hit_tokens -= seq.num_computed_tokens
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
        if self._has_blocks_problem:
            self.memory_pressure = True
            self.stats.blocked_on_memory += 1

    # ---- one group ------------------------------------------------------------------------
    def _try_schedule(self, group: SequenceGroup, out: SchedulerOutput, budget: _Budget) -> bool:
        """Reserve slots for every running sequence of the group, or for none of them."""
        self._has_blocks_problem = False
        seqs = group.seqs if len(group.seqs) == 1 else group.seqs_with(SequenceStatus.RUNNING)
        plan = self._plan_tokens(seqs, budget)
        if plan is None:
            return False
        if len(plan) == 1:
            # fast path: append_slots is all-or-nothing, so try first and grow only on failure
            seq, num_new = plan[0]
            try:
                copies = self.kv.append_slots(seq.seq_id, seq.num_computed_tokens, num_new)
            except NoFreeBlocksError:
                if not self._make_room(plan):
                    return False
                copies = self.kv.append_slots(seq.seq_id, seq.num_computed_tokens, num_new)
            self._emit(group, seq, num_new, copies, out, budget)
            return True
        if not self._make_room(plan):
            return False
        for seq, num_new in plan:
            copies = self.kv.append_slots(seq.seq_id, seq.num_computed_tokens, num_new)
            self._emit(group, seq, num_new, copies, out, budget)
        return True

    def _make_room(self, plan: list[tuple[Sequence, int]]) -> bool:
        needed = sum(self.kv.num_blocks_needed(s.seq_id, s.num_computed_tokens + n,
                                               s.num_computed_tokens) for s, n in plan)
        short = needed - self.kv.num_free_blocks
        if short <= 0 or (self.grow is not None and self.grow(short)):
            return True
        self._has_blocks_problem = True
        self.memory_pressure = True
        return False

    def _emit(self, group: SequenceGroup, seq: Sequence, num_new: int,
              copies: list[tuple[int, int]], out: SchedulerOutput, budget: _Budget) -> None:
        if copies:
            out.blocks_to_copy.extend(copies)
        out.scheduled.append(self._scheduled_seq(group, seq, num_new))
        budget.tokens -= num_new
        budget.seqs -= 1
        out.num_batched_tokens += num_new

    def _plan_tokens(self, seqs: list[Sequence], budget: _Budget) -> list[tuple[Sequence, int]] | None:
        if not seqs or len(seqs) > budget.seqs:
            return None
        if len(seqs) == 1 and self.config.enable_chunked_prefill:
            num_new = min(seqs[0].num_uncomputed, budget.tokens)
            cap = self.config.long_prefill_token_threshold
            if cap > 0:
                # the rest of the budget goes to the sequences behind a long prompt
                num_new = min(num_new, cap)
            return [(seqs[0], num_new)] if num_new > 0 else None
        # several sequences (n > 1, beams) advance together so beam steps stay aligned
        plan = [(s, s.num_uncomputed) for s in seqs]
        return plan if sum(n for _, n in plan) <= budget.tokens else None

    def _scheduled_seq(self, group: SequenceGroup, seq: Sequence, num_new: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        end = start + num_new
        sample_ids: list[int] = []
        if end == len(seq.token_ids):
            sample_ids = [seq.seq_id]
            if group.pending_children:
                sample_ids += [next_seq_id() for _ in range(group.pending_children)]
                group.pending_children = 0
        wants_prompt_lp = group.params.prompt_logprobs is not None and start < seq.prompt_len
        return ScheduledSeq(
            seq_id=seq.seq_id, request_id=group.request_id,
            token_ids=seq.token_ids[start:end], start_pos=start,
            block_table=self.kv.block_table(seq.seq_id), params=group.params,
            all_token_ids=seq.token_ids, prompt_len=seq.prompt_len,
            sample_seq_ids=sample_ids,
            num_candidates=2 * group.beam_width if group.is_beam_search and sample_ids else 0,
            prompt_logprobs=group.params.prompt_logprobs if wants_prompt_lp else None,
        )

    # ---- preemption -----------------------------------------------------------------------
    def preempt_to_fit(self, max_blocks: int) -> list[tuple[int, int]]:
        """Preempt running groups, latest first, until at most `max_blocks` blocks are live.

        For a resize outside a step: returns the swap-out copies the caller must apply now.
        """
        out = SchedulerOutput()
        while self.running and self.kv.pool.num_used > max_blocks:
            self._preempt(self.running.pop(), out)
        return out.blocks_to_swap_out

    def _preempt(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        seqs = group.seqs_with(SequenceStatus.RUNNING)
        ids = [s.seq_id for s in seqs]
        self.stats.preemptions += 1
        out.preempted_request_ids.append(group.request_id)
        if self._choose_swap(group, seqs) and self.kv.can_swap_out(ids):
            out.blocks_to_swap_out.extend(self.kv.swap_out(ids))
            for seq in seqs:
                seq.status = SequenceStatus.SWAPPED
            self.swapped.append(group)
            self.stats.swap_outs += 1
            return
        if len(seqs) > 1 and sum(len(s.token_ids) for s in seqs) > self.config.max_num_batched_tokens:
            self._fail(group, "cannot preempt: swap space too small and recompute exceeds "
                              "max_num_batched_tokens")
            return
        for seq in seqs:
            self.kv.free(seq.seq_id)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(group)
        self.stats.recomputes += 1

    def _fail(self, group: SequenceGroup, msg: str) -> None:
        group.error = msg
        self.stats.errors.append(f"{group.request_id}: {msg}")
        for seq in group.live_seqs():
            self.finish_seq(seq, SequenceStatus.FINISHED_ERROR)

    def _choose_swap(self, group: SequenceGroup, seqs: list[Sequence]) -> bool:
        mode = self.cache.preemption_mode
        if mode != "auto":
            return mode == "swap"
        longest = max(s.num_computed_tokens for s in seqs)
        return len(seqs) > 1 or longest >= self.cache.swap_min_tokens

    def _grow_for_swap_in(self, ids: list[int]) -> bool:
        if self.grow is None:
            return False
        host_blocks = {b for i in ids for b in self.kv.block_table(i)}
        short = len(host_blocks) + len(ids) - self.kv.num_free_blocks
        return self.grow(max(1, short)) and self.kv.can_swap_in(ids)
