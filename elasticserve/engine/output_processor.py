"""Turns sampled tokens into sequence state: append, detokenize, stop checks, RequestOutputs."""

from __future__ import annotations

from elasticserve.models.tokenizer import Tokenizer
from elasticserve.outputs import CompletionOutput, RequestOutput, SampleResult
from elasticserve.request import Sequence, SequenceGroup, SequenceStatus


class OutputProcessor:
    """Stop conditions follow vLLM: EOS (unless ignore_eos), stop_token_ids, stop strings,
    max_tokens, max_model_len; min_tokens is enforced by the sampler banning those tokens."""

    def __init__(self, tokenizer: Tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.eos_token_ids = tokenizer.eos_token_ids

    def append(self, group: SequenceGroup, seq: Sequence, sample: SampleResult) -> None:
        seq.token_ids.append(sample.token_id)
        if sample.logprob == sample.logprob:  # NaN when the sampler was not asked for logprobs
            seq.cumulative_logprob += sample.logprob
        if group.params.logprobs is not None:
            entry = dict(sample.top_logprobs)
            entry[sample.token_id] = sample.logprob
            seq.output_logprobs.append(entry)

    def check_stop(self, group: SequenceGroup, seq: Sequence) -> SequenceStatus | None:
        """The finish status the newly appended token causes, or None to keep going."""
        params = group.params
        token = seq.token_ids[-1]
        n_out = seq.num_output_tokens
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                return SequenceStatus.FINISHED_STOPPED
            if params.stop_token_ids and token in params.stop_token_ids:
                seq.stop_reason = token
                return SequenceStatus.FINISHED_STOPPED
            if params.stop_strings and self._hit_stop_string(group, seq):
                return SequenceStatus.FINISHED_STOPPED
        if params.max_tokens is not None and n_out >= params.max_tokens:
            return SequenceStatus.FINISHED_LENGTH
        if len(seq.token_ids) >= self.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None

    def _hit_stop_string(self, group: SequenceGroup, seq: Sequence) -> bool:
        params = group.params
        text = self.decode(group, seq)
        # only the tail can hold a new match; older text was checked on earlier tokens
        window = max(len(s) for s in params.stop_strings) + 16
        start = max(0, len(text) - window)
        for stop in params.stop_strings:
            at = text.find(stop, start)
            if at >= 0:
                seq.stop_reason = stop
                seq.output_text = text[: at + len(stop)] if params.include_stop_str_in_output \
                    else text[:at]
                return True
        return False

    def decode(self, group: SequenceGroup, seq: Sequence) -> str:
        ids = seq.output_token_ids
        if ids and ids[-1] in self.eos_token_ids and not group.params.ignore_eos:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=group.params.skip_special_tokens)

    def refresh_text(self, group: SequenceGroup) -> None:
        """Bring every live sequence's text up to date (streaming reports it every step)."""
        for seq in group.seqs:
            if not seq.is_finished:
                seq.output_text = self.decode(group, seq)

    def finalize_text(self, group: SequenceGroup, seq: Sequence) -> None:
        if seq.stop_reason is None or not isinstance(seq.stop_reason, str):
            seq.output_text = self.decode(group, seq)

    def request_output(self, group: SequenceGroup, now: float) -> RequestOutput:
        seqs = self._ranked(group)
        outputs = [
            CompletionOutput(
                index=i, text=s.output_text, token_ids=list(s.output_token_ids),
                cumulative_logprob=s.cumulative_logprob if _tracks_logprob(group) else None,
                logprobs=list(s.output_logprobs) if group.params.logprobs is not None else None,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason)
            for i, s in enumerate(seqs)
        ]
        metrics = {"arrival_time": group.arrival_time, "finished_time": now}
        if group.first_token_time is not None:
            metrics["first_token_time"] = group.first_token_time
        return RequestOutput(
            request_id=group.request_id, prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids, prompt_logprobs=group.prompt_logprobs,
            outputs=outputs, finished=group.is_finished,
            num_cached_tokens=group.num_cached_prompt_tokens, error=group.error, metrics=metrics)

    def error_output(self, group: SequenceGroup, message: str, now: float) -> RequestOutput:
        """The final output of a request whose own output could not be built."""
        return RequestOutput(
            request_id=group.request_id, prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids, prompt_logprobs=None, outputs=[],
            finished=True, error=message,
            metrics={"arrival_time": group.arrival_time, "finished_time": now})

    def _ranked(self, group: SequenceGroup) -> list[Sequence]:
        params = group.params
        if group.is_beam_search:
            return group.seqs[: params.n]
        seqs = sorted(group.seqs, key=lambda s: s.index)
        if params.actual_best_of > params.n:
            # best_of: keep the n with the highest cumulative logprob
            seqs = sorted(seqs, key=lambda s: -s.cumulative_logprob)[: params.n]
        return seqs


def _tracks_logprob(group: SequenceGroup) -> bool:
    params = group.params
    return params.logprobs is not None or group.is_beam_search or params.actual_best_of > params.n
