"""Beam search over paged sequences, scored like transformers' `generate(num_beams=k)`.

Each step every live beam returns its top 2k (token, logprob) candidates; the best 2k overall
are split into finished hypotheses (EOS or the length limit, scored by
`sum_logprob / generated_len ** length_penalty`) and the k best unfinished continuations. A beam
chosen twice is forked (its KV blocks are shared copy-on-write); a beam not chosen is freed.
The search ends with transformers' `early_stopping=False` heuristic: once k hypotheses are
finished and the best running beam cannot beat the worst of them at the current length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from elasticserve.outputs import SampleResult
from elasticserve.request import FinishReason, Sequence, SequenceGroup, SequenceStatus

ForkFn = Callable[[SequenceGroup, Sequence, int], Sequence]
FinishFn = Callable[[Sequence, SequenceStatus], None]


@dataclass(slots=True)
class _Candidate:
    total: float
    beam: Sequence
    token: int
    logprob: float


def beam_step(group: SequenceGroup, samples: dict[int, SampleResult], eos_ids: frozenset[int],
              fork: ForkFn, finish: FinishFn) -> bool:
    """Advance all live beams of `group` by one token. Returns True when the search is over."""
    params = group.params
    width = group.beam_width
    beams = [s for s in group.seqs if s.status is SequenceStatus.RUNNING]
    cands = sorted(
        (_Candidate(b.cumulative_logprob + lp, b, tok, lp)
         for b in beams for tok, lp in samples[b.seq_id].top_logprobs),
        key=lambda c: -c.total)[: 2 * width]
    gen_len = beams[0].num_output_tokens + 1
    at_limit = params.max_tokens is not None and gen_len >= params.max_tokens
    hits = [at_limit or (not params.ignore_eos and c.token in eos_ids) for c in cands]
    _add_finished(group, [c for i, c in enumerate(cands[:width]) if hits[i]], gen_len, eos_ids)
    running = [c for i, c in enumerate(cands) if not hits[i]][:width]
    _realize(group, beams, running, fork, finish)
    done = not running or _cannot_improve(group, running, gen_len)
    if done:
        for seq in group.seqs:
            if not seq.is_finished:
                finish(seq, SequenceStatus.FINISHED_ABORTED)
        _publish(group)
    return done


def _add_finished(group: SequenceGroup, finished: list[_Candidate], gen_len: int,
                  eos_ids: frozenset[int]) -> None:
    penalty = gen_len ** group.params.length_penalty
    for c in finished:
        hyp = c.beam.fork(-1, 0)
        hyp.token_ids.append(c.token)
        hyp.cumulative_logprob = c.total / penalty
        hyp.status = SequenceStatus.FINISHED_STOPPED
        hyp.finish_reason = FinishReason.STOP if c.token in eos_ids else FinishReason.LENGTH
        group.finished_beams.append(hyp)
    group.finished_beams.sort(key=lambda s: -s.cumulative_logprob)
    del group.finished_beams[group.beam_width:]


def _realize(group: SequenceGroup, beams: list[Sequence], running: list[_Candidate],
             fork: ForkFn, finish: FinishFn) -> None:
    """Turn the chosen continuations into sequences: reuse, fork or free each old beam."""
    taken: set[int] = set()
    plans: list[tuple[Sequence, _Candidate]] = []
    for c in running:
        if c.beam.seq_id in taken:
            # fork before the parent appends, so the child shares only the parent's past
            plans.append((fork(group, c.beam, len(group.seqs)), c))
        else:
            taken.add(c.beam.seq_id)
            plans.append((c.beam, c))
    for beam in beams:
        if beam.seq_id not in taken:
            finish(beam, SequenceStatus.FINISHED_ABORTED)
    for seq, c in plans:
        seq.token_ids.append(c.token)
        seq.cumulative_logprob = c.total


def _cannot_improve(group: SequenceGroup, running: list[_Candidate], gen_len: int) -> bool:
    finished = group.finished_beams
    if len(finished) < group.beam_width:
        return False
    best_running = running[0].total / (gen_len ** group.params.length_penalty)
    return best_running <= min(h.cumulative_logprob for h in finished)


def _publish(group: SequenceGroup) -> None:
    """The group's outputs become its best finished hypotheses."""
    for i, hyp in enumerate(group.finished_beams):
        hyp.index = i
    group.seqs = list(group.finished_beams)
