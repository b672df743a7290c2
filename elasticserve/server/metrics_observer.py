"""One model's token counters and latency histograms, fed by its engine client every step.

vLLM's semantics: TTFT and end-to-end latency count from the request's arrival at the server;
queue time ends at its first step, prefill time at its first token, decode time at its last;
inter-token latency is the gap between a request's successive steps that gave it tokens (one
observation per request per step, as vLLM v1 records it), so a long non-streamed request moves
the counters and ITL while it runs, not all at once when it ends.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from elasticserve.engine.protocol import RequestTiming
from elasticserve.outputs import RequestOutput, StepStats

if TYPE_CHECKING:  # metrics.py builds the observers; only its type is needed here
    from elasticserve.server.metrics import ServerMetrics


class ModelObserver:
    """The engine client's `OutputObserver` for one model; runs on that engine's step thread."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self.model = model
        m = metrics
        self.ttft = m.ttft.labels(model)
        self.itl = m.itl.labels(model)
        self.e2e, self.queue, self.prefill, self.decode, self.inference = (
            h.labels(model) for h in (m.e2e, m.queue, m.prefill, m.decode, m.inference))
        self.request_prompt = m.request_prompt.labels(model)
        self.request_generation = m.request_generation.labels(model)
        self.iteration = m.iteration.labels(model)
        self.prompt_tokens = m.prompt_tokens.labels(model)
        self.generation_tokens = m.generation_tokens.labels(model)
        self.prefix_queries = m.prefix_queries.labels(model)
        self.prefix_hits = m.prefix_hits.labels(model)
        self.success = m.success

    def on_step(self, stats: StepStats, timings: Mapping[str, RequestTiming]) -> None:
        if stats.num_batched_tokens:
            self.iteration.observe(stats.num_batched_tokens)
        if stats.num_prompt_tokens:
            self.prompt_tokens.inc(stats.num_prompt_tokens)
        if stats.prefix_cache_queries:
            self.prefix_queries.inc(stats.prefix_cache_queries)
            self.prefix_hits.inc(stats.prefix_cache_hits)
        generated = 0
        gaps: list[float] = []
        now = stats.finished_at
        for rid, new in stats.new_tokens.items():
            generated += new  # aborted requests' tokens were computed too: they count
            timing = timings.get(rid)
            if timing is None:
                continue
            if timing.scheduled is None:
                timing.scheduled = stats.scheduled_at
            if not new:
                continue
            if timing.first_token is None:
                timing.first_token = now
                self.ttft.observe(max(0.0, now - timing.arrival))
            elif timing.last_token is not None:
                gaps.append(max(0.0, now - timing.last_token))
            timing.last_token = now
            timing.num_tokens += new
        if generated:
            self.generation_tokens.inc(generated)
        if gaps:
            self.itl.observe_many(gaps)

    def on_output(self, output: RequestOutput, timing: RequestTiming, now: float) -> None:
        if not output.finished:
            return
        self.e2e.observe(max(0.0, now - timing.arrival))
        if output.error is not None or not output.outputs:
            return  # a failed request: its latency is known, it is no success
        reason = output.outputs[0].finish_reason
        if reason is not None:
            self.success.labels(self.model, str(reason)).inc()
        self.request_prompt.observe(len(output.prompt_token_ids))
        self.request_generation.observe(sum(len(c.token_ids) for c in output.outputs))
        if timing.scheduled is None:
            return  # an engine client that reports no steps: only the totals above
        last = timing.last_token if timing.last_token is not None else now
        self.queue.observe(max(0.0, timing.scheduled - timing.arrival))
        self.inference.observe(max(0.0, last - timing.scheduled))
        if timing.first_token is not None:
            self.prefill.observe(max(0.0, timing.first_token - timing.scheduled))
            self.decode.observe(max(0.0, last - timing.first_token))
