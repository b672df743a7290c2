"""Plain ASGI middleware (no BaseHTTPMiddleware: streamed responses and the disconnect watch in
`serving.until_disconnect` read the raw receive channel, which that wrapper would intercept)."""

from __future__ import annotations

import hmac
import uuid

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from elasticserve.server.errors import APIError
from elasticserve.server.options import ServeOptions

REQUEST_ID = b"x-request-id"


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


class RequestIdMiddleware:
    """Echo the request's X-Request-Id on the response, or send a fresh one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _header(scope, REQUEST_ID) or uuid.uuid4().hex.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID]
                message = {**message, "headers": [*headers, (REQUEST_ID, rid)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class HeadMiddleware:
    """HEAD is GET without the body (FastAPI routes answer only the methods they name)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on every /v1/* request, as vLLM's --api-key does; a
    missing or wrong key is a 401 with an OpenAI error body. CORS preflights pass."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" \
                and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            sent = _header(scope, b"authorization") or b""
            if not hmac.compare_digest(sent, self.expected):
                error = APIError(401, "Incorrect or missing API key: send "
                                      "'Authorization: Bearer <api key>'",
                                 code="invalid_api_key", type_="authentication_error")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install_middleware(app: FastAPI, options: ServeOptions) -> None:
    """Outermost first: request id (on every response, 401s included), HEAD, CORS (answers
    preflights and labels 401s so a browser can read them), API key."""
    # Starlette wraps each added middleware around the ones added before it
    if options.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=options.api_key)
    if options.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.allowed_origins),
                           allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["X-Request-Id"])
    app.add_middleware(HeadMiddleware)
    app.add_middleware(RequestIdMiddleware)
