"""POST /v1/completions: one engine request per prompt, `n` choices each."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from elasticserve.engine.protocol import EngineClient
from elasticserve.outputs import RequestOutput
from elasticserve.sampling_params import SamplingParams
from elasticserve.server.chat_tools import response_format_params
from elasticserve.server.completion_logprobs import (
    Echo,
    concat,
    delta_logprobs,
    echo_logprobs,
    vllm_prompt_logprobs,
)
from elasticserve.server.errors import APIError, from_value_error
from elasticserve.server.metrics import arrival_time
from elasticserve.server.protocol import CompletionRequest, UsageInfo, random_id
from elasticserve.server.protocol_completion import (
    CompletionChoice,
    CompletionChunk,
    CompletionResponse,
)
from elasticserve.server.serving import (
    ChoiceDelta,
    DeltaTracker,
    Prepared,
    error_event,
    hold_until_first,
    merge,
    prepare,
    sse,
    submit,
    until_disconnect,
)

# a grammar comes from response_format
_RENAMES = {"structured_outputs": "response_format"}


async def create_completion(engine: EngineClient, req: CompletionRequest,
                            raw: Request, hold_streams: bool = False) -> Response:
    """`hold_streams`: a stream's headers wait for its first output, so an admission refusal
    is a 503 (see `hold_until_first`)."""
    params = _sampling_params(req)
    explicit = "max_tokens" if "max_tokens" in req.model_fields_set else None
    prepared = await prepare(engine, req.prompts(), params, _RENAMES, explicit)
    request_id = random_id("cmpl")
    started = submit(engine, prepared, params, request_id, stream=req.stream,
                     arrival_time=arrival_time(raw))
    outputs = merge(engine, started)
    if req.stream:
        if hold_streams:
            outputs = await hold_until_first(raw, outputs)
        body = _stream(engine, req, params, prepared, outputs, request_id)
        return StreamingResponse(body, media_type="text/event-stream")
    resp = await until_disconnect(raw, _collect(engine, req, params, prepared, outputs, request_id))
    return Response(resp.model_dump_json(), media_type="application/json")


def _sampling_params(req: CompletionRequest) -> SamplingParams:
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens must be > 0 (0 only with echo: the prompt alone)",
                       "max_tokens")
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
    if req.stream and params.use_beam_search:
        # beams are reordered until the end: an early delta could be taken back
        raise APIError(400, "use_beam_search cannot be streamed", "use_beam_search")
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
    choices = [_choice(engine, req, delta, finals[i], prepared[i], offsets)
               for i in range(len(prepared)) for delta in tracker.update(i, finals[i])]
    return CompletionResponse(id=request_id, model=req.served_model, choices=choices,
                              usage=_usage(req, prepared, finals.values()))


async def _stream(engine: EngineClient, req: CompletionRequest, params: SamplingParams,
                  prepared: list[Prepared], outputs: AsyncIterator[tuple[int, RequestOutput]],
                  request_id: str) -> AsyncIterator[str]:
    created = int(time.time())
    tracker = DeltaTracker(params.n, params.stop_strings)
    offsets: dict[int, int] = {}
    finals: list[RequestOutput] = []
    echoed: set[int] = set()  # choices whose prompt went out (with their first delta)
    try:
        async for i, out in outputs:
            if out.finished:
                finals.append(out)
            choices = []
            for d in tracker.update(i, out):
                first = d.index not in echoed
                echoed.add(d.index)
                choices.append(_choice(engine, req, d, out, prepared[i] if first else None,
                                       offsets))
            if choices:
                yield sse(CompletionChunk(id=request_id, created=created, model=req.served_model,
                                          choices=choices))
        if req.include_usage:
            yield sse(CompletionChunk(id=request_id, created=created, model=req.served_model, choices=[],
                                      usage=_usage(req, prepared, finals)))
    except Exception as exc:  # noqa: BLE001 - headers are sent: the error travels as an event
        yield error_event(exc)
    finally:
        await outputs.aclose()  # type: ignore[attr-defined]
    yield sse("[DONE]")


def _choice(engine: EngineClient, req: CompletionRequest, delta: ChoiceDelta,
            out: RequestOutput, prompt: Prepared | None,
            offsets: dict[int, int]) -> CompletionChoice:
    """One choice's delta; `prompt` is given for a choice's first delta (echo and
    prompt_logprobs go out once). `offsets`: per choice index, the text offset of its next
    token (kept across a stream's chunks, so streamed and whole responses report the same)."""
    if req.echo and req.max_tokens == 0:
        # max_tokens=0: the engine generated one token only because it cannot generate none
        delta = ChoiceDelta(delta.index, "", [], [], 0, delta.finish_reason and "length", None)
    tokenizer = engine.tokenizer
    echo = None
    if req.echo and prompt is not None:
        text = prompt.text if prompt.text is not None else tokenizer.decode(prompt.token_ids)
        echo = Echo(text, prompt.token_ids, out.prompt_logprobs)
    logprobs = None
    if req.logprobs is not None and delta.logprobs is not None:
        head = echo_logprobs(tokenizer, echo, req.logprobs) if echo is not None else None
        if head is not None and head.tokens:
            offsets[delta.index] = head.text_offset[-1] + len(head.tokens[-1])
        logprobs = delta_logprobs(tokenizer, delta, req.logprobs, offsets)
        logprobs = concat(head, logprobs) if head is not None else logprobs
    prompt_lps = None
    if req.prompt_logprobs is not None and prompt is not None:
        prompt_lps = vllm_prompt_logprobs(tokenizer, prompt.token_ids,
                                          out.prompt_logprobs or [], req.prompt_logprobs)
    text = delta.text if echo is None else echo.text + delta.text
    return CompletionChoice(index=delta.index, text=text, logprobs=logprobs,
                            finish_reason=delta.finish_reason, stop_reason=delta.stop_reason,
                            prompt_logprobs=prompt_lps)


def _usage(req: CompletionRequest, prepared: list[Prepared], finals: Any) -> UsageInfo:
    # with echo and max_tokens=0 the one token the engine made is not returned, nor counted
    completion = 0 if req.echo and req.max_tokens == 0 else \
        sum(len(c.token_ids) for out in finals for c in out.outputs)
    return UsageInfo.of(sum(len(p.token_ids) for p in prepared), completion)
