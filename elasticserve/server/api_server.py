"""The OpenAI-compatible HTTP app: one EngineClient per served model name."""

from __future__ import annotations

import time
from collections.abc import Mapping

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from elasticserve.engine.protocol import EngineClient, ModelPoolClient
from elasticserve.server.admin import add_admin_routes
from elasticserve.server.errors import APIError, install_error_handlers
from elasticserve.server.limits import DEFAULT_MAX_REQUEST_BYTES, BodySizeLimit
from elasticserve.server.metrics import CONTENT_TYPE, ArrivalTimeMiddleware, ServerMetrics
from elasticserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from elasticserve.server.serving import ClientGoneError
from elasticserve.server.serving_chat import create_chat_completion
from elasticserve.server.serving_completion import create_completion

# nginx's code for "client closed request": nobody reads it, but the access log shows why
CLIENT_CLOSED = 499


def build_app(engines: Mapping[str, EngineClient], title: str = "elasticserve",
              pool: ModelPoolClient | None = None, admin_token: str | None = None,
              max_request_bytes: int | None = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """An app serving `engines` by model name. Starts them (if not running); stopping them is
    the owner's job (`EngineClient.shutdown`), as engines may outlive an app.
    With `pool` (the models' shared budget) and `admin_token`, the admin routes are on.
    A request body over `max_request_bytes` (None: no limit) is a 413 before it is read."""
    if not engines:
        raise ValueError("engines must name at least one model")
    app = FastAPI(title=title)
    install_error_handlers(app)
    if max_request_bytes is not None:
        app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    metrics = ServerMetrics(engines)
    app.state.engines = engines
    app.state.metrics = metrics
    for engine in engines.values():
        engine.start()
    _add_info_routes(app, engines, metrics)
    _add_generation_routes(app, engines, pool)
    if pool is not None and admin_token:
        add_admin_routes(app, pool, admin_token)
    # added last, so it is outermost: latencies count from the first byte of a request
    app.add_middleware(ArrivalTimeMiddleware)
    return app


def _add_info_routes(app: FastAPI, engines: Mapping[str, EngineClient],
                     metrics: ServerMetrics) -> None:
    created = int(time.time())

    @app.get("/health")
    async def health() -> Response:
        dead = [name for name, e in engines.items() if e.health() is not None]
        if dead:
            raise APIError(503, f"engine(s) not running: {dead}", code="engine_dead")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[
            ModelCard(id=name, created=created, max_model_len=e.max_model_len)
            for name, e in engines.items()])

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)


def _add_generation_routes(app: FastAPI, engines: Mapping[str, EngineClient],
                           pool: ModelPoolClient | None) -> None:
    def engine_for(model: str) -> EngineClient:
        engine = engines.get(model)
        if engine is None:
            raise APIError(404, f"The model `{model}` does not exist; served models: "
                                f"{sorted(engines)}", "model", code="model_not_found")
        if pool is not None:
            pool.note_request(model)  # popularity for the arbiter's reclaim order
        return engine

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        try:
            return await create_completion(engine_for(body.model), body, raw)
        except ClientGoneError:
            return Response(status_code=CLIENT_CLOSED)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        try:
            return await create_chat_completion(engine_for(body.model), body, raw)
        except ClientGoneError:
            return Response(status_code=CLIENT_CLOSED)
