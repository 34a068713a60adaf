"""The REST API (FastAPI): ``create_app(ctx)``; every route is under ``/api``.

Adding a router from another module (model upload, rollouts, ...)::

    # cloud_sync/fleet/server/api/models.py
    from fastapi import APIRouter
    from cloud_sync.fleet.server.auth import Admin, Viewer     # role dependencies (401/403 JSON errors)
    from cloud_sync.fleet.server.context import Ctx            # ctx.db (Database), ctx.settings, ctx.commands ...

    router = APIRouter(prefix="/api/models", tags=["models"])

    @router.post("", status_code=201)
    def upload(ctx: Ctx, who: Admin) -> dict:   # a plain ``def``: FastAPI runs it in a thread
        with ctx.db.write() as conn: ...        # one transaction; raise errors.FleetServerError subclasses

then add ``"cloud_sync.fleet.server.api.models"`` to :data:`ROUTERS`. Blocking work (database,
files, model validation) goes in plain ``def`` routes or ``asyncio.to_thread``, never directly in an
``async def``. Raise :class:`~cloud_sync.fleet.server.errors.FleetServerError` subclasses: they become
``{"error": {"code", "message"}}`` with their HTTP status.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import sqlalchemy as sa
import structlog
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from cloud_sync.fleet.server.context import ServerContext
from cloud_sync.fleet.server.errors import FleetServerError

log = structlog.get_logger(__name__)

#: Modules with a ``router`` (APIRouter), included in this order.
ROUTERS: tuple[str, ...] = (
    "cloud_sync.fleet.server.api.devices",
    "cloud_sync.fleet.server.api.records",
    "cloud_sync.fleet.server.api.commands",
    "cloud_sync.fleet.server.api.deployments",
    "cloud_sync.fleet.server.api.admin",
)
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 413: "too_large", 415: "unsupported_media_type"}


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _app_version() -> str:
    try:
        return version("edge-agent")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"


def create_app(ctx: ServerContext, routers: Sequence[str] = ROUTERS, extra: Sequence[APIRouter] = ()) -> FastAPI:
    """The FastAPI application over ``ctx`` with the routers of ``routers`` (module names) and ``extra``
    (routers built by the service, e.g. the upload router from its factory); starting and stopping the
    parts is the service's job."""
    app = FastAPI(title="edge-fleet server", version=_app_version(), openapi_url="/api/openapi.json",
                  docs_url="/api/docs", redoc_url=None,
                  description="Fleet service of edge-agent: devices, telemetry, results, events, gaps, commands. "
                              "Send an API token as `Authorization: Bearer <token>`. Docs: docs/fleet-server.md.")
    app.state.ctx = ctx

    @app.exception_handler(FleetServerError)
    async def _fleet_error(_request: Request, exc: FleetServerError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in err.get("loc", ()))
        return JSONResponse(error_body("invalid_request", f"{where}: {err.get('msg')}"), status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(sa.exc.OperationalError)
    async def _storage(_request: Request, exc: sa.exc.OperationalError) -> JSONResponse:
        log.warning("fleet.api.storage_unavailable", error=str(exc).splitlines()[0][:300])
        return JSONResponse(error_body("storage_unavailable", "the database is unavailable; retry shortly"),
                            status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("fleet.api.internal_error", path=request.url.path, exc_info=exc)
        return JSONResponse(error_body("internal", "internal error (logged)"), status_code=500)

    for name in routers:
        app.include_router(importlib.import_module(name).router)
    for router in extra:
        app.include_router(router)
    return app
