"""Requests as the scheduler sees them: a SequenceGroup of one or more Sequences.

A group is the unit of admission and preemption (all-or-nothing); its sequences are the unit of
KV allocation. `n` > 1 and beam search start with one sequence and fork children that share the
prompt's blocks copy-on-write. Torch-free.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from elasticserve.sampling_params import SamplingParams


class FinishReason(enum.StrEnum):
    """Why a sequence ended. The values are vLLM's and the OpenAI API's ``finish_reason``
    strings, so a member serializes (JSON, pydantic, f-strings) exactly as the string did."""

    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"  # the client (or a cut-short run) aborted it
    ERROR = "error"  # the scheduler gave up on it (see outputs.FailedRequest)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self.value in _FINISH_VALUES

    @property
    def finish_reason(self) -> FinishReason | None:
        """The reason a finished status reports; None while the sequence is live."""
        return FinishReason(self.value) if self.value in _FINISH_VALUES else None


_FINISH_VALUES = frozenset(r.value for r in FinishReason)


_seq_ids = itertools.count()


def next_seq_id() -> int:
    return next(_seq_ids)


@dataclass(slots=True)
class Sequence:
    """One token stream. `token_ids` is prompt + output; the KV holds `num_computed_tokens`."""

    seq_id: int
    prompt_len: int
    token_ids: list[int]
    index: int = 0  # position among the group's outputs (n children or beams)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    cumulative_logprob: float = 0.0
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    output_text: str = ""
    # leading tokens whose KV was computed elsewhere and arrives with the sequence (a
    # prefill/decode hand-off): admission allocates blocks for them instead of recomputing
    # them; a recompute preemption drops the KV and clears this
    external_kv_tokens: int = 0

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def fork(self, seq_id: int, index: int) -> Sequence:
        """A child with the same tokens and computed state (its KV blocks are shared)."""
        return Sequence(
            seq_id=seq_id,
            prompt_len=self.prompt_len,
            token_ids=list(self.token_ids),
            index=index,
            status=self.status,
            num_computed_tokens=self.num_computed_tokens,
            cumulative_logprob=self.cumulative_logprob,
            output_logprobs=list(self.output_logprobs),
            output_text=self.output_text,
        )


@dataclass(slots=True)
class SequenceGroup:
    """A request: its prompt, sampling parameters and live sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seqs: list[Sequence]
    priority: int = 0  # lower value = scheduled first (vLLM's convention); ties go FCFS
    # beam search keeps finished hypotheses here until the group ends
    finished_beams: list[Sequence] = field(default_factory=list)
    error: str | None = None
    first_token_time: float | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_cached_prompt_tokens: int = 0
    # n > 1 (not beam): the children still to fork when the prompt's first token is sampled
    pending_children: int = 0
    stream: bool = False  # the engine returns progress every step, not only at the end

    def add_prompt_logprobs(self, start: int, entries: list[dict[int, float]]) -> None:
        """Entries for prompt positions start + 1, ... (position 0 has none)."""
        if self.prompt_logprobs is None:
            self.prompt_logprobs = [None]
        if len(self.prompt_logprobs) != start + 1:
            # a recompute preemption feeds the prompt again from its start: overwrite, in a
            # new list (outputs already handed out may hold the old one)
            self.prompt_logprobs = self.prompt_logprobs[:start + 1]
        self.prompt_logprobs.extend(entries)

    @classmethod
    def create(
        cls,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        priority: int = 0,
    ) -> SequenceGroup:
        seq = Sequence(next_seq_id(), len(prompt_token_ids), list(prompt_token_ids))
        children = 0 if params.use_beam_search else params.actual_best_of - 1
        return cls(request_id, prompt, list(prompt_token_ids), params, arrival_time, [seq],
                   priority=priority, pending_children=children)

    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]

    def seqs_with(self, status: SequenceStatus) -> list[Sequence]:
        return [s for s in self.seqs if s.status is status]

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @property
    def is_beam_search(self) -> bool:
        return self.params.use_beam_search

    @property
    def beam_width(self) -> int:
        return self.params.actual_best_of
