"""Admin routes: memory report, per-model limits, sleep and wake. Bearer-token protected;
without a token configured the routes do not exist at all."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from elasticserve.engine.protocol import ModelLoadError, ModelPoolClient
from elasticserve.server.errors import APIError, error_responses, from_value_error


class LimitsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    min_bytes: int | None = Field(default=None, ge=0)
    max_bytes: int | None = Field(default=None, gt=0)
    priority: int | None = None


def add_admin_routes(app: FastAPI, pool: ModelPoolClient, token: str) -> None:
    """GET /admin/memory, /admin/workers; POST /admin/models/{name}/limits, /sleep, /wake."""

    def check(request: Request) -> None:
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            raise APIError(401, "admin routes need 'Authorization: Bearer <admin token>'",
                           code="unauthorized", type_="authentication_error")

    def known(name: str) -> None:
        if name not in pool.model_names:
            raise APIError(404, f"unknown model {name!r}; served: {sorted(pool.model_names)}",
                           "name", code="model_not_found")

    _add_reports(app, pool, check)

    @app.post("/admin/models/{name}/limits", responses=error_responses(400, 401, 404))
    async def limits(name: str, body: LimitsRequest, request: Request) -> JSONResponse:
        check(request)
        known(name)
        try:
            await asyncio.to_thread(pool.set_limits, name, body.min_bytes, body.max_bytes,
                                    body.priority)
        except ValueError as exc:  # names the field at fault
            raise from_value_error(exc) from exc
        return JSONResponse(pool.memory_report()["models"][name])  # type: ignore[index]

    @app.post("/admin/models/{name}/sleep", responses=error_responses(400, 401, 404))
    async def sleep(name: str, request: Request) -> JSONResponse:
        check(request)
        known(name)
        try:
            pages = await asyncio.to_thread(pool.sleep, name)
        except ValueError as exc:
            raise APIError(400, str(exc), "name") from exc
        return JSONResponse({"model": name, "state": "asleep", "kv_pages_released": pages})

    @app.post("/admin/models/{name}/wake", responses=error_responses(401, 404, 503))
    async def wake(name: str, request: Request) -> JSONResponse:
        check(request)
        known(name)
        await _wake(pool, name)
        return JSONResponse({"model": name, "state": "awake"})


def _add_reports(app: FastAPI, pool: ModelPoolClient, check: Callable[[Request], None]) -> None:
    @app.get("/admin/memory", responses=error_responses(401))
    async def memory(request: Request) -> JSONResponse:
        check(request)
        return JSONResponse(pool.memory_report())

    @app.get("/admin/workers", responses=error_responses(401))
    async def workers(request: Request) -> JSONResponse:
        check(request)
        return JSONResponse({"workers": pool.workers_report()})


async def _wake(pool: ModelPoolClient, name: str) -> None:
    try:
        woke = await asyncio.to_thread(pool.wake, name)
    except ModelLoadError as exc:  # still asleep, nothing booked; a later wake retries
        raise APIError(503, f"{name!r} stays asleep: {exc}", code="model_load_failed") from exc
    if not woke:
        raise APIError(503, f"no room in the budget to wake {name!r} now", code="no_memory")
