"""Each engine step's numbers for metrics, as plain data (`outputs.StepStats`).

Built on the step thread after every step, so token counters and inter-token latencies move
while long requests run (not only when they finish), streamed or not. The work is O(scheduled
sequences) integer arithmetic: no tokenizer, no decoding.
"""

from __future__ import annotations

from elasticserve.core.scheduler import SchedulerStats
from elasticserve.outputs import SchedulerOutput, StepStats


class StepRecorder:
    """Turns a step's SchedulerOutput and the scheduler's running totals into a StepStats."""

    def __init__(self) -> None:
        self._pending: StepStats | None = None
        self._prefix_seen = (0, 0)  # the scheduler's (queries, hits) totals at the last step

    def record(self, out: SchedulerOutput, totals: SchedulerStats, began: float,
               now: float) -> None:
        new_tokens: dict[str, int] = {}
        prompt_tokens = 0
        for item in out.scheduled:
            rid = item.request_id
            # one token per sampled sequence (n > 1 forks sample several from one row)
            new_tokens[rid] = new_tokens.get(rid, 0) + len(item.sample_seq_ids)
            # a chunk that ends at the prompt's end and samples gives the request its first
            # token (a recomputed one re-prefills past its prompt: not counted again)
            if item.sample_seq_ids and item.start_pos + len(item.token_ids) == item.prompt_len:
                prompt_tokens += item.prompt_len
        queries, hits = totals.prefix_query_tokens, totals.prefix_hit_tokens
        seen_q, seen_h = self._prefix_seen
        self._pending = StepStats(began, now, out.num_batched_tokens, prompt_tokens,
                                  max(0, queries - seen_q), max(0, hits - seen_h), new_tokens)
        self._prefix_seen = (queries, hits)

    def pop(self) -> StepStats | None:
        """The last step's stats, once (None when no step ran since the last call)."""
        stats, self._pending = self._pending, None
        return stats
