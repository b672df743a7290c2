"""What a client cannot talk the server out of: the body size, the context length, and where
long prompts are tokenized.

Why our own body cap and not FastAPI's `max_body_size`: Starlette's limiter answers a declared
oversized body with a plain-text 413 of its own, replacing whatever the app sends, and OpenAI
clients expect the JSON error body. `BodySizeLimit` refuses a declared Content-Length over the
cap before a byte of the body is read, and counts a chunked body as it streams in, so an
oversized body is never buffered nor parsed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from elasticserve.server.errors import APIError

T = TypeVar("T")

# `serve --max-request-bytes` says 4MiB in its help (cli_serve imports no server extras)
# 4 MiB is well above any legitimate request to the models served here: a 128K-token prompt is
# ~0.5 MB of text, or ~0.9 MB as a JSON list of token ids; while it bounds what one request can
# make the server buffer, parse and tokenize (a 10 MB prompt took 15-20 s of tokenizer time).
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024

# prompts of at least this many characters are tokenized on a thread of their own, so that a
# few huge prompts queue behind each other instead of filling the default executor that every
# small request's tokenizing goes through
LARGE_PROMPT_CHARS = 64 * 1024

_large_executor: ThreadPoolExecutor | None = None
_large_lock = threading.Lock()


def _executor_for(num_chars: int) -> ThreadPoolExecutor | None:
    global _large_executor
    if num_chars < LARGE_PROMPT_CHARS:
        return None  # the loop's default executor
    with _large_lock:
        if _large_executor is None:
            # not at a lower CPU priority: the thread holds the GIL while it turns the ids into a
            # Python list, and a starved GIL holder would stall every thread of the server
            _large_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize-large")
        return _large_executor


async def off_loop(fn: Callable[[], T], num_chars: int) -> T:
    """Run `fn` (tokenizing `num_chars` characters of prompt) in a worker thread, never on the
    event loop: every model's requests and /health share that loop. (The tokenizer releases
    the GIL while it works: models/tokenizer.py.)"""
    return await asyncio.get_running_loop().run_in_executor(_executor_for(num_chars), fn)


def check_context_length(prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                         param: str) -> None:
    """vLLM's check (a 400): an explicit `max_tokens` must fit after the prompt within
    max_model_len. Without one the request generates up to what is left."""
    if max_tokens is None or prompt_tokens + max_tokens <= max_model_len:
        return
    raise APIError(
        400, f"'{param}' is too large: {max_tokens}. This model's maximum context length is "
             f"{max_model_len} tokens and your request has {prompt_tokens} input tokens "
             f"({max_tokens} > {max_model_len} - {prompt_tokens}).",
        param, code="context_length_exceeded")


class RequestTooLarge(HTTPException):
    """A body over the cap. An HTTPException because FastAPI passes those through when they are
    raised while it reads a body (any other error there becomes a 400); the app's handler
    answers it with the OpenAI body."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than this server's limit of {limit} "
                              "bytes (serve --max-request-bytes)")


class BodySizeLimit:
    """ASGI middleware: a request body over `max_bytes` is a 413 before it is parsed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            error = RequestTooLarge(self.max_bytes)  # answered without reading the body
            await APIError(413, str(error.detail)).response()(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server rejects it
    return None
