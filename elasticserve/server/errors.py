"""OpenAI-shaped errors: every failure becomes `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from elasticserve.engine.protocol import EngineDeadError, EngineOverloadedError
from elasticserve.errors import InvalidFieldError, PromptTooLargeError, SLOUnattainableError
from elasticserve.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          413: "invalid_request_error", 503: "server_error", 500: "server_error"}
_DESCRIPTIONS = {400: "Invalid request (the error's param names the field)",
                 401: "Missing or wrong API key", 404: "Unknown model",
                 413: "The prompt can never fit the model's context (max_model_len)",
                 500: "Internal error", 503: "Overloaded or engine not running"}
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str | None = None) -> None:
        # a message may quote the client's input; lone surrogates there would make the JSON
        # body unencodable (a 500 that also drops the connection), so they are escaped
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "invalid_request_error")

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorInfo(message=self.message, type=self.type,
                                             param=self.param, code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for a route: these statuses carry an ErrorResponse body."""
    return {s: {"model": ErrorResponse, "description": _DESCRIPTIONS[s]} for s in statuses}


def from_value_error(exc: ValueError, renames: dict[str, str] | None = None) -> APIError:
    """An engine or SamplingParams ValueError as a 400 (or 413 when the prompt can never fit).

    An InvalidFieldError names its field, which becomes `param` (renamed to the API's field
    name where the two differ, e.g. chat's `top_logprobs` is the engine's `logprobs`); any
    other ValueError names none."""
    message = str(exc)
    param = exc.param if isinstance(exc, InvalidFieldError) else None
    if param is not None and renames:
        param = renames.get(param, param)
    if isinstance(exc, PromptTooLargeError):
        return APIError(413, message, param, code="context_length_exceeded")
    return APIError(400, message, param)


def param_from_loc(loc: Sequence[Any]) -> str | None:
    """("body", "messages", 0, "content", "str") -> "messages[0].content"."""
    out = ""
    for item in loc:
        if item == "body" and not out:
            continue
        if isinstance(item, int):
            out += f"[{item}]"
        elif isinstance(item, str) and item.isidentifier() and item not in _UNION_TAGS \
                and not item[0].isupper():
            out += f".{item}" if out else item
        else:
            break  # a union member's tag, not a field
    return out or None


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        msg = f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip()
        return APIError(400, msg).response()
    param = param_from_loc(first.get("loc", ()))
    detail = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return APIError(400, f"{param or 'body'}: {detail}{more}", param).response()


def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return APIError(exc.status_code, str(exc.detail), type_="invalid_request_error").response()


def _overloaded(request: Request, exc: Exception) -> JSONResponse:
    return APIError(503, str(exc), code="overloaded").response()


def _slo_unattainable(request: Request, exc: Exception) -> JSONResponse:
    """Admission control refused the request: 503 now, and when to try again."""
    assert isinstance(exc, SLOUnattainableError)
    response = APIError(503, str(exc), code="slo_unattainable").response()
    response.headers["Retry-After"] = str(int(exc.retry_after_s))
    return response


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error serving %s", request.url.path, exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()


class _AnswerUnexpectedErrors:
    """Answers an unhandled exception with the OpenAI 500 body and lets the connection live.

    Starlette's outermost ServerErrorMiddleware answers too, but then re-raises, and uvicorn
    closes the connection: the client's next request on that keep-alive connection would be
    reset. HTTPExceptions (the body cap's 413 among them) keep their own handling."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started or isinstance(exc, StarletteHTTPException):
                raise  # mid-response nothing else can be sent; the others are not ours
            await _unexpected(Request(scope), exc)(scope, receive, send)


def drop_validation_422(app: FastAPI) -> None:
    """FastAPI documents a 422 on every route with a body; ours answer 400 instead."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    """Replace FastAPI's 422 and HTML-ish errors with OpenAI bodies."""
    app.add_middleware(_AnswerUnexpectedErrors)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(EngineOverloadedError, _overloaded)
    app.add_exception_handler(EngineDeadError, _overloaded)
    app.add_exception_handler(SLOUnattainableError, _slo_unattainable)
    app.add_exception_handler(Exception, _unexpected)
