"""Shared request plumbing of both endpoints: validate, submit, merge streams, compute deltas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from elasticserve.engine.protocol import EngineClient, TokenizerLike
from elasticserve.outputs import RequestOutput
from elasticserve.sampling_params import SamplingParams
from elasticserve.server.errors import APIError, from_value_error
from elasticserve.server.limits import check_context_length, off_loop
from elasticserve.server.protocol import ErrorInfo, ErrorResponse

T = TypeVar("T")
# text, token ids, or the engine's {"prompt": text, "prompt_token_ids": ids}
Prompt = str | list[int] | dict[str, Any]
# logprobs of tokens the sampler masked are -inf, which JSON cannot carry (vLLM clamps too)
MIN_LOGPROB = -9999.0


class ClientGoneError(Exception):
    """The client disconnected before its (non-streamed) response was ready."""


@dataclass(slots=True)
class Prepared:
    """A validated prompt: its text (if any) and token ids."""

    text: str | None
    token_ids: list[int]

    def engine_input(self) -> dict[str, Any]:
        return {"prompt": self.text, "prompt_token_ids": self.token_ids}


async def prepare(engine: EngineClient, prompts: Sequence[Prompt], params: SamplingParams,
                  renames: dict[str, str] | None = None,
                  max_tokens_param: str | None = None) -> list[Prepared]:
    """Tokenize and check every prompt before any is queued (in a worker thread: long prompts
    take a while to tokenize). Raises APIError 400/413.

    `max_tokens_param`: the request field that set `params.max_tokens` explicitly (None when it
    is a default): prompt + max_tokens beyond max_model_len is then a 400 naming it."""
    if not prompts:
        raise APIError(400, "prompt must not be empty", "prompt")

    def check() -> list[Prepared]:
        out = []
        for p in prompts:
            arg = {"prompt_token_ids": p} if isinstance(p, list) else p
            text, ids = engine.validate(arg, params)
            out.append(Prepared(text, ids))
        return out

    try:
        prepared = await off_loop(check, sum(len(p) for p in prompts))
    except ValueError as exc:
        raise from_value_error(exc, renames) from exc
    if max_tokens_param is not None:
        for p in prepared:
            check_context_length(len(p.token_ids), params.max_tokens, engine.max_model_len,
                                 max_tokens_param)
    return prepared


def submit(engine: EngineClient, prepared: list[Prepared], params: SamplingParams, base_id: str,
           stream: bool, arrival_time: float | None = None
           ) -> list[tuple[str, AsyncIterator[RequestOutput]]]:
    """Queue every prompt as its own engine request; all or none (an overload aborts the rest).
    `arrival_time`: when the server received the HTTP request (metrics count from it)."""
    started: list[tuple[str, AsyncIterator[RequestOutput]]] = []
    try:
        for i, p in enumerate(prepared):
            rid = f"{base_id}-{i}"
            started.append((rid, engine.generate(p.engine_input(), params, rid, stream=stream,
                                                 arrival_time=arrival_time)))
    except BaseException:
        for rid, _ in started:
            engine.abort(rid)
        raise
    return started


async def merge(engine: EngineClient, started: list[tuple[str, AsyncIterator[RequestOutput]]]
                ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from all requests as they come; leaving early aborts them all."""
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()

    async def pump(i: int, outputs: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in outputs:
                queue.put_nowait((i, out))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer below
            queue.put_nowait((i, exc))

    tasks = [asyncio.create_task(pump(i, it)) for i, (_, it) in enumerate(started)]
    remaining = len(started)
    try:
        while remaining:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.error is not None:
                raise APIError(500, f"request failed in the engine: {item.error}")
            remaining -= item.finished
            yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for rid, _ in started:  # a pump cancelled before it began never reached its `finally`
            engine.abort(rid)


@dataclass(slots=True)
class ChoiceDelta:
    """What one choice gained since it was last reported."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    text_offset: int  # where `text` starts in the choice's whole text
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass(slots=True)
class _Progress:
    text_sent: int = 0
    tokens_sent: int = 0
    done: bool = False


@dataclass(slots=True)
class DeltaTracker:
    """Turns full-text-so-far outputs into deltas. Text that may yet turn into a stop string
    (which the final text drops) or into a multi-byte character is held back, so the deltas
    always concatenate to the final text."""

    n: int
    stops: list[str]
    _progress: dict[int, _Progress] = field(default_factory=dict)

    def update(self, prompt_index: int, out: RequestOutput) -> list[ChoiceDelta]:
        deltas = []
        for comp in out.outputs:
            index = prompt_index * self.n + comp.index
            st = self._progress.setdefault(index, _Progress())
            finished = comp.finish_reason is not None
            if st.done:
                continue
            end = len(comp.text) if finished else safe_text_end(comp.text, self.stops)
            text = comp.text[st.text_sent:end]
            ids = comp.token_ids[st.tokens_sent:]
            if not (text or ids or finished):
                continue
            # the engine may share its growing logprobs list: take exactly these tokens' entries
            logprobs = None if comp.logprobs is None \
                else comp.logprobs[st.tokens_sent:len(comp.token_ids)]
            deltas.append(ChoiceDelta(index, text, ids, logprobs, st.text_sent,
                                      comp.finish_reason, comp.stop_reason))
            st.text_sent = max(st.text_sent, end)
            st.tokens_sent = len(comp.token_ids)
            st.done = finished
        return deltas


def safe_text_end(text: str, stops: list[str]) -> int:
    """How much of an unfinished text can be sent without ever having to take it back."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence decodes to U+FFFD
        end -= 1
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), hold, -1):
            if text.endswith(stop[:k], 0, end):
                hold = k
                break
    return end - hold


