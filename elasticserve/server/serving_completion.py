"""POST /v1/completions: one engine request per prompt, `n` choices each."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from elasticserve.engine.protocol import EngineClient, TokenizerLike
from elasticserve.outputs import RequestOutput
from elasticserve.sampling_params import SamplingParams
from elasticserve.server.chat_tools import response_format_params
from elasticserve.server.errors import APIError, from_value_error
from elasticserve.server.metrics import arrival_time
from elasticserve.server.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    random_id,
)
from elasticserve.server.serving import (
    ChoiceDelta,
    DeltaTracker,
    Prepared,
    clamp_logprob,
    error_event,
    merge,
    prepare,
    sse,
    submit,
    token_text,
    top_logprobs,
    until_disconnect,
)

# a grammar comes from response_format
_RENAMES = {"structured_outputs": "response_format"}


async def create_completion(engine: EngineClient, req: CompletionRequest,
                            raw: Request) -> Response:
    params = _sampling_params(req)
    explicit = "max_tokens" if "max_tokens" in req.model_fields_set else None
    prepared = await prepare(engine, req.prompts(), params, _RENAMES, explicit)
    request_id = random_id("cmpl")
    started = submit(engine, prepared, params, request_id, stream=req.stream,
                     arrival_time=arrival_time(raw))
    outputs = merge(engine, started)
    if req.stream:
        body = _stream(engine, req, params, prepared, outputs, request_id)
        return StreamingResponse(body, media_type="text/event-stream")
    resp = await until_disconnect(raw, _collect(engine, req, params, prepared, outputs, request_id))
    return Response(resp.model_dump_json(), media_type="application/json")


def _sampling_params(req: CompletionRequest) -> SamplingParams:
    if req.echo:
        raise APIError(400, "echo is not supported", "echo")
    if req.suffix:
        raise APIError(400, "suffix is not supported", "suffix")
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", "logit_bias")
    structured = response_format_params(req.response_format)
    try:
        params = req.sampling_params()
        if structured is not None:
            params.structured_outputs = structured
            params = params.clone()  # validated again, with the grammar
    except ValueError as exc:
        raise from_value_error(exc, _RENAMES) from exc
    if req.stream and params.actual_best_of > params.n:
        # the best n are only known at the end, so nothing could be streamed
        raise APIError(400, "best_of must equal n when streaming", "best_of")
    return params


async def _collect(engine: EngineClient, req: CompletionRequest, params: SamplingParams,
                   prepared: list[Prepared], outputs: AsyncIterator[tuple[int, RequestOutput]],
                   request_id: str) -> CompletionResponse:
    finals: dict[int, RequestOutput] = {}
    async for i, out in outputs:
        if out.finished:
            finals[i] = out
    tracker = DeltaTracker(params.n, params.stop_strings)
    offsets: dict[int, int] = {}
    choices = [_choice(engine, req, delta, offsets)
               for i in range(len(prepared)) for delta in tracker.update(i, finals[i])]
    return CompletionResponse(id=request_id, model=req.model, choices=choices,
                              usage=_usage(prepared, finals.values()))


async def _stream(engine: EngineClient, req: CompletionRequest, params: SamplingParams,
                  prepared: list[Prepared], outputs: AsyncIterator[tuple[int, RequestOutput]],
                  request_id: str) -> AsyncIterator[str]:
    created = int(time.time())
    tracker = DeltaTracker(params.n, params.stop_strings)
    offsets: dict[int, int] = {}
    finals: list[RequestOutput] = []
    try:
        async for i, out in outputs:
            if out.finished:
                finals.append(out)
            choices = [_choice(engine, req, d, offsets) for d in tracker.update(i, out)]
            if choices:
                yield sse(CompletionChunk(id=request_id, created=created, model=req.model,
                                          choices=choices))
        if req.include_usage:
            yield sse(CompletionChunk(id=request_id, created=created, model=req.model, choices=[],
                                      usage=_usage(prepared, finals)))
    except Exception as exc:  # noqa: BLE001 - headers are sent: the error travels as an event
        yield error_event(exc)
    finally:
        await outputs.aclose()  # type: ignore[attr-defined]
    yield sse("[DONE]")


def _choice(engine: EngineClient, req: CompletionRequest, delta: ChoiceDelta,
            offsets: dict[int, int]) -> CompletionChoice:
    """`offsets`: per choice index, the text offset of its next token (kept across a stream's
    chunks, so streamed and whole responses report the same offsets)."""
    logprobs = None
    if req.logprobs is not None and delta.logprobs is not None:
        logprobs = _logprobs(engine.tokenizer, delta, req.logprobs, offsets)
    return CompletionChoice(index=delta.index, text=delta.text, logprobs=logprobs,
                            finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)


def _logprobs(tokenizer: TokenizerLike, delta: ChoiceDelta, k: int,
              offsets: dict[int, int]) -> CompletionLogprobs:
    out = CompletionLogprobs()
    # Offsets count each token's own text. Not the delta's text position: a stream holds
    # back text that may become a stop string or a multi-byte character, while its tokens
    # (and their logprobs) are sent at once.
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


def _usage(prepared: list[Prepared], finals: Any) -> UsageInfo:
    completion = sum(len(c.token_ids) for out in finals for c in out.outputs)
    return UsageInfo.of(sum(len(p.token_ids) for p in prepared), completion)
