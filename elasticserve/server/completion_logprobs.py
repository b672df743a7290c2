"""Completion logprobs in OpenAI's legacy shape, with `echo` (the prompt's own tokens first,
as lm-eval's loglikelihood requests read them) and vLLM's `prompt_logprobs` field."""

from __future__ import annotations

from dataclasses import dataclass

from elasticserve.engine.protocol import TokenizerLike
from elasticserve.server.protocol_completion import CompletionLogprobs, PromptLogprob
from elasticserve.server.serving import ChoiceDelta, clamp_logprob, token_text, top_logprobs

# one prompt position's {token id: logprob}; None for the first (nothing predicts it)
PromptEntries = list[dict[int, float] | None]


@dataclass(slots=True)
class Echo:
    """A prompt to put in front of its choices' first delta."""

    text: str
    token_ids: list[int]
    logprobs: PromptEntries | None  # the engine's prompt_logprobs, when asked for


def echo_logprobs(tokenizer: TokenizerLike, echo: Echo, k: int) -> CompletionLogprobs:
    """The prompt tokens' part of `logprobs` (vLLM's: the first token's entries are null)."""
    out = CompletionLogprobs()
    entries = echo.logprobs or []
    offset = 0
    for pos, token_id in enumerate(echo.token_ids):
        token = token_text(tokenizer, token_id)
        entry = entries[pos] if pos < len(entries) else None
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(token)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(clamp_logprob(entry.get(token_id)))
        out.top_logprobs.append({token_text(tokenizer, t): lp for t, lp in top_logprobs(entry, k)})
    return out


def delta_logprobs(tokenizer: TokenizerLike, delta: ChoiceDelta, k: int,
                   offsets: dict[int, int]) -> CompletionLogprobs:
    """The generated tokens' part. Offsets count each token's own text, continued from
    `offsets[delta.index]` (updated): not the delta's text position, as a stream holds back
    text that may become a stop string while its tokens are sent at once."""
    out = CompletionLogprobs()
    offset = offsets.get(delta.index, 0)
    for token_id, entry in zip(delta.token_ids, delta.logprobs or [], strict=False):
        token = token_text(tokenizer, token_id)
        out.tokens.append(token)
        out.token_logprobs.append(clamp_logprob(entry.get(token_id)))
        out.top_logprobs.append({token_text(tokenizer, t): lp for t, lp in top_logprobs(entry, k)})
        out.text_offset.append(offset)
        offset += len(token)
    offsets[delta.index] = offset
    return out


def concat(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(text_offset=a.text_offset + b.text_offset,
                              token_logprobs=a.token_logprobs + b.token_logprobs,
                              tokens=a.tokens + b.tokens,
                              top_logprobs=a.top_logprobs + b.top_logprobs)


def vllm_prompt_logprobs(tokenizer: TokenizerLike, token_ids: list[int],
                         entries: PromptEntries, k: int
                         ) -> list[dict[int, PromptLogprob] | None]:
    """vLLM's `prompt_logprobs`: per position the k most likely tokens ranked 1..k, plus the
    prompt's own token (rank None when it is not among them: the engine does not rank it)."""
    out: list[dict[int, PromptLogprob] | None] = []
    for pos, token_id in enumerate(token_ids):
        entry = entries[pos] if pos < len(entries) else None
        if entry is None:
            out.append(None)
            continue
        ranked = top_logprobs(entry, k)
        cands = {t: PromptLogprob(logprob=lp, rank=r, decoded_token=token_text(tokenizer, t))
                 for r, (t, lp) in enumerate(ranked, start=1)}
        if token_id not in cands:
            cands[token_id] = PromptLogprob(logprob=clamp_logprob(entry.get(token_id)),
                                            decoded_token=token_text(tokenizer, token_id))
        out.append(cands)
    return out