def top_logprobs(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k most likely tokens of one position, most likely first, clamped for JSON."""
    ranked = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
    return [(tok, clamp_logprob(lp)) for tok, lp in ranked]


def clamp_logprob(lp: float | None) -> float:
    return MIN_LOGPROB if lp is None or lp != lp or lp < MIN_LOGPROB else lp


def render_chat(tokenizer: TokenizerLike, conversation: list[dict[str, Any]],
                add_generation_prompt: bool = True, chat_template: str | None = None,
                **kwargs: Any) -> str:
    """The conversation through the chat template (`chat_template`, else the model's own);
    a conversation the template rejects is an APIError 400 naming `messages`."""
    try:
        return str(tokenizer.apply_chat_template(conversation,
                                                 add_generation_prompt=add_generation_prompt,
                                                 chat_template=chat_template, **kwargs))
    except Exception as exc:  # noqa: BLE001 - a template rejects a conversation by raising
        raise APIError(400, f"messages cannot be rendered by the chat template: {exc}",
                       "messages") from exc


def token_text(tokenizer: TokenizerLike, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def error_event(exc: Exception) -> str:
    """An SSE event carrying an error, for failures after the response has started."""
    if isinstance(exc, APIError):
        info = ErrorInfo(message=exc.message, type=exc.type, param=exc.param, code=exc.code)
    else:
        info = ErrorInfo(message=f"{type(exc).__name__}: {exc}", type="server_error")
    return sse(ErrorResponse(error=info))


def sse(chunk: BaseModel | str) -> str:
    data = chunk if isinstance(chunk, str) else chunk.model_dump_json()
    return f"data: {data}\n\n"


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client goes away first (raises ClientGoneError).

    Cancelling the work cancels its engine iterators, which abort their requests."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGoneError()
    finally:
        watcher.cancel()
        task.cancel()


async def hold_until_first(raw: Request, outputs: AsyncIterator[T]) -> AsyncIterator[T]:
    """Wait for a stream's first output before its headers go out. Under admission control
    (`serve --admission slo`) the engine refuses a request only when it queues it, from the
    step thread or the worker process, so the refusal reaches the server as the stream's first
    item: waiting for it lets the refusal be an HTTP 503 with Retry-After (raised from here,
    for the error handlers) instead of an error event after 200. An admitted request's first
    output comes with its first token, which the targets bound. Raises ClientGoneError if the
    client leaves while it waits (the requests are then aborted)."""
    try:
        first = await until_disconnect(raw, _first(outputs))
    except BaseException:
        await outputs.aclose()  # type: ignore[attr-defined]
        raise
    return _prepend(first, outputs)


async def _first(outputs: AsyncIterator[T]) -> T:
    return await outputs.__anext__()


async def _prepend(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


async def _wait_disconnect(request: Request) -> None:
    # the body has been read, so the server's next message can only be the disconnect
    while (await request.receive())["type"] != "http.disconnect":
        pass
