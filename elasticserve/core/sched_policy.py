"""The scheduler's pieces that need none of its state: queue order by priority, how many tokens
a group gets, what the runner is told about a sequence, swap or recompute. Torch-free.

Priority follows vLLM: a *lower* ``SequenceGroup.priority`` value is served first, and groups
of equal priority are first come first served. Every queue (waiting, running, swapped) stays
sorted by priority, so the scheduler admits from the head and preempts from the tail. With the
default priority 0 everywhere each insertion is a plain ``append``/``appendleft``, which is the
FCFS order (and cost) of a scheduler without priorities.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from elasticserve.config import CacheConfig, SchedulerConfig
from elasticserve.outputs import ScheduledSeq
from elasticserve.request import Sequence, SequenceGroup, next_seq_id


class Fit(enum.Enum):
    """What happened when the scheduler tried to give a group its tokens this step."""

    SCHEDULED = "scheduled"
    NO_BUDGET = "no_budget"  # out of tokens or sequence slots: the group just waits a step
    NO_BLOCKS = "no_blocks"  # out of KV blocks even after growing: someone must be preempted


@dataclass(slots=True)
class SchedulerStats:
    steps: int = 0
    preemptions: int = 0
    swap_outs: int = 0
    swap_ins: int = 0
    recomputes: int = 0
    prefix_hit_tokens: int = 0
    prefix_query_tokens: int = 0  # tokens admissions looked up (vLLM's prefix cache queries)
    blocked_on_memory: int = 0
    failed: int = 0  # requests ended with FinishReason.ERROR
    kv_offloaded_blocks: int = 0  # device blocks copied to host (swap area or host tier)
    kv_onloaded_blocks: int = 0  # host blocks copied back to the device
    streamed_offloads: int = 0  # victims that kept decoding from the host tier (sched_stream)
    kv_streamed_steps: int = 0  # sequence-steps decoded with the KV in the host tier
    kv_streamed_prefill_tokens: int = 0  # prompt tokens prefilled with the KV in the host tier
    streamed_admissions: int = 0  # decodes streamed for a waiting prompt + prompts admitted streamed
    kv_stream_guarded: int = 0  # admission streamings the TPOT guard refused (stream_tpot_ms)


@dataclass(slots=True)
class Budget:
    """What is left of one step's token and sequence budget."""

    tokens: int
    seqs: int


def push_back(queue: deque[SequenceGroup], group: SequenceGroup) -> None:
    """Queue ``group`` behind every group of its priority (a newcomer, a swap-in, an admission)."""
    if not queue or queue[-1].priority <= group.priority:
        queue.append(group)  # the common case, O(1)
        return
    i = len(queue)
    for other in reversed(queue):
        if other.priority <= group.priority:
            break
        i -= 1
    queue.insert(i, group)


def push_front(queue: deque[SequenceGroup], group: SequenceGroup) -> None:
    """Queue ``group`` ahead of every group of its priority: a preempted group arrived before
    anyone of its priority still waiting, so it resumes first."""
    if not queue or queue[0].priority >= group.priority:
        queue.appendleft(group)
        return
    i = 0
    for other in queue:
        if other.priority >= group.priority:
            break
        i += 1
    queue.insert(i, group)


def dequeue(queues: tuple[deque[SequenceGroup], ...], request_id: str) -> SequenceGroup | None:
    """Take the group of `request_id` off whichever queue holds it."""
    for queue in queues:
        for group in queue:
            if group.request_id == request_id:
                queue.remove(group)
                return group
    return None


def plan_tokens(config: SchedulerConfig, seqs: list[Sequence],
                budget: Budget) -> list[tuple[Sequence, int]] | None:
    """(sequence, tokens to compute) for each sequence of a group, or None if none fit."""
    if not seqs or len(seqs) > budget.seqs:
        return None
    if len(seqs) == 1 and config.enable_chunked_prefill:
        num_new = min(seqs[0].num_uncomputed, budget.tokens)
        cap = config.long_prefill_token_threshold
        if cap > 0:
            # the rest of the budget goes to the sequences behind a long prompt
            num_new = min(num_new, cap)
        return [(seqs[0], num_new)] if num_new > 0 else None
    # several sequences (n > 1, beams) advance together so beam steps stay aligned
    plan = [(s, s.num_uncomputed) for s in seqs]
    return plan if sum(n for _, n in plan) <= budget.tokens else None


def scheduled_seq(group: SequenceGroup, seq: Sequence, num_new: int,
                  block_table: list[int]) -> ScheduledSeq:
    """The runner's view of ``num_new`` tokens of ``seq``; ids for the n > 1 children to fork
    are drawn when the prompt's last chunk is scheduled (they sample from its logits)."""
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
        block_table=block_table, params=group.params,
        all_token_ids=seq.token_ids, prompt_len=seq.prompt_len,
        sample_seq_ids=sample_ids,
        num_candidates=2 * group.beam_width if group.is_beam_search and sample_ids else 0,
        prompt_logprobs=group.params.prompt_logprobs if wants_prompt_lp else None,
    )


def choose_swap(cache: CacheConfig, seqs: list[Sequence]) -> bool:
    """Preempt by swap (True) or by recompute (False). With a host KV tier, "auto" always
    offloads (the caller recomputes only when the tier has no room): `swap_min_tokens` exists
    because the fixed swap area is small, and an offload keeps the work done."""
    mode = cache.preemption_mode
    if mode != "auto":
        return mode == "swap"
    if cache.host_kv_cache_bytes is not None:
        return True
    longest = max(s.num_computed_tokens for s in seqs)
    return len(seqs) > 1 or longest >= cache.swap_min_tokens
