"""POST /v1/chat/completions: the model's chat template, then one engine request."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from elasticserve.engine.protocol import EngineClient
from elasticserve.errors import check_unicode
from elasticserve.outputs import RequestOutput
from elasticserve.sampling_params import SamplingParams
from elasticserve.server.chat_tools import ToolPlan, ToolStream, finish_reason, plan
from elasticserve.server.errors import APIError, from_value_error
from elasticserve.server.limits import off_loop
from elasticserve.server.metrics import arrival_time
from elasticserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
    random_id,
)
from elasticserve.server.serving import (
    ChoiceDelta,
    DeltaTracker,
    clamp_logprob,
    error_event,
    hold_until_first,
    merge,
    prepare,
    render_chat,
    sse,
    submit,
    token_text,
    top_logprobs,
    until_disconnect,
)

# engine field names -> this endpoint's
_RENAMES = {"prompt": "messages", "prompt_token_ids": "messages", "logprobs": "top_logprobs"}


async def create_chat_completion(engine: EngineClient, req: ChatCompletionRequest,
                                 raw: Request, chat_template: str | None = None,
                                 hold_streams: bool = False) -> Response:
    """`chat_template` replaces the model's own template (the server's --chat-template);
    `hold_streams`: as in `create_completion`."""
    params, tools = _sampling_params(req)
    # the grammar's field: a bad schema came from the tools or from response_format
    renames = {**_RENAMES, "structured_outputs": "response_format" if tools.mode in
               ("none", "auto") else "tools"}
    chars = sum(len(m.text()) for m in req.messages)
    # a long chat takes a while to render
    prompt = await off_loop(lambda: _render(engine, req, chat_template), chars)
    prepared = await prepare(engine, [prompt], params, renames, _max_tokens_param(req))
    request_id = random_id("chatcmpl")
    started = submit(engine, prepared, params, request_id, stream=req.stream,
                     arrival_time=arrival_time(raw))
    outputs = merge(engine, started)
    prompt_tokens = len(prepared[0].token_ids)
    if req.stream:
        if hold_streams:
            outputs = await hold_until_first(raw, outputs)
        body = _stream(engine, req, params, tools, prompt_tokens, outputs, request_id)
        return StreamingResponse(body, media_type="text/event-stream")
    work = _collect(engine, req, tools, prompt_tokens, outputs, request_id)
    resp = await until_disconnect(raw, work)
    return Response(resp.model_dump_json(), media_type="application/json")


def _sampling_params(req: ChatCompletionRequest) -> tuple[SamplingParams, ToolPlan]:
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", "logit_bias")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    structured, tools = plan(req)
    try:
        params = req.sampling_params()
        if structured is not None:
            params.structured_outputs = structured
            params = params.clone()  # validated again, with the grammar (not with beams)
    except ValueError as exc:
        raise from_value_error(exc, _RENAMES) from exc
    return params, tools


def _max_tokens_param(req: ChatCompletionRequest) -> str | None:
    """The field that limits the completion, if the client set one (max_completion_tokens
    wins, as in _sampling_params)."""
    if req.max_completion_tokens is not None:
        return "max_completion_tokens"
    return "max_tokens" if req.max_tokens is not None else None


def _render(engine: EngineClient, req: ChatCompletionRequest,
            chat_template: str | None) -> dict[str, Any]:
    tokenizer = engine.tokenizer
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    text = render_chat(tokenizer, req.conversation(), chat_template=chat_template, tools=tools)
    try:
        check_unicode("messages", text)
    except ValueError as exc:
        raise from_value_error(exc) from exc
    # the template already carries any BOS the model wants
    return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}


async def _collect(engine: EngineClient, req: ChatCompletionRequest, tools: ToolPlan,
                   prompt_tokens: int, outputs: AsyncIterator[tuple[int, RequestOutput]],
                   request_id: str) -> ChatCompletionResponse:
    final: RequestOutput | None = None
    async for _, out in outputs:
        final = out if out.finished else final
    assert final is not None
    choices = []
    for comp in final.outputs:
        delta = ChoiceDelta(comp.index, comp.text, comp.token_ids, comp.logprobs, 0,
                            comp.finish_reason, comp.stop_reason)
        calls = tools.calls(comp.text)
        message = AssistantMessage(content=None if calls else comp.text, tool_calls=calls)
        choices.append(ChatChoice(index=comp.index, message=message,
                                  logprobs=_logprobs(engine, req, delta),
                                  finish_reason=finish_reason(comp.finish_reason, calls),
                                  stop_reason=comp.stop_reason))
    completion = sum(len(c.token_ids) for c in final.outputs)
    return ChatCompletionResponse(id=request_id, model=req.served_model, choices=choices,
                                  usage=UsageInfo.of(prompt_tokens, completion))


async def _stream(engine: EngineClient, req: ChatCompletionRequest, params: SamplingParams,
                  tools: ToolPlan, prompt_tokens: int, outputs: AsyncIterator[tuple[int, RequestOutput]],
                  request_id: str) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=req.served_model,
                                       choices=choices, usage=usage))

    tracker = DeltaTracker(params.n, params.stop_strings)
    calls = ToolStream(tools)
    completion = 0
    try:
        yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                     for i in range(params.n)])
        async for _, out in outputs:
            if out.finished:
                completion = sum(len(c.token_ids) for c in out.outputs)
            choices = [_stream_choice(engine, req, calls, d) for d in tracker.update(0, out)]
            if choices:
                yield chunk(choices)
        if req.include_usage:
            yield chunk([], UsageInfo.of(prompt_tokens, completion))
    except Exception as exc:  # noqa: BLE001 - headers are sent: the error travels as an event
        yield error_event(exc)
    finally:
        await outputs.aclose()  # type: ignore[attr-defined]
    yield sse("[DONE]")


def _stream_choice(engine: EngineClient, req: ChatCompletionRequest, calls: ToolStream,
                   d: ChoiceDelta) -> ChatStreamChoice:
    content, tool_calls = calls.update(d.index, d.text, d.finish_reason is not None)
    reason = d.finish_reason
    if reason == "stop" and calls.made_calls(d.index):
        reason = "tool_calls"
    return ChatStreamChoice(index=d.index, delta=DeltaMessage(content=content, tool_calls=tool_calls),
                            logprobs=_logprobs(engine, req, d), finish_reason=reason,
                            stop_reason=d.stop_reason)


def _logprobs(engine: EngineClient, req: ChatCompletionRequest,
              delta: ChoiceDelta) -> ChatLogprobs | None:
    if not req.logprobs or delta.logprobs is None:
        return None
    tokenizer = engine.tokenizer
    k = req.top_logprobs or 0
    content = []
    for token_id, entry in zip(delta.token_ids, delta.logprobs, strict=False):
        token = token_text(tokenizer, token_id)
        top = [_top(token_text(tokenizer, t), lp) for t, lp in top_logprobs(entry, k)]
        content.append(ChatTokenLogprob(token=token, logprob=clamp_logprob(entry.get(token_id)),
                                        bytes=list(token.encode()), top_logprobs=top))
    return ChatLogprobs(content=content)


def _top(token: str, logprob: float) -> TopLogprob:
    return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))
