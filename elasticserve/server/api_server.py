"""The OpenAI-compatible HTTP app: one EngineClient per served model name."""

from __future__ import annotations

import time
from collections.abc import Mapping

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from elasticserve.engine.protocol import EngineClient, ModelPoolClient
from elasticserve.server.admin import add_admin_routes
from elasticserve.server.errors import (
    APIError,
    drop_validation_422,
    error_responses,
    install_error_handlers,
)
from elasticserve.server.limits import DEFAULT_MAX_REQUEST_BYTES, BodySizeLimit
from elasticserve.server.metrics import CONTENT_TYPE, ArrivalTimeMiddleware, ServerMetrics
from elasticserve.server.middleware import install_middleware
from elasticserve.server.options import ModelNames, ServeOptions
from elasticserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingFields,
)
from elasticserve.server.routes_tokenize import add_tokenize_routes
from elasticserve.server.serving import ClientGoneError
from elasticserve.server.serving_chat import create_chat_completion
from elasticserve.server.serving_completion import create_completion
from elasticserve.version import __version__

# nginx's code for "client closed request": nobody reads it, but the access log shows why
CLIENT_CLOSED = 499


def build_app(engines: Mapping[str, EngineClient], title: str = "elasticserve",
              pool: ModelPoolClient | None = None, admin_token: str | None = None,
              max_request_bytes: int | None = DEFAULT_MAX_REQUEST_BYTES,
              options: ServeOptions | None = None) -> FastAPI:
    """An app serving `engines` by model name. Starts them (if not running); stopping them is
    the owner's job (`EngineClient.shutdown`), as engines may outlive an app.
    With `pool` (the models' shared budget) and `admin_token`, the admin routes are on.
    A request body over `max_request_bytes` (None: no limit) is a 413 before it is read.
    `options`: API key, CORS origins, chat template, other names of the models."""
    if not engines:
        raise ValueError("engines must name at least one model")
    options = options or ServeOptions()
    names = ModelNames(engines, options.aliases)
    app = FastAPI(title=title, version=__version__)
    install_error_handlers(app)
    if max_request_bytes is not None:
        app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    install_middleware(app, options)
    drop_validation_422(app)
    metrics = ServerMetrics(engines)
    app.state.engines = engines
    app.state.metrics = metrics
    for engine in engines.values():
        engine.start()
    _add_info_routes(app, engines, metrics, names)
    _add_generation_routes(app, engines, pool, names, options)
    add_tokenize_routes(app, engines, names.resolve, options.chat_template)
    if pool is not None and admin_token:
        add_admin_routes(app, pool, admin_token)
    # added last, so it is outermost: latencies count from the first byte of a request
    app.add_middleware(ArrivalTimeMiddleware)
    return app


def _add_info_routes(app: FastAPI, engines: Mapping[str, EngineClient],
                     metrics: ServerMetrics, names: ModelNames) -> None:
    created = int(time.time())

    @app.get("/health", responses=error_responses(503))
    async def health() -> Response:
        dead = [name for name, e in engines.items() if e.health() is not None]
        if dead:
            raise APIError(503, f"engine(s) not running: {dead}", code="engine_dead")
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/v1/models", responses=error_responses(401))
    async def list_models() -> ModelList:
        return ModelList(data=[
            ModelCard(id=name, created=created, root=served,
                      max_model_len=engines[served].max_model_len)
            for name, served in names.listed()])

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)


def _add_generation_routes(app: FastAPI, engines: Mapping[str, EngineClient],
                           pool: ModelPoolClient | None, names: ModelNames,
                           options: ServeOptions) -> None:
    errors = error_responses(400, 401, 404, 413, 500, 503)
    hold = options.admission == "slo"  # a refused stream is a 503, not 200 + error event

    def engine_for(body: SamplingFields) -> EngineClient:
        unsupported = body.unsupported_fields()
        if unsupported:
            raise APIError(400, f"unsupported field(s): {unsupported}; this server does not "
                                f"implement them and will not ignore them", unsupported[0])
        body.model = names.resolve(body.model)  # responses report the served name
        if pool is not None:
            pool.note_request(body.model)  # popularity for the arbiter's reclaim order
        return engines[body.model]

    @app.post("/v1/completions", responses=errors)
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        try:
            return await create_completion(engine_for(body), body, raw, hold)
        except ClientGoneError:
            return Response(status_code=CLIENT_CLOSED)

    @app.post("/v1/chat/completions", responses=errors)
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        try:
            return await create_chat_completion(engine_for(body), body, raw,
                                                options.chat_template, hold)
        except ClientGoneError:
            return Response(status_code=CLIENT_CLOSED)
