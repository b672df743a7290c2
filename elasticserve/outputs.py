"""The only types that cross layers: scheduler -> runner -> engine -> user. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field

from elasticserve.request import FinishReason
from elasticserve.sampling_params import SamplingParams


@dataclass(slots=True)
class SampleResult:
    """What the sampler chose for one row of the logits batch."""

    token_id: int  # -1 for beam-search rows (the engine picks from top_logprobs)
    logprob: float  # raw-model logprob of token_id; NaN when not needed (see worker/sampler.py)
    top_logprobs: list[tuple[int, float]]  # params.logprobs many, or the beam candidates


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's slice of a step: feed `token_ids` at positions start_pos.. and maybe sample."""

    seq_id: int
    request_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    params: SamplingParams
    # the sequence's live token list (prompt + output) and where the prompt ends; referenced,
    # not copied, so a step costs O(1) per sequence whatever its length
    all_token_ids: list[int]
    prompt_len: int
    # sequences to sample from this row's logits: [] while a prompt chunk is mid-way, [seq_id]
    # normally, [parent, child...] when n > 1 forks at the end of the prompt
    sample_seq_ids: list[int] = field(default_factory=list)
    num_candidates: int = 0  # beam search: top candidates to return instead of a sample
    prompt_logprobs: int | None = None  # return logprobs of the prompt tokens in this chunk
    # the sequence's KV is in the host tier (`block_table` holds host ids): its one decode
    # token attends over layers staged one at a time (worker/layer_stream.py)
    on_host: bool = False


@dataclass(slots=True)
class SchedulerOutput:
    """What the runner must do this step, in order: swap out, swap in, copy, forward."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not (self.scheduled or self.blocks_to_swap_out or self.blocks_to_swap_in
                    or self.blocks_to_copy)


@dataclass(frozen=True, slots=True)
class FailedRequest:
    """A request the scheduler gave up on: already out of every queue, its blocks freed, its
    sequences finished with ``reason`` (``FinishReason.ERROR``). ``message`` says why."""

    request_id: str
    reason: FinishReason
    message: str


@dataclass(slots=True)
class ModelRunnerOutput:
    """Per sequence id: the sampled token (or beam candidates), and prompt logprobs."""

    samples: dict[int, SampleResult] = field(default_factory=dict)
    # seq_id -> for each prompt token of the chunk after the first: {token: logprob} (top-k + actual)
    prompt_logprobs: dict[int, list[dict[int, float]]] = field(default_factory=dict)
    # request_id -> why: requests whose own data made their sampling fail this step (the rest
    # of the batch is unaffected); the engine ends them with FinishReason.ERROR
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence of a request (vLLM's shape)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    finish_reason: FinishReason | None = None  # a str enum: compares and serializes as "stop"...
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """A request's result or progress, as `LLM.generate` returns it (vLLM's shape)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, float] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class StepStats:
    """What one engine step did, for metrics; plain data (a worker process would send one per
    step). Times are ``time.monotonic()`` on the engine's host."""

    scheduled_at: float  # the step's batch was scheduled (a request's first one ends its queue)
    finished_at: float  # its tokens were sampled and processed (the tokens' timestamp)
    num_batched_tokens: int  # tokens the forward pass computed: prefill chunks + decodes
    num_prompt_tokens: int  # prompt lengths of the requests whose first token came this step
    prefix_cache_queries: int  # tokens looked up in the prefix cache by admissions this step
    prefix_cache_hits: int  # of those, tokens found cached
    # every request scheduled this step -> tokens sampled for it (0 for a mid-prompt chunk;
    # one per sequence of an n > 1 or beam request)
    new_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def num_generation_tokens(self) -> int:
        return sum(self.new_tokens.values())
